"""Bash completion for vfioctl and vfiod, made from the argparse parsers.

``python -m vfiod.cmd.completion > completion/vfiod`` writes the script that
``completion/vfiod`` holds (a test fails when the two differ, so a new option
cannot be forgotten there).  The script completes commands and options from
tables made here, and at TAB time, reading only and needing no privilege:

* targets (``TARGET``, ``ID|TARGET``): PCI addresses from
  ``/sys/bus/pci/devices``, ``group:N`` from ``/sys/kernel/iommu_groups`` and
  ``name:RESOURCE`` from the ``[[resource]]`` tables of the policy files
  (``/etc/vfiod/policy.d``, readable by everyone).  ``--sysfs-root DIR`` and
  ``--policy-dir DIR`` on the line are honoured;
* backends, buses, simulated hosts, device classes, users, unix groups and directories for the
  options that take them; after ``vfioctl lease ... --``, a command.
"""

from __future__ import annotations

import argparse
import sys

#: command path -> word -> its words (sub-commands, options, ...), as bash tables.
Tables = dict[str, dict[str, str]]

BACKENDS = ("vfio", "libvirt", "pci-stub")


def _kind(action: argparse.Action) -> str:
    """What an option's value or a positional is, for the script."""
    if action.choices:
        return "choice:" + " ".join(str(c) for c in action.choices)
    name = str(action.metavar or action.dest)
    opt = action.option_strings[0] if action.option_strings else ""
    if "TARGET" in name:
        return "target"
    if opt == "--backend":
        return "choice:" + " ".join(BACKENDS)
    if opt == "--bus":
        return "choice:system session"
    if opt == "--simulate":
        from ..sim import BUILT_IN

        return "choice:" + " ".join(BUILT_IN) + " server:"
    if opt == "--class":
        from ..report import DEVICE_CLASSES

        return "choice:" + " ".join(DEVICE_CLASSES) + " help"
    if name == "DIR":
        return "dir"
    if name == "USER":
        return "user"
    if name == "GROUP":
        return "group"
    return "value"


def tables(parser: argparse.ArgumentParser, path: str, out: Tables) -> Tables:
    """For each command path ("vfioctl", "vfioctl policy test"): its sub-commands, its
    options, the kind of each option's value and of its positionals."""
    subs: list[str] = []
    opts: list[str] = []
    positionals: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                subs.append(name)
                tables(sub, f"{path} {name}", out)
        elif action.option_strings:
            opts += action.option_strings
            if action.nargs != 0:
                for o in action.option_strings:
                    out["args"][f"{path} {o}"] = _kind(action)
        else:
            positionals.append(_kind(action))
    if subs:
        out["cmds"][path] = " ".join(subs)
    out["opts"][path] = " ".join(opts)
    if positionals:
        out["pos"][path] = " ".join(positionals)
    return out


