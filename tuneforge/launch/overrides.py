"""Each command-line override checked on its own, before composing: a problem is one line naming the
override's key and what to write instead.

- syntax (Hydra's override grammar), with a hint to quote values;
- `+key=` and `~key` (the schema lists every key; `+experiment=x` is taken as `experiment=x`);
- `hydra.*` and `hydra/...`: tuneforge runs no Hydra app, so these would do nothing; each names the
  tuneforge key that does what it did;
- sweeps: outside `-m` any sweep (`a,b`, `range()`, `choice()`, ...) is refused; under `-m`,
  `interval()` (needs an optimizing sweeper) and `glob()` over a key that is not a config group are
  refused, and `glob()` over a group is expanded to the group's options (the user's search path included).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from tuneforge.launch import sources as sources_mod

#: Hydra's own settings -> what to use in tuneforge
HYDRA_EQUIVALENTS = {
    "hydra.run.dir": "set run.dir (the run directory) instead",
    "hydra.sweep.dir": "set run.dir instead (with -m it is the sweep's directory; element i runs in <run.dir>/<i>)",
    "hydra.sweep.subdir": "a sweep element's directory is <run.dir>/<i>; set run.dir for the sweep's",
    "hydra.job.name": "set run.name instead",
    "hydra.searchpath": f"use --config-dir DIR or ${sources_mod.PATH_VARIABLE} instead",
    "hydra.mode": "use -m for a sweep",
    "hydra/launcher": "choose cluster=slurm or cluster=local instead (tuneforge submits through submitit itself)",
    "hydra/sweeper": "tuneforge sweeps are grids (-m key=a,b); other sweepers are not supported",
}
SWEEP_FUNCTIONS = ("choice", "range", "interval", "glob", "sort", "shuffle", "tag")


def normalize(override: str) -> str:
    """`+experiment=x` -> `experiment=x` (the experiment group is in the defaults list, empty)."""
    return override[1:] if override.startswith("+experiment=") else override


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def problems(overrides: Sequence[str], multirun: bool = False) -> List[str]:
    return [p for p in (problem(o, multirun) for o in overrides) if p]


def problem(override: str, multirun: bool = False) -> Optional[str]:
    """What is wrong with one override on its own, or None."""
    override = normalize(override)
    key = key_of(override)
    if key == "hydra" or key.startswith(("hydra.", "hydra/")):
        return f"{key}: tuneforge runs no Hydra app, so Hydra's settings do nothing here; {_hydra_hint(key)}"
    if key == sources_mod.FILE_GROUP:
        return f"{key}: not a config group; give a config file with --config FILE"
    if "=" not in override and not override.startswith("~"):
        return f"{override}: not an override; give key=value (tuneforge --help lists the groups and keys)"
    if override.startswith(("+", "~")):
        return (
            f"{key}: adding or deleting keys ('{override[0]}') is not allowed; the schema "
            f"lists every key, set an existing one with {key}=<value>"
        )
    parsed, error = _parse(override)
    if error:
        return error
    value = parsed.value()
    if parsed.is_sweep_override() and not multirun:
        return f"{key}: '{override.split('=', 1)[1]}' is a sweep; add -m to run one job per value (or give a list as [a,b])"
    kind = type(value).__name__
    if kind == "IntervalSweep":
        return (
            f"{key}: interval() needs an optimizing sweeper (Optuna, Nevergrad), which tuneforge does not run; "
            "sweep a grid with range(start,stop,step) or a list a,b,c"
        )
    if kind == "Glob" and key not in sources_mod.groups():
        return (
            f"{key}: glob() selects options of a config group ({', '.join(sources_mod.groups())}); list values instead"
        )
    return None


def expand_globs(overrides: Sequence[str], sources=None) -> List[str]:
    """`model=glob(*,exclude=hf)` -> `model=tiny,llama3_8b,...`: Hydra's own glob, over the group's options."""
    out = []
    for override in overrides:
        parsed, error = _parse(override)
        if not error and type(parsed.value()).__name__ == "Glob":
            key = key_of(override)
            chosen = parsed.value().filter(sources_mod.options(key, sources))
            override = f"{key}={','.join(chosen)}" if chosen else override
        out.append(override)
    return out


def _parse(override: str):
    from hydra.errors import HydraException

    from tuneforge.compat import hydra as hydra_compat

    key = key_of(override)
    try:
        return hydra_compat.parse_override(override), None
    except HydraException as e:
        text = str(e)
        if "Unknown function" in text:
            name = text.split("Unknown function '", 1)[1].split("'", 1)[0]
            return None, (
                f"{key}: Hydra has no function {name}(); its functions: {', '.join(SWEEP_FUNCTIONS)}, "
                "int, float, str, bool"
            )
        return None, (
            f"{key}: cannot parse '{override}'; quote a value with spaces or special "
            f"characters, e.g. \"{key}='a value'\""
        )


def _hydra_hint(key: str) -> str:
    for prefix, hint in HYDRA_EQUIVALENTS.items():
        if key == prefix or key.startswith(prefix + ".") or key.startswith(prefix + "="):
            return hint
    return "tuneforge --help lists what can be set"
