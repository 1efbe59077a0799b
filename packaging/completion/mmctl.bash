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
    '')
        options='-h --help -T --transit-dir -q --control-queue'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue '
        positionals='' ;;
    send)
        options='-h --help -T --transit-dir -q --control-queue --timeout --to'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue --timeout=- --to=- '
        positionals='queue -' ;;
    recv)
        options='-h --help -T --transit-dir -q --control-queue -n --count -t --timeout'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue -n=- --count=- -t=- --timeout=- '
        positionals='queue' ;;
    queues)
        options='-h --help -T --transit-dir -q --control-queue --json --no-legend'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue '
        positionals='' ;;
    config)
        options='-h --help -T --transit-dir -q --control-queue --wait'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue --wait=- '
        positionals='task -' ;;
    state)
        options='-h --help -T --transit-dir -q --control-queue --wait --set'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue --wait=- --set=- '
        positionals='task' ;;
    migrate)
        options='-h --help -T --transit-dir -q --control-queue --wait --external --internal'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue --wait=- '
        positionals='task' ;;
    stop)
        options='-h --help -T --transit-dir -q --control-queue --wait --externals --no-block --stop-timeout'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue --wait=- --stop-timeout=- '
        positionals='task' ;;
    start)
        options='-h --help -T --transit-dir -q --control-queue --wait'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue --wait=- '
        positionals='task' ;;
    restart)
        options='-h --help -T --transit-dir -q --control-queue --wait'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue --wait=- '
        positionals='task' ;;
    reload)
        options='-h --help -T --transit-dir -q --control-queue --wait'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue --wait=- '
        positionals='' ;;
    status)
        options='-h --help -T --transit-dir -q --control-queue --wait --json'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue --wait=- '
        positionals='' ;;
    top)
        options='-h --help -T --transit-dir -q --control-queue --wait --interval -n --iterations'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue --wait=- --interval=- -n=- --iterations=- '
        positionals='' ;;
    failsafe)
        options='-h --help -T --transit-dir -q --control-queue --wait --reason'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue --wait=- --reason=- '
        positionals='task' ;;
    unfailsafe)
        options='-h --help -T --transit-dir -q --control-queue --wait'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue --wait=- '
        positionals='task' ;;
    graph)
        options='-h --help -T --transit-dir -q --control-queue --wait --format'
        valued=' -T=directory --transit-dir=directory -q=queue --control-queue=queue --wait=- --format=- '
        positionals='' ;;
    logs)
        options='-h --help -f --follow -n --lines --since -s --state-dir'
        valued=' -n=- --lines=- --since=- -s=directory --state-dir=directory '
        positionals='task*' ;;
    *) return 1 ;;
    esac
}

_mmctl_commands='send recv queues config state migrate stop start restart reload status top failsafe unfailsafe graph logs'

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
