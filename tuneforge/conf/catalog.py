"""The model catalog: what the hub says about the checkpoint each preset under conf/model/ names.

Metadata about a published checkpoint (family, context, licence, gated, base or instruct, domains,
release date) lives in conf/catalog.yaml, keyed by preset name, and not in the model schema: it
describes the artifact, not the run, so it stays out of every run's config.yaml and W&B config, cannot
be "overridden" on the command line, and is found for a plain `model=hf model.name_or_path=<hub id>`
too (`lookup` matches hub ids). The preset YAML holds what a run and its preflight need: the hub id,
model_type, params_b and config.json's sizes. `tuneforge models` and `tuneforge probe` read both.

Pure Python (omegaconf for the YAML): the submit path stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Dict, List, Optional

CATALOG_FILE = "catalog.yaml"
DOMAINS = ("general", "code", "math", "medical", "multilingual")


@dataclass(frozen=True)
class Entry:
    preset: str  # conf/model/<preset>.yaml
    family: str
    context: int
    licence: str
    gated: bool
    kind: str  # "base" | "instruct"
    domains: List[str]
    released: str  # "YYYY-MM"
    unverified: List[str] = field(default_factory=list)


def entries() -> Dict[str, Entry]:
    """preset name -> its catalog entry, in the catalog's order."""
    from omegaconf import OmegaConf

    text = resources.files("tuneforge.conf").joinpath(CATALOG_FILE).read_text()
    raw = OmegaConf.to_container(OmegaConf.create(text))
    return {name: Entry(preset=name, **values) for name, values in raw.items()}


def preset_hub_ids() -> Dict[str, str]:
    """hub id -> preset name, from the presets' `name_or_path` (read as plain YAML)."""
    from omegaconf import OmegaConf

    ids = {}
    for path in sorted(resources.files("tuneforge.conf").joinpath("model").iterdir(), key=lambda p: p.name):
        if path.name.endswith(".yaml"):
            hub_id = OmegaConf.create(path.read_text()).get("name_or_path")
            if hub_id:
                ids.setdefault(str(hub_id), path.name[: -len(".yaml")])
    return ids


def lookup(model_cfg) -> Optional[Entry]:
    """The catalog entry of a model config, found by its hub id (`model.name_or_path`): a preset's, or a
    plain `model=hf model.name_or_path=<the same hub id>`. None for local directories and other ids."""
    name = preset_hub_ids().get(str(model_cfg.name_or_path or ""))
    return entries().get(name) if name else None
