"""Shell completion for ``mmctl``: bash and zsh scripts generated from its argument parser,
and the hidden helper they call for names only the system knows.

``python -m multimodule.cli.completion bash`` (or ``zsh``) prints a script;
``python -m multimodule.cli.completion --write DIR`` writes both, as ``DIR/mmctl.bash`` and
``DIR/_mmctl`` (the files shipped in ``packaging/completion``; a test checks they are what the
parser gives). The scripts complete the commands, their options (with a directory for a
``DIR``), the names of the running daemon's tasks for a ``TASK`` and the names of the transit
directory's queues for a ``QNAME``. For those names they run ``mmctl __complete tasks`` or
``mmctl __complete queues`` (see :func:`helper`), passing on the ``-T``/``-q`` options of the
command line being completed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

#: The first argument that makes ``mmctl`` run :func:`helper` instead of a command.
HELPER = "__complete"
#: Seconds the helper waits for the daemon's answer by default.
HELPER_WAIT_S = 1.0
#: Argument kinds the scripts complete, by metavar; other arguments get nothing.
KINDS = {"DIR": "directory", "TASK": "task", "QNAME": "queue"}
#: The files :func:`write` makes, by shell.
FILES = {"bash": "mmctl.bash", "zsh": "_mmctl"}


# -- the helper ------------------------------------------------------------------------------


def helper(argv: Sequence[str]) -> int:
    """``mmctl __complete tasks|queues [-T DIR] [-q QNAME] [--wait S]``: print the names of
    the tasks the daemon knows, or of the queues of the transit directory, one a line, sorted.

    Made for completion: it never writes to standard error, never creates the transit
    directory or a queue other than its own reply queue, and returns at once when no daemon
    holds the control queue. Returns 0 when names were printed (maybe none), 2 for bad
    arguments, 3 when no daemon answered or the transit directory cannot be used; it prints
    nothing then.
    """
    from multimodule.cli import mmctl

    parser = argparse.ArgumentParser(prog=f"mmctl {HELPER}", parents=[mmctl._transit_options()],
                                     add_help=False)
    parser.add_argument("what", choices=("tasks", "queues"))
    parser.add_argument("--wait", type=mmctl._seconds, default=HELPER_WAIT_S)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(argv)
            names = _task_names(args) if args.what == "tasks" else _queue_names(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else mmctl.EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception:  # whatever the reason: no names, and no noise in the user's shell
        names = None
    if names is None:
        return mmctl.EXIT_NOT_RUNNING
    sys.stdout.write("".join(f"{name}\n" for name in names))
    sys.stdout.flush()
    return mmctl.EXIT_OK


def _transit(args: argparse.Namespace):
    """The transit directory's :class:`Transit`, or ``None`` if the directory does not exist
    (it is not made for a completion)."""
    from multimodule.transit import Transit, default_transit_dir

    path = Path(getattr(args, "transit_dir", None) or default_transit_dir())
    return Transit(path) if path.is_dir() else None


def _queue_names(args: argparse.Namespace) -> list[str] | None:
    transit = _transit(args)
    if transit is None:
        return None
    return [name for name in transit.directory.names() if not name.startswith("mmctl-reply-")]


def _task_names(args: argparse.Namespace) -> list[str] | None:
    from multimodule.cli import mmctl

    transit = _transit(args)
    qname = getattr(args, "control_queue", mmctl.DEFAULT_CONTROL_QUEUE)
    if transit is None or not transit.exists(qname) or \
            not daemon_may_run(transit.path, qname):
        return None
    ask = argparse.Namespace(transit_dir=str(transit.path), control_queue=qname,
                             wait=args.wait, prog="mmctl", warned=True)
    status = mmctl._ask(ask, {"query": "status"})["status"]
    names = {row["name"] for row in status.get("rows", []) if row.get("kind") != "daemon"}
    for part in ("tasks", "externals", "failsafe"):
        if isinstance(status.get(part), dict):
            names.update(status[part])
    return sorted(names)


def daemon_may_run(transit_dir: Path, control_queue: str) -> bool:
    """Whether a daemon may be serving ``control_queue`` in ``transit_dir``: ``False`` only
    when that is sure (no daemon ever took the queue's lock there, ``.daemon-QNAME.lock``, or
    the process whose pid that file holds is gone); ``True`` when it runs or this cannot be
    told (the lock file belongs to another user, or is being written)."""
    lock = transit_dir / f".daemon-{control_queue}.lock"
    try:
        # Never blocks: not on a FIFO put in its place, not through a symbolic link.
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        text = os.read(fd, 32).strip()
    except OSError:
        return True
    finally:
        os.close(fd)
    if not text.isdigit() or not 0 < int(text) <= 2**22:  # PID_MAX_LIMIT
        return True
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, another user's
    return True


# -- what the parser says --------------------------------------------------------------------


@dataclass
class Option:
    """One option: its spellings (``["-T", "--transit-dir"]``), whether it takes a value, the
    value's metavar and kind (a key of :data:`KINDS` values, or ``None``), its help, and the
    spellings of the options it excludes (its own included)."""

    flags: list[str]
    takes_value: bool
    metavar: str | None
    kind: str | None
    help: str
    excludes: list[str]


@dataclass
class Positional:
    """One positional argument: metavar, kind (as for :class:`Option`), help, optional,
    repeated (any number of words: the last positional only)."""

    metavar: str
    kind: str | None
    help: str
    optional: bool
    repeated: bool = False


@dataclass
class Command:
    """A parser: its name (``""`` for ``mmctl`` itself), help, options, positionals."""

    name: str
    help: str
    options: list[Option] = field(default_factory=list)
    positionals: list[Positional] = field(default_factory=list)


def _short_help(text: str | None) -> str:
    """The first clause of a help text (what comes before a parenthesis or a semicolon)."""
    text = " ".join((text or "").split())
    for stop in (" (", "; "):
        text = text.split(stop)[0]
    return text


def describe(parser: argparse.ArgumentParser) -> tuple[Command, list[Command]]:
    """``parser`` (``mmctl``'s) as ``(the top-level command, the subcommands in order)``.
    Subcommands without help (hidden) are left out. Raises :class:`ValueError` for an
    argument the scripts cannot complete (a positional taking a fixed number of words)."""
    top = _command("", "", parser)
    commands = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                commands.append(_command(choice.dest, _short_help(choice.help),
                                         action.choices[choice.dest]))
    return top, commands


def _command(name: str, help_text: str, parser: argparse.ArgumentParser) -> Command:
    command = Command(name, help_text)
    groups = {id(a): g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        metavar = action.metavar if isinstance(action.metavar, str) else None
        if action.option_strings:
            group = groups.get(id(action))
            excludes = [flag for other in (group._group_actions if group else [action])
                        for flag in other.option_strings]
            takes_value = action.nargs != 0
            command.options.append(Option(
                list(action.option_strings), takes_value, metavar if takes_value else None,
                KINDS.get(metavar or "") if takes_value else None, _short_help(action.help),
                excludes))
        else:
            if action.nargs not in (None, "?", "*", "+"):
                raise ValueError(f"mmctl {name}: cannot complete {metavar} "
                                 f"(nargs={action.nargs!r})")
            command.positionals.append(Positional(
                metavar or action.dest.upper(), KINDS.get(metavar or ""),
                _short_help(action.help), action.nargs in ("?", "*"),
                action.nargs in ("*", "+")))
    return command


# -- bash ------------------------------------------------------------------------------------

_BASH_HEAD = """\
# bash completion for mmctl                                       -*- shell-script -*-
# Generated from mmctl's argument parser by `python3 -m multimodule.cli.completion --write
# packaging/completion`: do not edit. Task names come from the running daemon
# (`mmctl __complete tasks`), queue names from the transit directory (`mmctl __complete
# queues`); with no daemon, a TASK gets nothing.

# _mmctl_spec COMMAND: sets options (COMMAND's options), valued (" OPTION=KIND " for each
# option taking a value; KIND "-" for none) and positionals (the kinds of its arguments).
# Returns 1 for an unknown command.
_mmctl_spec() {
    case $1 in
"""

_BASH_TAIL = """\
    *) return 1 ;;
    esac
}

