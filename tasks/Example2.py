"""Seed example, part 2: prints what Example1 emits (routed to it by the Router)."""

from multimodule import Task


class Example2(Task):
    def message(self, message):
        print(f"Example2: received a message: {message.get('ct')} ({message.get('outstr')})",
              flush=True)
