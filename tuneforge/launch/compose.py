"""Compose the run's config with Hydra (no app, no working-directory change, no logging setup).

Composition is strict: the schemas in conf/schema.py reject unknown keys and wrong types. Hydra stops
at the first one; `compose` reports them all: it composes again without the override (or the config
file's key) that failed, until the rest composes, and raises one `ConfigError` listing every problem,
each one line that names the key and the fix. The config search path and config files are
launch/sources.py's; the checks of single overrides are launch/overrides.py's.
"""

from __future__ import annotations

import difflib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from tuneforge.conf.schema import Config
from tuneforge.launch import overrides as overrides_mod
from tuneforge.launch.sources import CONFIG_MODULE, FILE_GROUP, ConfigFile, Sources, read_config_file, search_path

PRIMARY = "train"


class ConfigError(ValueError):
    """A config that cannot be composed: unknown keys, wrong types, unknown group options.

    `problems` lists every one; `partial` is the config composed without the failing values (None
    when a group choice failed or nothing composed), for the cross-field checks of what is left."""

    def __init__(self, problems: Sequence[str], partial: Optional[Config] = None):
        super().__init__("\n".join(problems))
        self.problems, self.partial = list(problems), partial


@dataclass
class _Failure:
    message: str
    key: str  # the dotted key, or the group of a group choice; "" when Hydra did not say
    in_file: bool  # raised while merging the config file


def compose(overrides: Sequence[str] = (), sources: Optional[Sources] = None) -> Config:
    """The resolved config for these command-line overrides (and the config file and search path of
    `sources`), as the schema's dataclasses. Raises ConfigError with every problem."""
    sources = sources or Sources()
    overrides = [overrides_mod.normalize(o) for o in overrides]
    problems = overrides_mod.problems(overrides)
    kept = [o for o in overrides if not overrides_mod.problem(o)]
    dirs, path_problems = search_path(sources)
    problems += path_problems
    config_file = read_config_file(sources.file) if sources.file else None
    if config_file is not None:
        problems += config_file.problems
        _command_line_chooses(kept, config_file)
    choice_failed = False
    for _ in range(len(kept) + _size(config_file) + 2):
        try:
            cfg = _compose_once(kept, dirs, config_file)
        except _Failed as e:
            failure = e.failure
            culprit = _drop(failure, kept, config_file)
            label = f"{config_file.label}: " if config_file is not None and culprit == "file" else ""
            problems += [label + line for line in failure.message.splitlines()]
            choice_failed = choice_failed or failure.key in _groups() or culprit is None
            if culprit is None:
                raise ConfigError(problems) from None
            continue
        if problems:
            raise ConfigError(problems, None if choice_failed else cfg)
        return cfg
    raise ConfigError(problems)


def _command_line_chooses(overrides: Sequence[str], config_file: ConfigFile) -> None:
    """A group option chosen on the command line replaces the file's choice. Where the file's choice
    came from a saved config's `name` and the command line picks another option, the saved node goes
    too: `--config runs/x cluster=mysite` is the same run with mysite's settings."""
    for override in overrides:
        group, _, option = overrides_mod.normalize(override).partition("=")
        if group in config_file.named and config_file.choices.get(group) != option:
            config_file.values.pop(group, None)
        if group in config_file.choices and "=" in override:
            del config_file.choices[group]


def _size(config_file: Optional[ConfigFile]) -> int:
    """How many things of the file can fail: each choice and each value."""

    def leaves(tree: Any) -> int:
        return sum(leaves(v) for v in tree.values()) if isinstance(tree, dict) and tree else 1

    return 0 if config_file is None else len(config_file.choices) + leaves(config_file.values)


def _groups():
    from tuneforge.launch.sources import groups

    return groups()


class _Failed(Exception):
    def __init__(self, failure: _Failure):
        self.failure = failure


def _drop(failure: _Failure, kept: List[str], config_file: Optional[ConfigFile]) -> Optional[str]:
    """Remove what failed: the last command-line override of its key, or the file's key. Returns
    "cli", "file", or None when the failure is nobody's (a shipped file, a missing value)."""
    if not failure.key:
        return None
    if not failure.in_file:
        for i in range(len(kept) - 1, -1, -1):
            if overrides_mod.key_of(kept[i]) == failure.key:
                del kept[i]
                return "cli"
    if config_file is not None and config_file.drop(failure.key):
        return "file"
    return None


def _compose_once(overrides: Sequence[str], dirs: Sequence[Path], config_file: Optional[ConfigFile]) -> Config:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tuneforge.conf import schema

    schema.register()
    GlobalHydra.instance().clear()
    with tempfile.TemporaryDirectory(prefix="tuneforge-compose-") as tmp:
        search = list(dirs)
        extra = list(overrides)
        if config_file is not None:
            option = config_file.write(Path(tmp))
            search.insert(0, Path(tmp))
            extra.insert(0, f"{FILE_GROUP}={option}")
        if search:
            extra.insert(0, "hydra.searchpath=[" + ",".join(_quoted(f"file://{d}") for d in search) + "]")
        try:
            with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
                cfg = hydra_compose(config_name=PRIMARY, overrides=extra)
            OmegaConf.resolve(cfg)
            _check_missing(cfg)
            return OmegaConf.to_object(cfg)
        except (HydraException, OmegaConfBaseException) as e:
            raise _Failed(_one_line(e)) from None
        finally:
            GlobalHydra.instance().clear()


