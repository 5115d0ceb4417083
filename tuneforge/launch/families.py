"""What the launcher knows of the model a config names, whatever its family (tuneforge/arch/).

- `checkpoint_shape(path, trust_remote_code)`: the shape of a local checkpoint's config.json, read by
  its family's spelling (arch/families.py), or, for an unfamiliar family, counted on the model built on
  the meta device (arch/meta.py: imports torch; the preflight's source line says so). Cached.
- `attention(model_cfg)`: what model.attn_implementation becomes ("auto": sdpa where the model class
  has an SDPA path, else eager) and a note for the dry run, or None and the refusal.
- `problems(cfg)`: (key, message) for what cannot train, before submission: not a causal LM or custom
  code without model.trust_remote_code (arch/support.py), an attention implementation the class lacks,
  packing where the family's mask ignores packed rows' position ids, train.seq_len beyond a learned
  position table, and what peft cannot do on the family (arch/adapters.py: unknown targets, weights
  the method cannot adapt, dropout on expert parameters). launch/validate.py yields them as Problems.
A hub id has no local config.json: the task makes the same checks at job start.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional, Tuple

from tuneforge import arch
from tuneforge.arch import adapters, support
from tuneforge.arch.families import FAMILIES
from tuneforge.conf import methods
from tuneforge.conf.schema import Config, ModelConfig

#: the family of the models tuneforge builds itself (model=tiny, pretraining from sizes) and of the presets
BUILT_FAMILY = "llama"


def config_path(model_cfg: ModelConfig) -> Optional[Path]:
    """config.json of a local model=hf checkpoint, or None (a hub id, or no model path)."""
    if model_cfg.kind != "hf" or not model_cfg.name_or_path:
        return None
    path = Path(str(model_cfg.name_or_path)).expanduser() / "config.json"
    return path if path.is_file() else None


def local_config(model_cfg: ModelConfig) -> Optional[dict]:
    path = config_path(model_cfg)
    if path is None:
        return None
    try:
        config = _read(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


@lru_cache(maxsize=32)
def _read(path: str, mtime: int) -> dict:
    return json.loads(Path(path).read_text())


def checkpoint_shape(path: Path, trust_remote_code: bool = False) -> Tuple[Optional[arch.ModelShape], str]:
    """(shape, where it was read) of a config.json, or (None, why no estimate)."""
    try:
        config = _read(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError) as e:
        return None, f"cannot read {path}: {e}"
    try:
        return arch.shape_from_config(config), str(path)
    except arch.UnknownArchitecture as e:
        if arch.language_config(config).get("model_type") in FAMILIES:
            return None, f"{path}: {e}, no estimate"  # a known family with a size missing
    return _on_meta(str(path), path.stat().st_mtime_ns, trust_remote_code)


@lru_cache(maxsize=8)
def _on_meta(path: str, mtime: int, trust_remote_code: bool) -> Tuple[Optional[arch.ModelShape], str]:
    from tuneforge.arch import meta  # torch and transformers: only for a family tuneforge does not know

    config = _read(path, mtime)
    model_type = arch.language_config(config).get("model_type")
    try:
        shape = meta.shape_on_meta(config, trust_remote_code)
    except Exception as e:  # noqa: BLE001 (whatever stops transformers building it: no estimate, said why)
        return None, f"{path}: unfamiliar model_type {model_type!r}, and building it on the meta device failed: {e}"
    return shape, f"{path}; model_type {model_type!r} counted on the meta device (torch imported)"


def attention(model_cfg: ModelConfig) -> Tuple[Optional[str], str]:
    """(implementation, note) of model.attn_implementation for this model; (None, refusal) when its
    class has no such path. "auto" on a model whose class is unknown here (hub id, custom code) stays
    "auto" (transformers decides when loading)."""
    requested = model_cfg.attn_implementation
    config = local_config(model_cfg)
    if config is None:
        if model_cfg.kind == "hf" and not model_cfg.model_type:
            return requested, ""
        config = {"model_type": model_cfg.model_type or BUILT_FAMILY}
    return support.attention(config, requested)


def estimated_attention(model_cfg: ModelConfig) -> str:
    """The implementation the memory estimate assumes: eager materialises the scores, the others do not."""
    impl, _ = attention(model_cfg)
    return "eager" if impl == "eager" else "sdpa"


def layout(model_cfg: ModelConfig) -> Optional[arch.ModelShape]:
    """The model's layout (weights, their kinds and names; sizes where config.json gives them), or None
    where nothing is known before the job starts (a hub id without model.model_type)."""
    config = local_config(model_cfg)
    if config is None:
        model_type = model_cfg.model_type or (BUILT_FAMILY if model_cfg.kind == "tiny" else None)
        config = {"model_type": model_type} if model_type else None
    if config is None:
        return None
    try:
        return arch.shape_from_config(config)
    except arch.UnknownArchitecture:
        pass
    try:
        return arch.layout_of(config)  # a known family whose config.json omits sizes: its names still hold
    except arch.UnknownArchitecture:
        path = config_path(model_cfg)
        return checkpoint_shape(path, model_cfg.trust_remote_code)[0] if path else None


def problems(cfg: Config) -> Iterator[Tuple[str, str]]:
    m = cfg.model
    config = local_config(m)
    if config is not None:
        reason = support.refusal(config, m.trust_remote_code)
        if reason:
            yield "model.name_or_path", f"{m.name_or_path}: {reason}"
            return
        model_type = arch.language_config(config).get("model_type", "")
        if cfg.data.packing and not support.packing_isolated(model_type):
            yield (
                "data.packing",
                f"{model_type}'s attention mask in transformers {support.registry().version} ignores the "
                "position ids of packed rows, so packed examples would attend to each other; set "
                "data.packing=false (one example per row)",
            )
    impl, note = attention(m)
    if impl is None:
        yield "model.attn_implementation", note
    shape = layout(m)
    if shape is None:
        return  # the job checks what it loads (trainers/model.py, trainers/methods.py)
    # train.seq_len against the model's positions: validate._model, read from the same config.json
    spec = methods.METHODS.get(cfg.method.name)
    if spec is None or not spec.peft:
        return
    try:
        chosen = adapters.targets(shape, spec, cfg.method)
    except ValueError as e:
        yield "method.target_modules", str(e)
        return
    yield from adapters.problems(shape, spec, cfg.method, chosen)
