"""Following the config file: changes take effect within a second (atomic rename or in-place
write), bad files are refused while the old config keeps running, a task module that failed
to import is tried again when the config changes, control-message overrides vs the file."""

from __future__ import annotations

import json
import signal
import time

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


def test_json_config_file_followed_too(mm, transit, tmp_path):
    mm.task("Ticker", TICKER)
    path = tmp_path / "config.json"
    routes = '{"routes": [{"match": {"source": "Ticker"}, "forwards": [{"qname": "out"}]}]}'
    mm.config('{"Ticker": {"outstr": "j1"}, "Router": %s}' % routes, path=path)
    mm.start(config=path)
    receive_until(transit, "out", outstr_is("j1"))
    written = time.monotonic()
    mm.config('{"Ticker": {"outstr": "j2"}, "Router": %s}' % routes, path=path, atomic=True)
    assert_change_seen_within(transit, "j1", "j2", written)


def test_bad_config_files_refused_old_config_keeps_running(mm, transit):
    # Given a ticker emitting "good", routed by the Router to "out"
    mm.task("Ticker", TICKER)
    mm.config(ticker_config("good"))
    daemon = mm.start()
    receive_until(transit, "out", outstr_is("good"))
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
        mark = daemon.mark("stderr")
        mm.config(text, atomic=True)
        # Then the error channel says it was refused, naming the file and the problem
        _, line = daemon.wait_line("stderr", "config refused", start=mark)
        assert "the previous config stays in force" in line, line
        assert str(mm.config_path) in line and words in line, (words, line)
        # and the old config keeps working: ticks still flow, routed, with the old outstr
        assert [m["outstr"] for m in receive_n(transit, "out", 3)] == ["good"] * 3
        # and `mmctl reload` of that file fails, saying why
        status, _, err = mm.mmctl("reload")
        assert status == 1 and words in err and str(mm.config_path) in err, err
    # When a good file follows / Then it is taken
    written = time.monotonic()
    mm.config(ticker_config("fixed"), atomic=True)
    assert_change_seen_within(transit, "good", "fixed", written)


def test_task_module_with_syntax_error_reported_and_retried_when_config_changes(mm, transit):
    # Given a task module with a syntax error, configured beside a working Ticker
    mm.task("Ticker", TICKER)
    mm.task("Broken", "from multimodule import Task\n\nclass Broken(Task:\n    pass\n")
    mm.config('[Broken]\n\n' + ticker_config("alive", route("Broken", "out")))
    # When the daemon starts
    daemon = mm.start()
    # Then the error names the module and the SyntaxError
    line = daemon.expect("stderr", "task module Broken failed to import")
    assert "SyntaxError" in line, line
    # and the other task keeps running
    receive_until(transit, "out", outstr_is("alive"))
    status, out, _ = mm.mmctl("status", "--json")
    report = json.loads(out)
    assert "SyntaxError" in report["import_failures"]["Broken"]
    assert "Broken" not in report["tasks"]
    # When the module is fixed and the config changed
    mm.task("Broken", """
        from multimodule import Task

        class Broken(Task):
            def set_config(self, config):
                self.emit({"fixed": True, "config": dict(config)})
    """)
    mm.config('[Broken]\nnote = "retry"\n\n' + ticker_config("alive", route("Broken", "out")),
              atomic=True)
    # Then the task loads with the new config
    message, _ = receive_until(transit, "out", lambda m: m.get("source") == "Broken")
    assert message["fixed"] is True and message["config"] == {"note": "retry"}
    status, out, _ = mm.mmctl("status", "--json")
    report = json.loads(out)
    assert "Broken" in report["tasks"] and report["import_failures"] == {}


def test_file_change_overrides_control_message_config_of_that_task_only(mm, transit):
    # Given a ticker whose config was replaced by a control message
    mm.task("Ticker", TICKER)
    mm.config(ticker_config("file1"))
    mm.start()
    receive_until(transit, "out", outstr_is("file1"))
    mm.mmctl("config", "Ticker", '{"outstr": "ctl"}')
    receive_until(transit, "out", outstr_is("ctl"))
    # When the file changes another task's section only (a second route for Ticker)
    mm.config(ticker_config("file1", route("Ticker", "out2")), atomic=True)
    transit.receive("out2", timeout=5)  # the new route is in force
    # Then the control message's config stays in force
    receive_n(transit, "out2", 1)
    assert {m["outstr"] for m in receive_n(transit, "out", 3)} == {"ctl"}
    # When the file changes Ticker's own section / Then the file wins
    mm.config(ticker_config("file2", route("Ticker", "out2")), atomic=True)
    receive_until(transit, "out", outstr_is("file2"), timeout=3)


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


def test_router_config_by_control_message_validated_by_the_router_model(mm, transit):
    # Given a running ticker routed to "out"
    mm.task("Ticker", TICKER)
    mm.config(ticker_config("x"))
    daemon = mm.start()
    receive_until(transit, "out", outstr_is("x"))
    # When a Router config with a route lacking forwards arrives by control message
    status, _, err = mm.mmctl("config", "Router", '{"routes": [{"match": {}}]}')
    assert status == 1 and "Router.routes.0.forwards" in err, err
    # Then it is refused naming the field, and routing goes on as before
    line = daemon.expect("stderr", "config for Router refused")
    assert "Router.routes.0.forwards" in line, line
    receive_n(transit, "out", 3)
    # When a valid one re-routes to "out2" / Then it takes effect
    status, _, _ = mm.mmctl(
        "config", "Router",
        '{"routes": [{"match": {"source": "Ticker"}, "forwards": [{"qname": "out2"}]}]}')
    assert transit.receive("out2", timeout=5)["outstr"] == "x"