def _quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def validator(overrides: Sequence[str], sources: Optional[Sources] = None):
    """A function of extra overrides -> the problems of `overrides` + them, composed and validated
    (what the preflight checks each suggested change with before showing it)."""
    from tuneforge.launch.validate import validate

    def problems(extra: Sequence[str]) -> List[str]:
        try:
            return [str(p) for p in validate(compose([*overrides, *extra], sources))]
        except ConfigError as e:
            return e.problems

    return problems


def checked(overrides: Sequence[str], sources: Optional[Sources] = None):
    """(the config, every problem): composing's, then validation's (also of what composed when some
    values failed: the cross-field problems of the rest). The config is None when it has problems."""
    from tuneforge.launch.validate import validate

    try:
        cfg = compose(overrides, sources)
    except ConfigError as e:
        return None, e.problems + ([str(p) for p in validate(e.partial)] if e.partial is not None else [])
    problems = [str(p) for p in validate(cfg)]
    return (None if problems else cfg), problems


def group_option(group: str, option: str) -> Any:
    """One shipped option of a group (conf/<group>/<option>.yaml) as its schema's dataclass, without
    composing the whole config: its `defaults` name the schema, the rest are its values."""
    from importlib import resources

    from tuneforge.conf.schema import SCHEMAS

    values = OmegaConf.to_container(OmegaConf.load(resources.files(CONFIG_MODULE).joinpath(group, f"{option}.yaml")))
    (schema_name,) = values.pop("defaults")
    node = OmegaConf.merge(OmegaConf.structured(SCHEMAS[group][schema_name]), values)
    return OmegaConf.to_object(node)


def group_options(group: str, sources: Optional[Sources] = None) -> List[str]:
    """The options of a config group (model, method, ...): shipped, then the user's."""
    from tuneforge.launch.sources import options

    return options(group, sources)


def _check_missing(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        lines = [f"{key}: a value is required; set it on the command line, e.g. {key}=<value>" for key in missing]
        raise _Failed(_Failure("\n".join(lines), "", False))


def _one_line(e: Exception) -> _Failure:
    """Turn a Hydra/OmegaConf error chain into `key: problem; fix`, with the key it names."""
    chain = []
    while e is not None and len(chain) < 8:
        if str(e) and "$VALUE" not in str(e):
            chain.append(str(e))
        e = e.__cause__ or e.__context__
    text = "\n".join(chain)
    in_file = f"In '{FILE_GROUP}/" in text
    full_key = _field(text, "full_key")

    m = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    if m:
        key = _within_override(text, full_key or m.group(1))
        return _Failure(f"{key}: unknown key{_did_you_mean(m.group(1), m.group(2))}", key, in_file)
    m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        known = group_options(group) if group in _groups() else []
        close = difflib.get_close_matches(option, known, n=1)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        message = f"{group}={option}: no such option; {hint}available: {', '.join(known) or '?'}"
        return _Failure(message, group, in_file)
    m = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", text) or re.search(
        r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", text
    )
    if m:
        message = f"{full_key or '?'}: '{m.group(1)}' is not a valid {m.group(2)}; give a value of that type"
        return _Failure(message, full_key, in_file)
    last = chain[-1].strip().splitlines()[0] if chain else "invalid config"
    last = re.sub(rf"^In '{FILE_GROUP}/\w+': ", "", last)
    return _Failure(f"{full_key}: {last}" if full_key else last, full_key, in_file)


def _within_override(text: str, key: str) -> str:
    """A key of a value given whole on the command line (data.sources=[{...}, {...}]) is named by OmegaConf
    relative to that value: named here from the config's root, the list element's index included."""
    m = re.search(r"Could not override '([\w.]+)'\.\nTo append to your config use \+(.*)$", text, re.MULTILINE)
    if not m or key.split(".")[0].split("[")[0] == m.group(1).split(".")[0]:  # named from the root already
        return key
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        value = OverridesParser.create().parse_override(m.group(2)).value()
    except Exception:  # noqa: BLE001 (the key as OmegaConf named it, then)
        return f"{m.group(1)}.{key}"
    first = key.split(".")[0]
    if isinstance(value, list):
        index = next((i for i, v in enumerate(value) if isinstance(v, dict) and first in v), None)
        return f"{m.group(1)}[{index}].{key}" if index is not None else f"{m.group(1)}.{key}"
    return f"{m.group(1)}.{key}"


def _field(text: str, name: str) -> str:
    m = re.search(rf"^\s*{name}[:=]\s*(.*)$", text, re.MULTILINE)
    if m:
        return m.group(1).strip()
    if name == "full_key":  # Hydra's own override errors name the override instead
        m = re.search(r"(?:Error merging override |Could not override ')([\w.]+)", text)
        return m.group(1) if m else ""
    return ""


def _did_you_mean(key: str, schema_name: str) -> str:
    from dataclasses import fields

    from tuneforge.conf import schema

    cls = getattr(schema, schema_name, None)
    if cls is None:
        from tuneforge.conf.schema import BY_NAME

        cls = next((c for by in BY_NAME.values() for c in by.values() if c.__name__ == schema_name), None)
    if cls is None:
        return ""
    names = [f.name for f in fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint or ';'} valid keys: {', '.join(names)}"
