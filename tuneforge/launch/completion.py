"""Shell completion: `tuneforge --completion bash|zsh` prints a script to source (or eval) in the shell.

    eval "$(tuneforge --completion bash)"      # in ~/.bashrc
    eval "$(tuneforge --completion zsh)"       # in ~/.zshrc, after compinit

It completes subcommands, flags, `group=` and every `group.key=` of the schemas, each group's options
(the user's search path included) and the values of keys with choices. The words are written into the
script when it is made (a new shell sees new site profiles), so a TAB runs no Python. One candidate
function in plain sh serves both shells; each shell's wrapper hands its words to it.
"""

from __future__ import annotations

import shlex
from typing import Dict, List

from tuneforge.launch import args as args_mod
from tuneforge.launch import sources as sources_mod

#: the candidate function's exit codes that ask the wrapper for paths instead of words
FILES, DIRS = 10, 11


def words() -> Dict[str, List[str]]:
    """What completion offers: commands, flags, keys (each ending in '='), and key -> its values."""
    keys: List[str] = []
    values: Dict[str, List[str]] = {}
    for group in sources_mod.groups():
        keys.append(f"{group}=")
        values[group] = sources_mod.options(group)
    for group in (*sources_mod.groups(), *args_mod.SECTIONS):
        if group == "experiment":
            continue
        for name, f in args_mod.keys(group).items():
            keys.append(f"{group}.{name}=")
            if args_mod.choices_of(f):
                values[f"{group}.{name}"] = list(args_mod.choices_of(f))
    flags = [name for f in args_mod.FLAGS for name in f.names if name.startswith("--") or len(name) == 2]
    return {"commands": list(args_mod.commands()), "flags": flags, "keys": keys, "values": values}


def script(shell: str) -> str:
    if shell not in ("bash", "zsh"):
        raise ValueError(f"--completion: '{shell}' is not one of bash, zsh")
    return _candidates(words()) + (BASH if shell == "bash" else ZSH)


def _candidates(w: Dict[str, List[str]]) -> str:
    def printf(items: List[str]) -> str:
        return "printf '%s\\n' " + " ".join(shlex.quote(i) for i in items) if items else ":"

    cases = "\n".join(
        f"    {shlex.quote(key)}) {printf([f'{key}={v}' for v in vals])} ;;" for key, vals in w["values"].items()
    )
    return f"""# tuneforge shell completion (made by `tuneforge --completion`; regenerate it to see new options)
_tuneforge_commands() {{ {printf(w["commands"])}; }}
_tuneforge_flags() {{ {printf(w["flags"])}; }}
_tuneforge_keys() {{ {printf(w["keys"])}; }}
_tuneforge_values() {{
  case $1 in
{cases}
  esac
}}
# $1 the word being completed, $2 the word before it, $3 the first argument, $4 the position of $1
# (1: the first argument). Prints candidate words; exits {FILES} for file names, {DIRS} for directories.
_tuneforge_candidates() {{
  local cur="$1" prev="$2" first="$3" pos="$4"
  case $prev in
    --config) return {FILES} ;;
    --config-dir|-cd) return {DIRS} ;;
    --config-name|-cn) return 0 ;;
    --completion) printf '%s\\n' bash zsh; return 0 ;;
  esac
  if [ "$pos" -gt 1 ] && _tuneforge_commands | grep -qx -- "$first"; then
    case $cur in -*) return 0 ;; esac
    return {DIRS}
  fi
  case $cur in
    -*) _tuneforge_flags; return 0 ;;
    *=*) _tuneforge_values "${{cur%%=*}}"; return 0 ;;
  esac
  if [ "$pos" -eq 1 ]; then _tuneforge_commands; fi
  _tuneforge_keys
}}
"""


BASH = f"""_tuneforge() {{
  local line="${{COMP_LINE:0:COMP_POINT}}"
  local cur="${{line##*[[:space:]]}}"
  local -a before
  read -ra before <<< "${{line:0:${{#line}}-${{#cur}}}}"
  local found rc
  found="$(_tuneforge_candidates "$cur" "${{before[${{#before[@]}}-1]}}" "${{before[1]:-}}" "${{#before[@]}}")"
  rc=$?
  case $rc in
    {FILES}) COMPREPLY=($(compgen -f -- "$cur")); compopt -o filenames 2>/dev/null; return 0 ;;
    {DIRS}) COMPREPLY=($(compgen -d -- "$cur")); compopt -o filenames 2>/dev/null; return 0 ;;
  esac
  COMPREPLY=($(compgen -W "$found" -- "$cur"))
  if [[ "${{COMPREPLY[*]}}" == *= || "${{COMPREPLY[*]}}" == *"= "* ]]; then compopt -o nospace 2>/dev/null; fi
  # bash splits the word at '=' and ':' (COMP_WORDBREAKS): it replaces only what follows the last one
  local head="${{cur%"${{cur##*[=:]}}"}}"
  if [[ -n "$head" && "$COMP_WORDBREAKS" == *"${{head: -1}}"* ]]; then COMPREPLY=("${{COMPREPLY[@]#"$head"}}"); fi
  return 0
}}
complete -F _tuneforge tuneforge
"""

ZSH = f"""_tuneforge_zsh() {{
  local found rc
  found="$(_tuneforge_candidates "${{words[CURRENT]}}" "${{words[CURRENT-1]}}" "${{words[2]}}" $((CURRENT - 1)))"
  rc=$?
  case $rc in
    {FILES}) _files; return ;;
    {DIRS}) _files -/; return ;;
  esac
  local -a cands keys plain
  cands=(${{(f)found}})
  keys=(${{(M)cands:#*=}})
  plain=(${{cands:#*=}})
  (( ${{#keys}} )) && compadd -S '' -- $keys
  (( ${{#plain}} )) && compadd -- $plain
  return 0
}}
if (( $+functions[compdef] )); then compdef _tuneforge_zsh tuneforge; fi
"""
