"""Shell completion for mmctl: the shipped scripts are what mmctl's parser gives, and real bash
and zsh complete commands, options, and the running daemon's task names with them.

Bash is driven as bash-completion drives it: COMP_WORDS and COMP_CWORD set, the completion
function called, COMPREPLY printed. Zsh runs interactively on a pseudo-terminal with its
completion system loaded, a command line and a TAB are typed, and a wrapper of compadd writes
the candidates that match to a file.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multimodule.cli import completion
from multimodule.cli.mmctl import build_parser
from multimodule.transit import Transit

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "packaging" / "completion"
BASH_SCRIPT = SCRIPTS / "mmctl.bash"
ZSH_DIR = SCRIPTS

TASKS = {
    "Alpha": """
        from multimodule import Task
        class Alpha(Task):
            def message(self, message):
                self.emit(message)
    """,
    "Beta": """
        from multimodule import Task
        class Beta(Task):
            is_stateful = True
    """,
}


def need(program: str) -> str:
    """The path of ``program``; skips without it, except under CI (set-up installs it)."""
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is missing (scripts/setup installs it as root)")
        pytest.skip(f"{program} is not installed (scripts/setup installs it as root)")
    return path


@pytest.fixture
def program(tmp_path: Path) -> Path:
    """An ``mmctl`` command running this checkout's mmctl (as the installed one would)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    path = bindir / "mmctl"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} -m multimodule.cli.mmctl "$@"\n')
    path.chmod(0o755)
    return path