_mmctl_commands='@COMMANDS@'

# _mmctl_names KIND: the names of KIND (tasks or queues) starting with $cur, into COMPREPLY.
_mmctl_names() {
    local name names=()
    mapfile -t names < <("$program" __complete "$1" "${helper[@]}" 2>/dev/null </dev/null)
    for name in "${names[@]}"; do
        [[ $name == "$cur"* ]] || continue
        printf -v name %q "$name"
        COMPREPLY+=("$name")
    done
}

_mmctl() {
    local cur=${COMP_WORDS[COMP_CWORD]} program=${1:-mmctl} command='' kind='' word value
    local options valued positionals globals helper=() i=1 npos=0
    [[ $program == '~/'* ]] && program=$HOME/${program#'~/'}
    COMPREPLY=()
    _mmctl_spec ''
    globals=$valued
    while (( i < COMP_CWORD )); do
        word=${COMP_WORDS[i]}
        if [[ $word == -* && $valued == *" $word="* ]]; then
            kind=${valued#* "$word"=}
            kind=${kind%% *}
            (( i + 1 < COMP_CWORD )) && [[ ${COMP_WORDS[i + 1]} == = ]] && (( i++ ))
            if (( i + 1 == COMP_CWORD )); then
                [[ $cur == = ]] && return 0  # OPTION= : the value comes after the '='
                break  # the cursor is on this option's value
            fi
            value=${COMP_WORDS[i + 1]}
            [[ $value == '~/'* ]] && value=$HOME/${value#'~/'}
            [[ $globals == *" $word="* ]] && helper+=("$word" "$value")
            kind=''
            (( i += 2 ))
            continue
        fi
        if [[ $word != -* ]]; then
            if [[ -z $command ]]; then
                command=$word
                _mmctl_spec "$command" || return 0
            else
                (( npos++ ))
            fi
        fi
        (( i++ ))
    done
    if [[ -z $kind && $cur != -* ]]; then
        if [[ -z $command ]]; then
            kind=command
        else
            local rest=($positionals)
            kind=${rest[npos]:-}
            if [[ -z $kind && ${#rest[@]} -gt 0 && ${rest[-1]} == *'*' ]]; then
                kind=${rest[-1]}  # a last positional taking any number of words
            fi
            kind=${kind%'*'}
            [[ -z $kind && -z $cur && $npos -ge ${#rest[@]} ]] && kind=option
        fi
    elif [[ -z $kind ]]; then
        kind=option
    fi
    case $kind in
    command)
        for word in $_mmctl_commands; do
            [[ $word == "$cur"* ]] && COMPREPLY+=("$word")
        done ;;
    option)
        for word in $options; do
            [[ $word == "$cur"* ]] && COMPREPLY+=("$word")
        done ;;
    directory)
        compopt -o filenames 2>/dev/null
        mapfile -t COMPREPLY < <(compgen -d -- "$cur") ;;
    task) _mmctl_names tasks ;;
    queue) _mmctl_names queues ;;
    esac
    return 0
}

complete -F _mmctl mmctl
"""


def bash_script(parser: argparse.ArgumentParser) -> str:
    """The bash completion script for ``parser`` (``mmctl``'s), as text."""
    top, commands = describe(parser)
    lines = [_BASH_HEAD]
    for command in [top, *commands]:
        options = " ".join(f for o in command.options for f in o.flags)
        valued = " ".join(f"{f}={o.kind or '-'}" for o in command.options if o.takes_value
                          for f in o.flags)
        positionals = " ".join((p.kind or "-") + ("*" if p.repeated else "")
                               for p in command.positionals)
        lines.append(f"    {command.name or chr(39) * 2})\n"
                     f"        options='{options}'\n"
                     f"        valued=' {valued} '\n"
                     f"        positionals='{positionals}' ;;\n")
    lines.append(_BASH_TAIL)
    names = " ".join(c.name for c in commands)
    return "".join(lines).replace("@COMMANDS@", names, 1)


# -- zsh -------------------------------------------------------------------------------------

_ZSH_HEAD = """\
#compdef mmctl
# zsh completion for mmctl. Generated from mmctl's argument parser by `python3 -m
# multimodule.cli.completion --write packaging/completion`: do not edit. Task names come
# from the running daemon (`mmctl __complete tasks`), queue names from the transit directory
# (`mmctl __complete queues`); with no daemon, a TASK gets nothing.

# _mmctl_names [OPTIONS] KIND: offer the names of KIND (tasks or queues), asking the mmctl
# being completed with the -T and -q options of its command line (_arguments puts its
# description options before KIND).
_mmctl_names() {
  local kind=${argv[-1]} program=${(Q)_mmctl_words[1]} word value i expl
  local -a helper names
  [[ $program == '~/'* ]] && program=$HOME/${program#'~/'}
  for (( i = 2; i < ${#_mmctl_words}; i++ )); do
    word=${_mmctl_words[i]}
    value=${(Q)_mmctl_words[i+1]}
    [[ $value == '~/'* ]] && value=$HOME/${value#'~/'}
    case $word in
"""

_ZSH_MIDDLE = """\
    esac
  done
  names=(${(f)"$($program __complete $kind $helper 2>/dev/null </dev/null)"})
  _wanted $kind expl ${kind%s} compadd -a names
}

_mmctl_commands() {
  local -a commands=(
"""

_ZSH_TAIL = """\
  )
  _describe -t commands 'mmctl command' commands
}

_mmctl() {
  local curcontext=$curcontext state line ret=1
  local -a _mmctl_words=("${(@)words[1,CURRENT-1]}")
  _arguments -C : \\
"""


def _zsh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _zsh_action(kind: str | None) -> str:
    return {"directory": "_directories", "task": "_mmctl_names tasks",
            "queue": "_mmctl_names queues"}.get(kind or "", " ")


def _zsh_specs(command: Command) -> list[str]:
    """The ``_arguments`` specs of ``command``'s options and positionals."""
    specs = []
    for option in command.options:
        help_text = option.help.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
        exclusion = "(" + " ".join(option.excludes) + ")"
        if option.flags == ["-h", "--help"] or "--help" in option.flags:
            exclusion = "(- *)"
        for flag in option.flags:
            spec = f"{exclusion}{flag}"
            if option.takes_value:
                spec += "=" if flag.startswith("--") else "+"
            spec += f"[{help_text}]"
            if option.takes_value:
                spec += f":{option.metavar or 'value'}:{_zsh_action(option.kind)}"
            specs.append(spec)
    for index, positional in enumerate(command.positionals, 1):
        colon = "::" if positional.optional else ":"
        where = "*" if positional.repeated else str(index)
        specs.append(f"{where}{colon}{positional.metavar}:{_zsh_action(positional.kind)}")
    return specs


def zsh_script(parser: argparse.ArgumentParser) -> str:
    """The zsh completion function ``_mmctl`` for ``parser`` (``mmctl``'s), as text."""
    top, commands = describe(parser)
    out = [_ZSH_HEAD]
    globals_ = [o for o in top.options if o.takes_value]
    for option in globals_:
        out.append(f"      ({'|'.join(option.flags)}) helper+=($word $value) ;;\n")
        for flag in option.flags:
            attached = f"{flag}=" if flag.startswith("--") else flag
            out.append(f"      ({attached}?*) helper+=({flag} ${{${{(Q)word}}#{attached}}}) ;;\n")
    out.append(_ZSH_MIDDLE)
    for command in commands:
        out.append(f"    {_zsh_quote(command.name + ':' + command.help)}\n")
    out.append(_ZSH_TAIL)
    for spec in _zsh_specs(top):
        out.append(f"    {_zsh_quote(spec)} \\\n")
    out.append("    '1:command:_mmctl_commands' \\\n"
               "    '*::argument:->argument' && ret=0\n"
               "  [[ $state == argument ]] || return ret\n"
               "  curcontext=${curcontext%:*:*}:mmctl-$words[1]:\n"
               "  case $words[1] in\n")
    for command in commands:
        out.append(f"    ({command.name})\n      _arguments : \\\n")
        out.extend(f"        {_zsh_quote(spec)} \\\n" for spec in _zsh_specs(command))
        out.append("        && ret=0 ;;\n")
    out.append("  esac\n  return ret\n}\n\n_mmctl \"$@\"\n")
    return "".join(out)


# -- the files -------------------------------------------------------------------------------


def scripts(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """``{file name: text}`` of the completion scripts (:data:`FILES`) for ``parser``
    (default: ``mmctl``'s own)."""
    if parser is None:
        from multimodule.cli.mmctl import build_parser
        parser = build_parser()
    return {FILES["bash"]: bash_script(parser), FILES["zsh"]: zsh_script(parser)}


def write(directory: str | os.PathLike[str]) -> list[Path]:
    """Write the completion scripts into ``directory`` (which must exist); return their
    paths. Raises :class:`OSError` if one cannot be written."""
    paths = []
    for name, text in scripts().items():
        path = Path(directory) / name
        path.write_text(text)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m multimodule.cli.completion bash|zsh`` prints that shell's script;
    ``--write DIR`` writes both into DIR."""
    parser = argparse.ArgumentParser(
        prog="python3 -m multimodule.cli.completion",
        description="Print mmctl's completion script for a shell, or write both.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("shell", nargs="?", choices=sorted(FILES), help="print this one")
    what.add_argument("--write", metavar="DIR", help="write mmctl.bash and _mmctl into DIR")
    args = parser.parse_args(argv)
    if args.write:
        for path in write(args.write):
            print(path)
    else:
        sys.stdout.write(scripts()[FILES[args.shell]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
