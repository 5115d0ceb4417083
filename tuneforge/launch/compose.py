"""Compose the run's config with Hydra (no app, no working-directory change, no logging setup).

Composition is strict: the schemas in conf/schema.py reject unknown keys and wrong types. Hydra's
own exceptions are long and nested; `ConfigError` carries one line that names the key and the fix.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, List, Sequence

from omegaconf import DictConfig, OmegaConf

from tuneforge.conf.schema import Config

CONFIG_MODULE = "tuneforge.conf"
PRIMARY = "train"


class ConfigError(ValueError):
    """A config that cannot be composed: unknown key, wrong type, unknown group option."""


def compose(overrides: Sequence[str] = ()) -> Config:
    """The resolved config for these command-line overrides, as the schema's dataclasses."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tuneforge.conf import schema

    for override in overrides:
        if override.startswith(("+", "~")):
            key = override.lstrip("+~").split("=")[0]
            raise ConfigError(
                f"{key}: adding or deleting keys ('{override[0]}') is not allowed; the schema "
                f"lists every key, set an existing one with {key}=<value>"
            )
    _check_syntax(overrides)
    schema.register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
            cfg = hydra_compose(config_name=PRIMARY, overrides=list(overrides))
        OmegaConf.resolve(cfg)
        _check_missing(cfg)
        return OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()


def validator(overrides: Sequence[str]):
    """A function of extra overrides -> the problems of `overrides` + them, composed and validated
    (what the preflight checks each suggested change with before showing it)."""
    from tuneforge.launch.validate import validate

    def problems(extra: Sequence[str]) -> List[str]:
        try:
            return [str(p) for p in validate(compose([*overrides, *extra]))]
        except ConfigError as e:
            return [str(e)]

    return problems


def group_option(group: str, option: str) -> Any:
    """One shipped option of a group (conf/<group>/<option>.yaml) as its schema's dataclass, without
    composing the whole config: its `defaults` name the schema, the rest are its values."""
    from importlib import resources

    from tuneforge.conf.schema import SCHEMAS

    values = OmegaConf.to_container(OmegaConf.load(resources.files(CONFIG_MODULE).joinpath(group, f"{option}.yaml")))
    (schema_name,) = values.pop("defaults")
    node = OmegaConf.merge(OmegaConf.structured(SCHEMAS[group][schema_name]), values)
    return OmegaConf.to_object(node)


def group_options(group: str) -> List[str]:
    """The YAML options shipped for a config group (model, method, ...)."""
    from importlib import resources

    folder = resources.files(CONFIG_MODULE).joinpath(group)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _check_syntax(overrides: Sequence[str]) -> None:
    """Parse each override alone so that a syntax error names its key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except HydraException:
            key = override.split("=")[0]
            raise ConfigError(
                f"{key}: cannot parse '{override}'; quote a value with spaces or special "
                f"characters, e.g. \"{key}='a value'\""
            ) from None


def _check_missing(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        raise ConfigError(f"{key}: a value is required; set it on the command line, e.g. {key}=<value>")


def _one_line(e: Exception) -> str:
    """Turn a Hydra/OmegaConf error chain into `key: problem; fix`."""
    chain = []
    while e is not None and len(chain) < 8:
        if str(e) and "$VALUE" not in str(e):
            chain.append(str(e))
        e = e.__cause__ or e.__context__
    text = "\n".join(chain)
    full_key = _field(text, "full_key")

    m = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    if m:
        return f"{full_key or m.group(1)}: unknown key{_did_you_mean(m.group(1), m.group(2))}"
    m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        options = ", ".join(group_options(group)) if _is_group(group) else "?"
        return f"{group}={option}: no such option; available: {options}"
    m = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", text) or re.search(
        r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", text
    )
    if m:
        return f"{full_key or '?'}: '{m.group(1)}' is not a valid {m.group(2)}; give a value of that type"
    last = chain[-1].strip().splitlines()[0] if chain else "invalid config"
    return f"{full_key}: {last}" if full_key else last


def _field(text: str, name: str) -> str:
    m = re.search(rf"^\s*{name}[:=]\s*(.*)$", text, re.MULTILINE)
    if m:
        return m.group(1).strip()
    if name == "full_key":  # Hydra's own override errors name the override instead
        m = re.search(r"(?:Error merging override |Could not override ')([\w.]+)", text)
        return m.group(1) if m else ""
    return ""


def _is_group(group: str) -> bool:
    from tuneforge.conf.schema import SCHEMAS

    return group in SCHEMAS


def _did_you_mean(key: str, schema_name: str) -> str:
    from dataclasses import fields

    from tuneforge.conf import schema

    cls = getattr(schema, schema_name, None)
    if cls is None:
        return ""
    names = [f.name for f in fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint or ';'} valid keys: {', '.join(names)}"
