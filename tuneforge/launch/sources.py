"""Where a config comes from besides the command line: the config search path and a config file.

The search path, first match wins:

    tuneforge/conf/                  the shipped groups (model/ method/ backend/ cluster/ data/ logger/ experiment/)
    --config-dir DIR                 (each one given)
    $TUNEFORGE_CONFIG_PATH           directories separated by ':'
    ~/.config/tuneforge/             ($XDG_CONFIG_HOME/tuneforge): the user's own

Each directory holds group folders like the shipped ones: `~/.config/tuneforge/cluster/mysite.yaml`
makes `cluster=mysite` an option like `cluster=slurm` (it starts from a schema: `defaults: [base_slurm]`;
examples/site/ has one). A user's option with a shipped name would never be read, so it is refused.

A config file (`--config FILE`, or `--config-dir DIR --config-name NAME`) sets groups and values:

    defaults:                        # group choices (or `model: llama3_8b` at the top level)
      - override /model: llama3_8b
      - method: lora
    train:
      lr: 2.0e-4

It is merged like an experiment (a `# @package _global_` delta) after the shipped defaults and before
an `experiment=` and the command line, so each of those changes it. A saved run's config.yaml is such
a file: its `name` keys choose the method, backend and cluster options it was run with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

CONFIG_MODULE = "tuneforge.conf"
PATH_VARIABLE = "TUNEFORGE_CONFIG_PATH"
#: the hidden group a config file is composed through (conf/train.yaml: `optional file: null`)
FILE_GROUP = "file"


@dataclass(frozen=True)
class Sources:
    """What the command line adds to the search path, and the config file it names."""

    config_dirs: Tuple[Path, ...] = ()
    file: Optional[Path] = None


def groups() -> Tuple[str, ...]:
    from tuneforge.conf.schema import SCHEMAS

    return (*SCHEMAS, "experiment")


def user_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or "~/.config").expanduser() / "tuneforge"


def search_path(sources: Optional[Sources] = None) -> Tuple[List[Path], List[str]]:
    """The user's config directories in search order, and the problems of the path (missing
    directories, misplaced or shadowed options)."""
    sources = sources or Sources()
    dirs: List[Tuple[Path, str]] = [(Path(d).expanduser(), "--config-dir") for d in sources.config_dirs]
    dirs += [(Path(d).expanduser(), PATH_VARIABLE) for d in os.environ.get(PATH_VARIABLE, "").split(os.pathsep) if d]
    problems = [f"{origin}: {d} is not a directory" for d, origin in dirs if not d.is_dir()]
    found = [d.resolve() for d, _ in dirs if d.is_dir()]
    if user_dir().is_dir():
        found.append(user_dir().resolve())
    unique = list(dict.fromkeys(found))
    for d in unique:
        problems += _layout_problems(d)
    return unique, problems


def _layout_problems(directory: Path) -> List[str]:
    out = []
    for sub in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if sub.name not in groups():
            if any(sub.glob("*.yaml")):
                out.append(f"{sub}: not a config group, its options are never read; groups: {', '.join(groups())}")
            continue
        shipped = set(shipped_options(sub.name))
        for option in sorted(p.stem for p in sub.glob("*.yaml")):
            if option in shipped:
                out.append(
                    f"{sub / option}.yaml: the shipped {sub.name}={option} has this name and is read first; "
                    f"rename the file (e.g. {option}_site.yaml)"
                )
    return out


def shipped_options(group: str) -> List[str]:
    folder = resources.files(CONFIG_MODULE).joinpath(group)
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def options(group: str, sources: Optional[Sources] = None) -> List[str]:
    """Every option of a group: the shipped ones, then those found on the user's search path."""
    found = shipped_options(group)
    for d in search_path(sources)[0]:
        found += sorted(p.stem for p in (d / group).glob("*.yaml") if p.stem not in found)
    return found


def option_file(group: str, option: str, sources: Optional[Sources] = None) -> Optional[Path]:
    """Where an option's YAML is (a shipped one or the user's), None when there is no such option."""
    shipped = resources.files(CONFIG_MODULE).joinpath(group, f"{option}.yaml")
    if shipped.is_file():
        return Path(str(shipped))
    for d in search_path(sources)[0]:
        if (d / group / f"{option}.yaml").is_file():
            return d / group / f"{option}.yaml"
    return None


def defaults() -> Dict[str, Optional[str]]:
    """group -> its option in conf/train.yaml's defaults (None: the group is empty unless chosen)."""
    from omegaconf import OmegaConf

    primary = OmegaConf.to_container(OmegaConf.load(resources.files(CONFIG_MODULE).joinpath("train.yaml")))
    out: Dict[str, Optional[str]] = {}
    for entry in primary["defaults"]:
        if isinstance(entry, dict):
            ((key, value),) = entry.items()
            out[key.replace("optional ", "")] = value
    out.pop(FILE_GROUP, None)
    return out