def bash_complete(words: list[str], env: dict[str, str], cwd: Path
                  ) -> tuple[list[str], str, float]:
    """Complete the last of ``words`` (the command line up to the cursor, split as bash
    splits it) with the shipped script; return (COMPREPLY, bash's stderr, seconds taken)."""
    code = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); '
            '_mmctl "$1" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"; '
            'printf "%s\\n" "${COMPREPLY[@]}"')
    started = time.monotonic()
    result = subprocess.run([need("bash"), "--norc", "--noprofile", "-c", code, "bash",
                             str(BASH_SCRIPT), *words],
                            env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result
    return [line for line in result.stdout.splitlines() if line], result.stderr, elapsed


def start_two_tasks(mm):
    for name, source in TASKS.items():
        mm.task(name, source)
    mm.config("[Alpha]\n[Beta]\n")
    return mm.start()


# -- the scripts are the parser's ----------------------------------------------------------


def test_shipped_scripts_are_generated_from_the_parser():
    for name, text in completion.scripts().items():
        shipped = SCRIPTS / name
        assert shipped.read_text() == text, (
            f"{shipped} is not what mmctl's parser gives: run python3 -m "
            "multimodule.cli.completion --write packaging/completion")


def test_generated_scripts_follow_a_changed_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    extra = sub.add_parser("frobnicate", help="a command mmctl does not have")
    extra.add_argument("--with-gusto", action="store_true")
    extra.add_argument("task", metavar="TASK")
    bash = completion.bash_script(parser)
    zsh = completion.zsh_script(parser)
    assert ("    frobnicate)\n        options='-h --help --with-gusto'\n        valued='  '\n"
            "        positionals='task' ;;\n") in bash
    assert f"_mmctl_commands='{' '.join(build_parser().subcommands)} frobnicate'" in bash
    assert "'frobnicate:a command mmctl does not have'" in zsh
    frobnicate = zsh.split("    (frobnicate)\n")[1].split(";;")[0]
    assert "'(--with-gusto)--with-gusto[]'" in frobnicate
    assert "'1:TASK:_mmctl_names tasks'" in frobnicate


# -- bash ------------------------------------------------------------------------------------


def test_bash_completes_the_commands(tmp_path, child_env, program):
    commands = list(build_parser().subcommands)
    got, err, _ = bash_complete([str(program), ""], child_env, tmp_path)
    assert got == commands and err == ""
    got, err, _ = bash_complete([str(program), "st"], child_env, tmp_path)
    assert got == [c for c in commands if c.startswith("st")] and err == ""
    assert {"state", "status", "start", "stop"} <= set(got)
    # After global options, their values skipped.
    got, _, _ = bash_complete([str(program), "-T", str(tmp_path), "-q", "Q", "re"],
                              child_env, tmp_path)
    assert got == [c for c in commands if c.startswith("re")]
    assert {"recv", "reload", "restart"} <= set(got)


def test_bash_completes_a_commands_options(tmp_path, child_env, program):
    recv = build_parser().subcommands["recv"]
    longs = [flag for action in recv._actions for flag in action.option_strings
             if flag.startswith("--")]
    got, err, _ = bash_complete([str(program), "recv", "--"], child_env, tmp_path)
    assert got == longs == ["--help", "--transit-dir", "--control-queue", "--count",
                            "--timeout"]
    assert err == ""
    got, _, _ = bash_complete([str(program), "migrate", "--in"], child_env, tmp_path)
    assert got == ["--internal"]
    # An option's value: a directory for -T, nothing for a number.
    (tmp_path / "somedir").mkdir()
    (tmp_path / "somefile").write_text("")
    got, _, _ = bash_complete([str(program), "recv", "-T", "so"], child_env, tmp_path)
    assert got == ["somedir"]
    got, _, _ = bash_complete([str(program), "recv", "--count", ""], child_env, tmp_path)
    assert got == []
    # A command with no argument left offers its options on an empty word.
    got, _, _ = bash_complete([str(program), "reload", ""], child_env, tmp_path)
    assert "--wait" in got and "--help" in got


def test_bash_completes_the_running_daemons_task_names(mm, tmp_path, child_env, program):
    start_two_tasks(mm)
    got, err, _ = bash_complete([str(program), "state", ""], child_env, tmp_path)
    assert got == ["Alpha", "Beta", "Router"] and err == ""
    got, err, _ = bash_complete([str(program), "failsafe", "--reason", "x", "B"],
                                child_env, tmp_path)
    assert got == ["Beta"] and err == ""
    # Only the first argument of config is a task.
    got, _, _ = bash_complete([str(program), "config", "Alpha", ""], child_env, tmp_path)
    assert got == []
    # The -T of the command line is passed on (the environment names another directory).
    env = {**child_env, "MULTIMODULE_TRANSIT_DIR": str(tmp_path / "elsewhere")}
    got, _, _ = bash_complete([str(program), "-T", str(mm.transit_dir), "migrate", "A"],
                              env, tmp_path)
    assert got == ["Alpha"]
    got, _, _ = bash_complete([str(program), "migrate", "A"], env, tmp_path)
    assert got == []
    # And so is -q: no daemon serves that control queue.
    got, err, _ = bash_complete([str(program), "state", "-q", "Other", ""], child_env,
                                tmp_path)
    assert got == [] and err == ""
    # Queue names for send and recv, from the transit directory.
    got, _, _ = bash_complete([str(program), "send", "A"], child_env, tmp_path)
    assert got == ["Alpha"]
    got, _, _ = bash_complete([str(program), "recv", ""], child_env, tmp_path)
    assert {"Alpha", "Beta", "Router", "MultiModule_control"} <= set(got)


def test_bash_task_names_without_a_daemon_are_none_quickly_and_quietly(
        mm, tmp_path, child_env, program, transit_dir):
    # No transit directory at all: nothing, and none made.
    got, err, elapsed = bash_complete([str(program), "state", ""], child_env, tmp_path)
    assert got == [] and err == ""
    assert not transit_dir.exists()
    assert elapsed < completion.HELPER_WAIT_S + 10
    # A daemon ran and stopped: its control queue is left, nobody answers it.
    start_two_tasks(mm).stop_ok()
    assert Transit(transit_dir).exists("MultiModule_control")
    got, err, elapsed = bash_complete([str(program), "unfailsafe", ""], child_env, tmp_path)
    assert got == [] and err == ""
    # The helper knows nobody holds the queue: it does not wait for an answer.
    started = time.monotonic()
    result = subprocess.run([str(program), "__complete", "tasks", "--wait", "60"],
                            env=child_env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30
    assert (result.returncode, result.stdout, result.stderr) == (3, "", "")


def test_helper_is_quiet_on_bad_arguments(tmp_path, child_env, program):
    result = subprocess.run([str(program), "__complete", "nonsense"], env=child_env,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", "")


# -- zsh -------------------------------------------------------------------------------------


def test_zsh_script_loads_and_defines_mmctl(tmp_path):
    code = (f"fpath=({ZSH_DIR} $fpath); autoload -Uz compinit; compinit -u -D; "
            "autoload -Uz +X _mmctl; print -r -- $_comps[mmctl] $+functions[_mmctl]")
    result = subprocess.run([need("zsh"), "-f", "-c", code], env={**os.environ,
                            "HOME": str(tmp_path)}, cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "_mmctl 1\n", "")


#: Typed into an interactive ``zsh -f`` before a completion: the completion system with the
#: shipped function, and compadd wrapped to write the matching candidates to OUT (those of
#: calls that only ask, -O/-A/-D, are not candidates), then "-- done" when completion ends.
ZSH_SETUP = r"""PS1='%% '
fpath=(SCRIPTS $fpath)
autoload -Uz compinit && compinit -u -D
bindkey '^I' complete-word
compadd() {
  if (( ! ${@[(I)-[OAD]]} )); then
    local -a __got
    builtin compadd -O __got "$@"
    (( $#__got )) && print -rl -- $__got >>OUT
  fi
  builtin compadd "$@"
}
__done() { print -r -- '-- done' >>OUT }
comppostfuncs=(__done)
print -r -- '-- ready' >>OUT
"""


def zsh_complete(line: str, env: dict[str, str], cwd: Path, program: Path
                 ) -> tuple[list[str], str]:
    """Type ``line`` and a TAB into an interactive zsh with the shipped completion, ``mmctl``
    being ``program``; return (the candidates offered, what the terminal showed)."""
    zsh = need("zsh")
    out = cwd / "zsh-candidates"
    out.unlink(missing_ok=True)
    env = {**env, "HOME": str(cwd), "TERM": "xterm",
           "PATH": f"{program.parent}{os.pathsep}{env.get('PATH', os.defpath)}"}
    master, slave = os.openpty()
    proc = subprocess.Popen([zsh, "-f", "-i"], stdin=slave, stdout=slave, stderr=slave,
                            env=env, cwd=cwd, start_new_session=True)
    os.close(slave)
    shown = bytearray()

    def until(marker: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not (out.exists() and marker in out.read_text()):
            assert proc.poll() is None, f"zsh exited: {shown.decode(errors='replace')}"
            assert time.monotonic() < deadline, \
                f"no {marker!r} from zsh within {timeout} s: {shown.decode(errors='replace')}"
            if select.select([master], [], [], 0.05)[0]:
                shown.extend(os.read(master, 65536))

    try:
        os.write(master, ZSH_SETUP.replace("SCRIPTS", str(ZSH_DIR))
                 .replace("OUT", str(out)).encode())
        until("-- ready")
        os.write(master, line.encode() + b"\t")
        until("-- done")
    finally:
        proc.kill()
        proc.wait(10)
        os.close(master)
    lines = out.read_text().splitlines()
    return lines[lines.index("-- ready") + 1:lines.index("-- done")], \
        shown.decode(errors="replace")


def assert_no_zsh_errors(shown: str) -> None:
    # zsh reports an error in a function as "NAME:LINE: message".
    assert not re.search(r"\w:\d+: ", shown) and "Traceback" not in shown \
        and "mmctl:" not in shown, shown


def test_zsh_completes_commands_and_options(tmp_path, child_env, program):
    got, shown = zsh_complete("mmctl st", child_env, tmp_path, program)
    assert sorted(got) == sorted(c for c in build_parser().subcommands if c.startswith("st"))
    assert_no_zsh_errors(shown)
    recv = build_parser().subcommands["recv"]
    longs = {flag for action in recv._actions for flag in action.option_strings
             if flag.startswith("--")}
    got, shown = zsh_complete("mmctl recv --", child_env, tmp_path, program)
    assert set(got) == longs
    assert_no_zsh_errors(shown)
    # The options of a mutually exclusive group exclude each other.
    got, _ = zsh_complete("mmctl migrate --external --", child_env, tmp_path, program)
    assert "--internal" not in got and "--wait" in got


def test_zsh_completes_the_running_daemons_task_names(mm, tmp_path, child_env, program):
    got, shown = zsh_complete("mmctl state ", child_env, tmp_path, program)
    assert got == []  # no daemon yet
    assert_no_zsh_errors(shown)
    start_two_tasks(mm)
    got, shown = zsh_complete("mmctl state ", child_env, tmp_path, program)
    assert sorted(got) == ["Alpha", "Beta", "Router"]
    assert_no_zsh_errors(shown)
    env = {**child_env, "MULTIMODULE_TRANSIT_DIR": str(tmp_path / "elsewhere")}
    got, _ = zsh_complete(f"mmctl --transit-dir={mm.transit_dir} failsafe B", env, tmp_path,
                          program)
    assert got == ["Beta"]
    got, _ = zsh_complete("mmctl failsafe B", env, tmp_path, program)
    assert got == []
