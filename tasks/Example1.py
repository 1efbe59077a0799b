"""Seed example, part 1: a stateful counter.

Every second it emits ``{ct, outstr}`` from its state counter and increments it; a message
with ``new_ct`` sets the counter. Its state survives restarts (the framework saves it).
"""

from multimodule import Task


class Example1(Task):
    is_stateful = True

    def set_config(self, config):
        self.named_recur("emit", 1.0, self.tick)

    def tick(self):
        ct = self.state.get("ct", 0)
        self.emit({"ct": ct, "outstr": self.config.get("outstr", "")})
        self.state["ct"] = ct + 1

    def message(self, message):
        if "new_ct" in message:
            self.state["ct"] = message["new_ct"]
            self.log(f"counter set to {message['new_ct']}")
