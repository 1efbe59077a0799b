"""Config unit tests: the task config file (TOML/JSON), reserved keys, task Config models, the
daemon's options and its ``-o`` out-of-band spec. No processes except where noted."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from pydantic import BaseModel, Field

from multimodule.cli.daemon import parse_options
from multimodule.config import (
    DaemonOptions,
    check_config,
    load_config_file,
    parse_config_text,
    validate_task_config,
)
from multimodule.errors import ConfigError
from multimodule.oob import Channels, Sink, default_spec, parse_spec

# -- file formats ---------------------------------------------------------------------------


def test_toml_file_parsed_by_extension(tmp_path: Path):
    # Given a .toml file with two task tables
    path = tmp_path / "tasks.toml"
    path.write_text('[Example1]\noutstr = "howdy"\nintervals = { emit = 0.5 }\n\n'
                    '[Router]\nroutes = [ { match = { source = "Example1" }, '
                    'forwards = [ { qname = "Example2" } ] } ]\n')
    # When it is loaded / Then each task's table comes back as written
    assert load_config_file(path) == {
        "Example1": {"outstr": "howdy", "intervals": {"emit": 0.5}},
        "Router": {"routes": [{"match": {"source": "Example1"},
                               "forwards": [{"qname": "Example2"}]}]},
    }


@pytest.mark.parametrize("name", ["tasks.json", "TASKS.JSON"])
def test_json_file_parsed_by_extension(tmp_path: Path, name: str):
    path = tmp_path / name
    path.write_text(json.dumps({"Example1": {"outstr": "howdy", "is_external": False}}))
    assert load_config_file(path) == {"Example1": {"outstr": "howdy", "is_external": False}}


def test_json_text_in_a_toml_named_file_is_a_toml_error(tmp_path: Path):
    # The extension decides: JSON text in config.toml is parsed as TOML (and refused)
    path = tmp_path / "config.toml"
    path.write_text('{"A": {}}')
    with pytest.raises(ConfigError, match=str(path)):
        load_config_file(path)


def test_empty_files_are_empty_configs(tmp_path: Path):
    (tmp_path / "a.toml").write_text("")
    (tmp_path / "b.json").write_text("  \n")
    assert load_config_file(tmp_path / "a.toml") == {}
    assert load_config_file(tmp_path / "b.json") == {}


def test_toml_syntax_error_names_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text('[A]\nx = 1\ny = \n')
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    text = str(info.value)
    assert str(path) in text and "line 3" in text, text


def test_json_syntax_error_names_file_line_and_column(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "A": {\n    "x": 1,\n  }\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    text = str(info.value)
    assert text.startswith(f"{path}: line 4 column 3"), text


def test_unreadable_file_names_the_file(tmp_path: Path):
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=f"{path}: cannot read"):
        load_config_file(path)


def test_non_utf8_file_refused(tmp_path: Path):
    path = tmp_path / "latin.toml"
    path.write_bytes(b'[A]\nx = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=f"{path}: cannot read"):
        load_config_file(path)


# -- structure and reserved keys --------------------------------------------------------------


@pytest.mark.parametrize("data, words", [
    pytest.param([1, 2], "the top level must be a table of tasks, not list", id="top-list"),
    pytest.param({"my-task": {}}, "'my-task' is not a valid task name", id="name-dash"),
    pytest.param({"1task": {}}, "'1task' is not a valid task name", id="name-digit"),
    pytest.param({"": {}}, "'' is not a valid task name", id="name-empty"),
    pytest.param({"A": 3}, "A: a task's config must be a table, not int", id="not-table"),
    # is_external is a bool: strings are refused, since the daemon tests the raw value's
    # truth ("no" would otherwise pass validation and mean true)
    pytest.param({"A": {"is_external": "yes"}}, "A.is_external:", id="external-yes"),
    pytest.param({"A": {"is_external": "no"}}, "A.is_external:", id="external-no"),
    pytest.param({"A": {"is_external": "false"}}, "A.is_external:", id="external-false"),
    pytest.param({"A": {"is_external": 1.5}}, "A.is_external:", id="external-float"),
    pytest.param({"A": {"intervals": {"tick": -1}}},
                 "A.intervals.tick: Input should be greater than or equal to 0.01",
                 id="interval-negative"),
    pytest.param({"A": {"intervals": {"tick": 0}}},
                 "A.intervals.tick: Input should be greater than or equal to 0.01",
                 id="interval-zero"),
    pytest.param({"A": {"intervals": {"save_state": 1e-9}}},
                 "A.intervals.save_state: Input should be greater than or equal to 0.01",
                 id="interval-tiny"),
    pytest.param({"A": {"intervals": {"tick": float("inf")}}},
                 "A.intervals.tick: Input should be a finite number", id="interval-inf"),
    pytest.param({"A": {"intervals": {"tick": "fast"}}}, "A.intervals.tick:",
                 id="interval-word"),
    pytest.param({"A": {"intervals": 5}}, "A.intervals:", id="intervals-not-table"),
    pytest.param({"A": {"limits": [1]}}, "A.limits:", id="limits-not-table"),
    # limits are checked with the file, not when the task is first started external
    pytest.param({"A": {"limits": {"nice": 99}}},
                 "A.limits.nice: Input should be less than or equal to 19", id="limits-nice"),
    pytest.param({"A": {"limits": {"memory_max": "lots"}}}, "A.limits.memory_max:",
                 id="limits-size"),
    pytest.param({"A": {"limits": {"rss_mb": 100}}}, "A.limits.rss_mb:",
                 id="limits-unknown"),
    pytest.param({"A": {"handler_timeout_s": 0}},
                 "A.handler_timeout_s: Input should be greater than or equal to 0.01",
                 id="handler-timeout-zero"),
    pytest.param({"A": {"handler_timeout_s": float("inf")}},
                 "A.handler_timeout_s: Input should be a finite number",
                 id="handler-timeout-inf"),
    pytest.param({"A": {"handler_timeout_s": "10"}}, "A.handler_timeout_s:",
                 id="handler-timeout-string"),
    pytest.param({"A": {"handler_timeout_s": True}}, "A.handler_timeout_s:",
                 id="handler-timeout-bool"),
])
def test_structure_errors_name_source_and_field(data, words):
    with pytest.raises(ConfigError) as info:
        check_config(data, "f.toml")
    text = str(info.value)
    assert text.startswith("f.toml: ") and words in text, text


def test_reserved_keys_accepted_and_other_keys_pass_through():
    data = {"A": {"is_external": True, "intervals": {"tick": 0.1, "save_state": 2},
                  "limits": {"memory_max": "512M", "nice": 5}, "handler_timeout_s": 2,
                  "anything": {"x": [1]}}}
    assert check_config(data, "f.toml") == data


def test_toml_reserved_key_error_names_file_and_field(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text("[Ticker]\nintervals = { tick = -1 }\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value).startswith(f"{path}: Ticker.intervals.tick:"), str(info.value)


def test_parse_config_text_json_and_toml_agree():
    toml = parse_config_text('[A]\nx = [1, "two"]\n[B]\n', "t.toml", "toml")
    jsn = parse_config_text('{"A": {"x": [1, "two"]}, "B": {}}', "t.json", "json")
    assert toml == jsn == {"A": {"x": [1, "two"]}, "B": {}}


# -- a task's own Config model ----------------------------------------------------------------


class Model(BaseModel):
    outstr: str = "default"
    count: int = Field(1, ge=1)


def test_task_model_fills_defaults_and_coerces_keeping_reserved_keys():
    config, settings = validate_task_config(
        "T", Model, {"count": "3", "intervals": {"tick": 1}}, "f.toml")
    assert isinstance(settings, Model)
    assert settings.count == 3 and settings.outstr == "default"
    assert config == {"count": 3, "outstr": "default", "intervals": {"tick": 1.0}}


def test_task_model_error_names_task_and_field():
    with pytest.raises(ConfigError) as info:
        validate_task_config("T", Model, {"count": 0}, "f.toml")
    assert str(info.value).startswith("f.toml: T.count: Input should be greater than or equal "
                                      "to 1"), str(info.value)


def test_toml_limits_error_names_file_and_field(tmp_path: Path):
    # Given a file whose task sets a nice value out of range
    path = tmp_path / "c.toml"
    path.write_text("[T]\nlimits = { nice = 99 }\n")
    # When it is checked / Then it is refused, naming the file and T.limits.nice
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value).startswith(f"{path}: T.limits.nice:"), str(info.value)


def test_task_config_with_reserved_tables_is_plain_json():
    # Given a task with a Config model, and a table with monitor and limits tables
    table = {"count": 2, "intervals": {"tick": 1}, "handler_timeout_s": 3,
             "monitor": {"open_fds": {"warn": 50, "severe": False}},
             "limits": {"memory_max": "512M", "nice": 5, "environment": {"A": "b"}}}
    # When it is validated
    config, settings = validate_task_config("T", Model, table, "f.toml")
    # Then the config holds plain JSON values (what `mmctl config` replies), the reserved
    # tables as given (no defaults added)
    assert orjson.loads(orjson.dumps(config)) == config
    assert config == {"count": 2, "outstr": "default", "intervals": {"tick": 1.0},
                      "handler_timeout_s": 3.0,
                      "monitor": {"open_fds": {"warn": 50.0, "severe": None}},
                      "limits": {"memory_max": "512M", "nice": 5, "environment": {"A": "b"}}}


def test_task_config_refuses_bad_reserved_keys_naming_the_field():
    with pytest.raises(ConfigError) as info:
        validate_task_config("T", Model, {"limits": {"nice": 99}}, "f.toml")
    assert str(info.value).startswith("f.toml: T.limits.nice:"), str(info.value)


def test_task_without_model_gets_its_table_as_is():
    table = {"anything": 1}
    config, settings = validate_task_config("T", None, table)
    assert config == table and config is not table and settings is None


# -- the daemon's options ---------------------------------------------------------------------


def test_daemon_options_from_the_command_line():
    opts = parse_options(["-c", "x.toml", "-s", "st", "-p", "a.,b.", "-o", "log:1",
                          "--task-path", "t1", "--task-path", "t2", "-d", "2",
                          "--slow-handler-s", "0.2", "-q", "Ctl"])
    assert opts.config_file == Path("x.toml") and opts.state_dir == Path("st")
    assert opts.prefixes == ["a.", "b."]
    assert opts.task_path == [Path("t1"), Path("t2")]
    assert (opts.debug, opts.slow_handler_s, opts.control_queue) == (2, 0.2, "Ctl")


def test_daemon_option_defaults():
    opts = parse_options([])
    assert opts == DaemonOptions()
    assert opts.control_queue == "MultiModule_control" and opts.prefixes == [""]
    assert opts.slow_handler_s == 0.5


@pytest.mark.parametrize("argv, words", [
    (["-o", "bogus:1"], "unknown out-of-band channel 'bogus'"),
    (["-o", "log"], "'log' is not CHANNEL:HANDLER"),
    (["-o", "log:"], "empty out-of-band handler"),
    (["-m", "not-a-task"], "'not-a-task' is not a task name"),
    (["-q", "a/b"], "-q/--control-queue: Value error, queue name 'a/b' contains a slash"),
    (["--slow-handler-s", "0"], "--slow-handler-s: Input should be greater than 0"),
    (["-d", "-1"], "-d/--debug: Input should be greater than or equal to 0"),
])
def test_bad_daemon_options_exit_2_with_the_reason(argv, words, capsys):
    # When the daemon's command line is bad / Then it exits 2 (usage) saying why
    with pytest.raises(SystemExit) as info:
        parse_options(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err, err


# -- the -o spec ------------------------------------------------------------------------------


def test_oob_spec_overrides_defaults_per_channel(monkeypatch):
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    sinks = parse_spec("error:1, alert:router,debug:/tmp/mm.debug,log:SomeQueue")
    assert (sinks["error"].kind, sinks["alert"].kind, sinks["alert"].target) == \
           ("stdout", "queue", "Router")
    assert (sinks["debug"].kind, sinks["debug"].target) == ("file", "/tmp/mm.debug")
    assert (sinks["log"].kind, sinks["log"].target) == ("queue", "SomeQueue")


def test_oob_defaults_outside_and_under_systemd(monkeypatch):
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    sinks = parse_spec("")
    assert [sinks[c].kind for c in ("log", "error", "alert", "debug")] == \
           ["stdout", "stderr", "stderr", "file"]
    assert sinks["debug"].target == "./debug.out"
    assert default_spec({"INVOCATION_ID": "abc"}) == \
           "log:journal,error:journal,alert:journal,debug:journal"


@pytest.mark.parametrize("spec, words", [
    ("bogus:1", "unknown out-of-band channel 'bogus'"),
    ("log", "is not CHANNEL:HANDLER"),
    ("log:", "empty out-of-band handler"),
])
def test_oob_spec_errors(spec, words):
    with pytest.raises(ConfigError, match=words):
        parse_spec(spec)


def test_oob_file_sink_and_debug_level(tmp_path: Path):
    # Given a log file sink and debug level 1
    path = tmp_path / "log.txt"
    channels = Channels({"log": Sink("file", str(path)), "error": Sink("file", str(path)),
                         "alert": Sink("file", str(path)), "debug": Sink("file", str(path))},
                        debug_level=1)
    # When records are emitted, one debug record above the level
    channels.emit("log", "T", "hello", n=1)
    channels.emit("error", "T", "bad", detail={"a": 1})
    channels.emit("debug", "T", "shown", level=1)
    channels.emit("debug", "T", "hidden", level=2)
    channels.close()
    # Then the lines have the documented shapes, each after the time it was emitted, and the
    # level filters
    lines = path.read_text().splitlines()
    times = [datetime.fromisoformat(line.split(" ", 1)[0]) for line in lines]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    assert [line.split(" ", 1)[1] for line in lines] == [
        "T: hello n=1", 'error: T: bad detail={"a":1}', "debug: T: shown",
    ]
    assert channels.counts == {"log": 1, "error": 1, "alert": 0, "debug": 1}


def test_oob_queue_sink_sends_a_record():
    sent = []
    channels = Channels({"log": Sink("queue", "Logs"), "error": Sink("stderr"),
                         "alert": Sink("stderr"), "debug": Sink("stderr")},
                        send=lambda q, m: sent.append((q, m)))
    channels.emit("log", "T", "hello", n=1)
    assert len(sent) == 1
    qname, record = sent[0]
    assert qname == "Logs"
    assert {k: record[k] for k in ("channel", "task", "text", "n")} == \
           {"channel": "log", "task": "T", "text": "hello", "n": 1}


def test_an_external_tasks_process_inherits_the_daemons_published_options(tmp_path):
    from multimodule.config import INHERITED_OPTIONS, inherit_options, options_path

    published = {"oob": "error:errs", "debug": 2, "monitor_interval_s": 0.5,
                 "monitor_window_s": 3.0, "slow_handler_s": 0.25, "journal": False,
                 "journal_fsync": True, "outbox_max_bytes": 65536, "control_queue": "Ctl"}
    assert set(published) == set(INHERITED_OPTIONS)
    options_path(tmp_path).write_text(json.dumps(published))
    # Given the process of task T, its own command line setting only -d
    own = DaemonOptions.model_validate({"module": "T", "state_dir": tmp_path, "debug": 1})
    # Then it takes the rest from the daemon, and keeps what it was given
    got = inherit_options(own)
    assert (got.oob, got.debug, got.monitor_interval_s, got.slow_handler_s, got.journal,
            got.journal_fsync, got.outbox_max_bytes, got.control_queue) == \
        ("error:errs", 1, 0.5, 0.25, False, True, 65536, "Ctl")
    # The daemon itself (no -m) inherits nothing; a bad file is a ConfigError naming it
    daemon = DaemonOptions.model_validate({"state_dir": tmp_path})
    assert inherit_options(daemon) is daemon
    options_path(tmp_path).write_text('{"monitor_interval_s": -1}')
    with pytest.raises(ConfigError, match="daemon-options.json: monitor_interval_s"):
        inherit_options(own)
