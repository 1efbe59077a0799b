"""Following the config file: changes take effect within a second (atomic rename or in-place
write), bad files are refused while the old config keeps running, a task module that failed
to import is tried again when the config changes, control-message overrides vs the file.

The file watcher end to end, mmctl reload and SIGHUP run a real daemon subprocess; the rest
runs the daemon in-process (see tests/inprocess.py), whose file watcher is the real one
(inotify on the test's loop), with a ticker ticking every 0.02 s instead of 0.1 s."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from helpers import receive_n, receive_until, router_section, route

TICKER = """
    from multimodule import Task

    class Ticker(Task):
        # Emits its config's outstr every 0.1 s.
        def set_config(self, config):
            self.named_recur("tick", 0.1, self.tick)

        def tick(self):
            self.emit({"outstr": self.config.get("outstr")})
"""

#: The same, ticking every 0.02 s (for the in-process daemon).
FAST_TICKER = TICKER.replace("every 0.1 s", "every 0.02 s").replace('"tick", 0.1,',
                                                                  '"tick", 0.02,')


def ticker_config(outstr: str, *routes: str) -> str:
    return f'[Ticker]\noutstr = "{outstr}"\n\n' + router_section(route("Ticker", "out"), *routes)


def outstr_is(value):
    return lambda message: message.get("outstr") == value


def assert_change_seen_within(transit, old: str, new: str, written_at: float) -> None:
    """The first tick with ``new`` comes within ~1 s of the write; before it only ``old``."""
    message, skipped = receive_until(transit, "out", outstr_is(new), timeout=3)
    elapsed = time.monotonic() - written_at
    assert elapsed < 1.5, f"config change took {elapsed:.2f} s to show"
    assert {m["outstr"] for m in skipped} <= {old}, skipped
    # and from then on only the new value
    assert [m["outstr"] for m in receive_n(transit, "out", 3)] == [new] * 3


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    os.replace(tmp, path)


async def next_until(inproc, qname: str, predicate, timeout: float = 3.0):
    """Await messages on capture queue ``qname`` until one satisfies ``predicate`` (total
    wait bounded by ``timeout``); return it and the messages skipped before it."""
    skipped = []
    deadline = time.monotonic() + timeout
    while True:
        message = await inproc.next(qname, timeout=max(0.0, deadline - time.monotonic()))
        if predicate(message):
            return message, skipped
        skipped.append(message)


async def next_n(inproc, qname: str, count: int) -> list[dict]:
    """The next ``count`` messages on capture queue ``qname``."""
    return [await inproc.next(qname) for _ in range(count)]


async def change_seen_within(inproc, old: str, new: str, written_at: float) -> None:
    """In-process :func:`assert_change_seen_within`: the first tick with ``new`` comes within
    ~1 s of the write; before it only ``old``; then only ``new``."""
    _, skipped = await next_until(inproc, "out", outstr_is(new))
    elapsed = time.monotonic() - written_at
    assert elapsed < 1.5, f"config change took {elapsed:.2f} s to show"
    assert {m["outstr"] for m in skipped} <= {old}, skipped
    assert [m["outstr"] for m in await next_n(inproc, "out", 3)] == [new] * 3


def test_config_change_by_rename_and_in_place_write_takes_effect_within_a_second(mm, transit):
    # Given a ticker emitting outstr "one"
    mm.task("Ticker", TICKER)
    mm.config(ticker_config("one"))
    mm.start()
    receive_until(transit, "out", outstr_is("one"))
    # When the file is replaced atomically (temporary file renamed over it)
    written = time.monotonic()
    mm.config(ticker_config("two"), atomic=True)
    # Then the ticks carry "two" within a second
    assert_change_seen_within(transit, "one", "two", written)
    # When the file is rewritten in place
    written = time.monotonic()
    mm.config(ticker_config("three"))
    # Then the ticks carry "three" within a second
    assert_change_seen_within(transit, "two", "three", written)


async def test_json_config_file_followed_too(inproc):
    # Given a ticker configured by a JSON file
    inproc.task("Ticker", FAST_TICKER)
    path = inproc.root / "config.json"
    routes = '{"routes": [{"match": {"source": "Ticker"}, "forwards": [{"qname": "out"}]}]}'
    path.write_text('{"Ticker": {"outstr": "j1"}, "Router": %s}' % routes)
    inproc.capture("out")
    await inproc.start(config_file=path)
    await next_until(inproc, "out", outstr_is("j1"))
    # When the file is replaced / Then the ticks carry the new value within a second
    written = time.monotonic()
    write_atomic(path, '{"Ticker": {"outstr": "j2"}, "Router": %s}' % routes)
    await change_seen_within(inproc, "j1", "j2", written)


async def test_bad_config_files_refused_old_config_keeps_running(inproc):
    # Given a ticker emitting "good", routed by the Router to "out"
    inproc.task("Ticker", FAST_TICKER)
    inproc.config(ticker_config("good"))
    inproc.capture("out")
    await inproc.start()
    await next_until(inproc, "out", outstr_is("good"))
    bad_files = [
        # (file text, what the error must say)
        ('[Ticker]\noutstr = "bad1"\n[Router\n', "line 3"),                    # TOML syntax
        ('[Ticker]\noutstr = "bad2"\n\n[Router]\nroutes = [ { match = {} } ]\n',
         "Router.routes.0.forwards"),                                          # Router model
        ('[Ticker]\noutstr = "bad3"\nintervals = { tick = -1 }\n\n'
         + router_section(route("Ticker", "out")), "Ticker.intervals.tick"),  # reserved key
        ('[Ticker]\noutstr = "bad4"\n\n[Router]\nroutes = [ { match = { t = "/(/" }, '
         'forwards = [ { qname = "out" } ] } ]\n', "invalid regular expression"),
        ('[Ticker]\noutstr = "bad5"\n\n[Router]\nroutes = [ { forwards = [ { qname = "a/b" } '
         '] } ]\n', "Router.routes.0.forwards.0.qname"),
    ]
    for text, words in bad_files:
        # When a bad file is written
        mark = len(inproc.records)
        write_atomic(inproc.config_path, text)
        # Then the error channel says it was refused, naming the file and the problem
        line = (await inproc.record("error", "config refused", since=mark)).line
        assert "the previous config stays in force" in line, line
        assert str(inproc.config_path) in line and words in line, (words, line)
        # and the old config keeps working: ticks still flow, routed, with the old outstr
        assert [m["outstr"] for m in await next_n(inproc, "out", 3)] == ["good"] * 3
        # and `mmctl reload` of that file fails, saying why
        status, _, err = await inproc.mmctl("reload")
        assert status == 1 and words in err and str(inproc.config_path) in err, err
    # When a good file follows / Then it is taken
    written = time.monotonic()
    write_atomic(inproc.config_path, ticker_config("fixed"))
    await change_seen_within(inproc, "good", "fixed", written)


async def test_task_module_with_syntax_error_reported_and_retried_when_config_changes(inproc):
    # Given a task module with a syntax error, configured beside a working Ticker
    inproc.task("Ticker", FAST_TICKER)
    inproc.task("Broken", "from multimodule import Task\n\nclass Broken(Task:\n    pass\n")
    inproc.config('[Broken]\n\n' + ticker_config("alive", route("Broken", "out")))
    inproc.capture("out")
    # When the daemon starts
    await inproc.start()
    # Then the error names the module and the SyntaxError
    line = inproc.records_of("error", "task module Broken failed to import")[0].line
    assert "SyntaxError" in line, line
    # and the other task keeps running
    await next_until(inproc, "out", outstr_is("alive"))
    report = (await inproc.control(query="status"))["status"]
    assert "SyntaxError" in report["import_failures"]["Broken"]
    assert "Broken" not in report["tasks"]
    # When the module is fixed and the config changed
    inproc.task("Broken", """
        from multimodule import Task

        class Broken(Task):
            def set_config(self, config):
                self.emit({"fixed": True, "config": dict(config)})
    """)
    write_atomic(inproc.config_path,
                 '[Broken]\nnote = "retry"\n\n' + ticker_config("alive", route("Broken", "out")))
    # Then the task loads with the new config
    message, _ = await next_until(inproc, "out", lambda m: m.get("source") == "Broken")
    assert message["fixed"] is True and message["config"] == {"note": "retry"}
    report = (await inproc.control(query="status"))["status"]
    assert "Broken" in report["tasks"] and report["import_failures"] == {}


async def test_file_change_overrides_control_message_config_of_that_task_only(inproc):
    # Given a ticker whose config was replaced by a control message
    inproc.task("Ticker", FAST_TICKER)
    inproc.config(ticker_config("file1"))
    inproc.capture("out")
    inproc.capture("out2")
    await inproc.start()
    await next_until(inproc, "out", outstr_is("file1"))
    assert await inproc.control(config={"Ticker": {"outstr": "ctl"}}) == {"ok": True}
    await next_until(inproc, "out", outstr_is("ctl"))
    # When the file changes another task's section only (a second route for Ticker)
    write_atomic(inproc.config_path, ticker_config("file1", route("Ticker", "out2")))
    await inproc.next("out2")  # the new route is in force
    # Then the control message's config stays in force
    await next_n(inproc, "out2", 1)
    inproc.taken("out")  # ticks from before the change
    assert {m["outstr"] for m in await next_n(inproc, "out", 3)} == {"ctl"}
    # When the file changes Ticker's own section / Then the file wins
    write_atomic(inproc.config_path, ticker_config("file2", route("Ticker", "out2")))
    await next_until(inproc, "out", outstr_is("file2"))


def test_mmctl_reload_and_sighup_reread_a_file_the_watcher_cannot_see(mm, transit, tmp_path):
    # Given the config path is a symlink to a file in another directory (edits of the
    # target make no event in the watched directory)
    mm.task("Ticker", TICKER)
    target_dir = tmp_path / "etc"
    target_dir.mkdir()
    target = target_dir / "real.toml"
    mm.config(ticker_config("v1"), path=target)
    mm.config_path.symlink_to(target)
    daemon = mm.start("-o", "debug:2", "-d", "1")
    receive_until(transit, "out", outstr_is("v1"))
    # When the target is rewritten in place
    mm.config(ticker_config("v2"), path=target)
    # Then (no event) the ticks keep the old value
    assert {m["outstr"] for m in receive_n(transit, "out", 5)} == {"v1"}
    # When mmctl reload is run / Then the file is re-read and the new value shows
    mark = daemon.mark("stdout")
    status, _, err = mm.mmctl("reload")
    assert status == 0, err
    receive_until(transit, "out", outstr_is("v2"), timeout=3)
    # and the log says what changed
    daemon.wait_line("stdout", f"config reloaded from {mm.config_path}: Ticker changed",
                     start=mark)
    # When the target changes again and the daemon gets SIGHUP / Then likewise
    mm.config(ticker_config("v3"), path=target)
    daemon.proc.send_signal(signal.SIGHUP)
    receive_until(transit, "out", outstr_is("v3"), timeout=3)


async def test_router_config_by_control_message_validated_by_the_router_model(inproc):
    # Given a running ticker routed to "out"
    inproc.task("Ticker", FAST_TICKER)
    inproc.config(ticker_config("x"))
    inproc.capture("out")
    inproc.capture("out2")
    await inproc.start()
    await next_until(inproc, "out", outstr_is("x"))
    # When a Router config with a route lacking forwards arrives by control message
    status, _, err = await inproc.mmctl("config", "Router", '{"routes": [{"match": {}}]}')
    assert status == 1 and "Router.routes.0.forwards" in err, err
    # Then it is refused naming the field, and routing goes on as before
    line = inproc.records_of("error", "config for Router refused")[0].line
    assert "Router.routes.0.forwards" in line, line
    await next_n(inproc, "out", 3)
    # When a valid one re-routes to "out2" / Then it takes effect
    status, _, _ = await inproc.mmctl(
        "config", "Router",
        '{"routes": [{"match": {"source": "Ticker"}, "forwards": [{"qname": "out2"}]}]}')
    assert (await inproc.next("out2"))["outstr"] == "x"