SCRIPT = r'''# bash completion for vfioctl and vfiod
# Made by `python -m vfiod.cmd.completion` from the programs' own parsers: do not edit.

{tables}

# PCI addresses, group:N and name:RESOURCE, read from sysfs and the policy files.
_vfiod_targets() {{
    local sysfs=$1 policy=$2 d f
    for d in "$sysfs"/bus/pci/devices/*; do [[ -e $d ]] && printf '%s\n' "${{d##*/}}"; done
    for d in "$sysfs"/kernel/iommu_groups/*; do [[ -e $d ]] && printf 'group:%s\n' "${{d##*/}}"; done
    for f in "$policy"/*.toml; do
        [[ -r $f ]] || continue
        awk '/^[[:space:]]*\[/ {{ t = $0 }}
             t ~ /^[[:space:]]*\[\[[[:space:]]*resource[[:space:]]*\]\]/ && /^[[:space:]]*name[[:space:]]*=/ {{
                 if (match($0, /"[^"]*"/)) print "name:" substr($0, RSTART + 1, RLENGTH - 2) }}' "$f"
    done
}}

_vfiod_complete() {{
    local line=${{COMP_LINE:0:COMP_POINT}} cur path word kind i n
    local sysfs=/sys policy=/etc/vfiod/policy.d expect= after_dash= npos=0
    local -a w
    read -ra w <<<"$line"
    [[ -z $line || $line == *[[:space:]] ]] && w+=("")
    n=${{#w[@]}}
    cur=${{w[n-1]}}
    path=${{w[0]##*/}}
    for ((i = 1; i < n - 1; i++)); do
        word=${{w[i]}}
        if [[ -n $after_dash ]]; then after_dash=$((after_dash + 1)); continue; fi
        if [[ -n $expect ]]; then
            case $expect in --sysfs-root) sysfs=$word ;; --policy-dir) policy=$word ;; esac
            expect=
            continue
        fi
        if [[ $word == -- ]]; then after_dash=1; continue; fi
        if [[ $word == -* ]]; then
            [[ -n ${{_vfiod_args["$path $word"]+x}} ]] && expect=$word
            continue
        fi
        if [[ " ${{_vfiod_cmds[$path]}} " == *" $word "* ]]; then
            path+=" $word"
            npos=0
        else
            npos=$((npos + 1))
        fi
    done
    COMPREPLY=()
    if [[ -n $after_dash ]]; then
        if ((after_dash == 1)); then COMPREPLY=($(compgen -c -- "$cur")); else COMPREPLY=($(compgen -f -- "$cur")); fi
        return 0
    fi
    if [[ -n $expect ]]; then
        kind=${{_vfiod_args["$path $expect"]}}
    elif [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${{_vfiod_opts[$path]}}" -- "$cur"))
        return 0
    elif [[ -n ${{_vfiod_cmds[$path]+x}} ]]; then
        COMPREPLY=($(compgen -W "${{_vfiod_cmds[$path]}}" -- "$cur"))
        return 0
    else
        local -a kinds=(${{_vfiod_pos[$path]}})
        ((${{#kinds[@]}})) || return 0
        kind=${{kinds[npos < ${{#kinds[@]}} ? npos : ${{#kinds[@]}} - 1]}}
    fi
    case $kind in
        target) COMPREPLY=($(compgen -W "$(_vfiod_targets "$sysfs" "$policy")" -- "$cur")) ;;
        choice:*) COMPREPLY=($(compgen -W "${{kind#choice:}}" -- "$cur")) ;;
        dir) COMPREPLY=($(compgen -d -- "$cur")) ;;
        user) COMPREPLY=($(compgen -u -- "$cur")) ;;
        group) COMPREPLY=($(compgen -g -- "$cur")) ;;
    esac
    # bash splits words at ':' (COMP_WORDBREAKS): offer only what follows the last one
    if [[ $cur == *:* && $COMP_WORDBREAKS == *:* ]]; then
        local prefix=${{cur%"${{cur##*:}}"}} j
        for j in "${{!COMPREPLY[@]}}"; do COMPREPLY[j]=${{COMPREPLY[j]#"$prefix"}}; done
    fi
    return 0
}}
complete -F _vfiod_complete vfioctl vfiod
'''


def _assoc(name: str, table: dict[str, str]) -> str:
    def q(s: str) -> str:
        return "'" + s.replace("'", "'\\''") + "'"
    rows = "\n".join(f"    [{q(k)}]={q(v)}" for k, v in sorted(table.items()))
    return f"declare -gA {name}=(\n{rows}\n)"


def script() -> str:
    from .ctl import vfioctl_parser
    from .server import vfiod_parser

    out: Tables = {"cmds": {}, "opts": {}, "args": {}, "pos": {}}
    tables(vfioctl_parser(), "vfioctl", out)
    tables(vfiod_parser(), "vfiod", out)
    body = "\n".join(_assoc(f"_vfiod_{k}", v) for k, v in out.items())
    return SCRIPT.format(tables=body)


def main() -> int:
    sys.stdout.write(script())
    return 0


if __name__ == "__main__":
    sys.exit(main())