def find_config(name: str, sources: Sources) -> Tuple[Optional[Path], Optional[str]]:
    """--config-name NAME: NAME.yaml in the --config-dir directories, then on the search path."""
    name = name[:-5] if name.endswith(".yaml") else name
    dirs = search_path(sources)[0]
    for d in dirs:
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml", None
    if not dirs:
        return None, f"--config-name: no config directory to look for {name}.yaml in; give --config-dir DIR"
    return None, f"--config-name: no {name}.yaml in {', '.join(map(str, dirs))}"


# ------------------------------------------------------------------------------------ config files
@dataclass
class ConfigFile:
    """A user's config file, normalised into a `_global_` delta that Hydra composes like an experiment.

    `choices` are its group choices, `values` its values; `drop` removes one of either (what the error
    collection does with a key that failed), `write` renders what Hydra reads."""

    path: Path
    choices: Dict[str, str] = field(default_factory=dict)
    values: Dict[str, Any] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)
    named: List[str] = field(default_factory=list)  # groups whose choice is their node's `name` (a saved config)

    @property
    def label(self) -> str:
        return self.path.name if self.path.parent.resolve() == Path.cwd().resolve() else str(self.path)

    def sets(self, key: str) -> bool:
        return _has(self.values, key.split("."))

    def drop(self, key: str) -> bool:
        """Remove a group choice (`key` a group) or a value (a dotted key); False when the file has neither."""
        if key in self.choices:
            del self.choices[key]
            return True
        return _pop(self.values, key.split("."))

    def write(self, directory: Path) -> str:
        """Write the file Hydra composes under `directory`/file/; returns its option name."""
        from omegaconf import OmegaConf

        body = {"defaults": [{f"override /{g}": option} for g, option in self.choices.items()], **self.values}
        target = directory / FILE_GROUP / "config.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("# @package _global_\n" + OmegaConf.to_yaml(OmegaConf.create(body)))
        return "config"


def read_config_file(path: Path) -> ConfigFile:
    """Load and normalise a config file (a run dir stands for its config.yaml). Problems that need no
    composing (not a mapping, an unknown group, a choice in a form Hydra would misread) are listed."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path).expanduser()
    if path.is_dir() and (path / "config.yaml").is_file():
        path = path / "config.yaml"
    out = ConfigFile(path)
    if not path.is_file():
        out.problems.append(f"--config: no such file {path}")
        return out
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OmegaConfBaseException, ValueError, OSError) as e:  # yaml's errors are ValueErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        out.problems.append(f"{out.label}: not valid YAML: {first}")
        return out
    if raw is None:
        return out
    if not isinstance(raw, dict):
        out.problems.append(f"{out.label}: must be a mapping of groups and sections, got a {type(raw).__name__}")
        return out
    for entry in raw.pop("defaults", None) or []:
        _add_choice(out, entry)
    for key, value in raw.items():
        if key in groups() and isinstance(value, str):  # `model: llama3_8b`: a group choice
            _add_choice(out, {key: value})
        else:
            out.values[key] = value
    _choices_from_names(out)
    return out


def _add_choice(out: ConfigFile, entry: Any) -> None:
    if entry == "_self_":
        return
    if not (isinstance(entry, dict) and len(entry) == 1):
        out.problems.append(f"{out.label}: defaults: '{entry}' is not a group choice like `- model: tiny`")
        return
    ((key, option),) = entry.items()
    group = str(key).removeprefix("override").strip().lstrip("/")
    if group == "experiment":
        out.problems.append(
            f"{out.label}: experiment: choose it on the command line (experiment={option}); an experiment "
            "changes the file's values, so it cannot come from inside the file"
        )
    elif group not in groups() or group == FILE_GROUP:
        out.problems.append(f"{out.label}: defaults: '{group}' is not a config group; groups: {', '.join(groups())}")
    elif not isinstance(option, str):
        out.problems.append(f"{out.label}: defaults: {group}: give one option name, got {option!r}")
    else:
        out.choices[group] = option


def _choices_from_names(out: ConfigFile) -> None:
    """A group node with a `name` (a saved config.yaml) chooses the option of that name, whose schema
    has the node's keys: method.name=lora -> method=lora. Explicit choices win."""
    from tuneforge.conf.schema import BY_NAME

    for group in BY_NAME:
        node = out.values.get(group)
        if group in out.choices or not isinstance(node, dict) or not isinstance(node.get("name"), str):
            continue
        if node["name"] in shipped_options(group):
            out.choices[group] = node["name"]
            out.named.append(group)
        else:
            out.problems.append(
                f"{out.label}: {group}.name: '{node['name']}' is not one of {', '.join(BY_NAME[group])}"
            )
            del out.values[group]


def _has(tree: Any, parts: Sequence[str]) -> bool:
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _pop(tree: Dict[str, Any], parts: Sequence[str]) -> bool:
    for part in parts[:-1]:
        tree = tree.get(part) if isinstance(tree, dict) else None
        if not isinstance(tree, dict):
            return False
    if isinstance(tree, dict) and parts[-1] in tree:
        del tree[parts[-1]]
        return True
    return False
