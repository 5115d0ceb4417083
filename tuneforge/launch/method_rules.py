"""Validation rules of the method group: PEFT knobs, target module names, and method x backend.

Registered into launch/validate.py's rule list on import. `refusal(method, backend_cfg)` is the one
place that says which method cannot run on which backend, and why; the README's matrix is rendered
from it through `validate` (launch/matrix.py).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
from pathlib import Path
from typing import Iterator, Optional, Tuple

from omegaconf import DictConfig

from tuneforge.conf.schema import PEFT_METHODS
from tuneforge.launch.validate import Problem, _positive, rule

QUANT_STORAGE = ("auto", "uint8", "fp32", "bf16", "fp16")

# Module names of architectures whose layout is known without loading them; others are checked at job
# start. Linear projections first: those are what `target_modules: null` adapts.
_LLAMA_LAYOUT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens")
KNOWN_MODULES = {t: _LLAMA_LAYOUT for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")}


def backend_family(backend) -> Tuple[str, Optional[int]]:
    """("ddp" | "fsdp" | "deepspeed" | other name, ZeRO stage or None) of a backend config, whether the
    option is named zero3 or deepspeed with a stage field."""
    name = str(backend.name)
    if name.startswith("fsdp"):
        return "fsdp", None
    if name.startswith("zero") or name == "deepspeed":
        stage = _first(backend, ("stage", "zero_stage"))
        if stage is None:
            m = re.match(r"zero_?(\d)", name)
            stage = int(m.group(1)) if m else None
        return "deepspeed", None if stage is None else int(stage)
    return name, None


def _first(node, keys):
    for key in keys:
        if key in node:
            return node[key]
    return None


def refusal(method: str, backend) -> Optional[str]:
    """Why `method` cannot run on `backend` (one line with the way out), or None when it can.

    Checked on 2 CPU ranks (tests/test_peft.py): QLoRA and DoRA train correctly under ZeRO-3 with every
    parameter partitioned (4-bit weights included), because DeepSpeed wraps the model after it is loaded
    (no zero.Init inside from_pretrained, where the reported QLoRA + ZeRO-3 failures start). AdaLoRA
    fails on FSDP2 and DeepSpeed for the reasons below."""
    family, stage = backend_family(backend)
    if method == "adalora" and family == "fsdp":
        return (
            "peft's AdaLoRA rank allocator reads and masks whole lora_E/A/B tensors, which FSDP2 shards "
            "(DTensor .tolist() fails); use backend=ddp"
        )
    if method == "adalora" and family == "deepspeed":
        return (
            "DeepSpeed keeps the adapter's gradients and fp32 master weights in its own buffers, so AdaLoRA's "
            "importance scores see no gradient and its rank masks are undone at the next step; use backend=ddp"
        )
    return None


@rule
def _method(cfg: DictConfig) -> Iterator[Problem]:
    m = cfg.method
    if m.name not in PEFT_METHODS:
        return
    reason = refusal(m.name, cfg.backend)
    if reason:
        yield Problem("method", f"method={m.name} cannot run on backend={cfg.backend.name}: {reason}")
    yield from _knobs(m, cfg.train)
    if m.name == "qlora":
        yield from _qlora(m, cfg.backend, cfg.train)
        if cfg.cluster.gpus_per_node == 0:
            yield from _qlora_on_cpu(cfg.model)
    yield from _targets(m, cfg.model)


def _knobs(m, train) -> Iterator[Problem]:
    for key in ("r", "init_r", "target_r", "deltaT"):
        if key in m:
            yield from _positive(f"method.{key}", m[key])
    for key in ("alpha",):
        if key in m and m[key] <= 0:
            yield Problem(f"method.{key}", f"must be > 0, got {m[key]}")
    for key in ("dropout", "rank_dropout", "module_dropout"):
        if key in m and not 0 <= m[key] < 1:
            yield Problem(f"method.{key}", f"must be in [0, 1), got {m[key]}")
    if m.name == "adalora":
        if m.target_r > m.init_r:
            yield Problem(
                "method.target_r", f"{m.target_r} exceeds method.init_r={m.init_r}: AdaLoRA only removes rank"
            )
        for key in ("tinit", "tfinal"):
            yield from _positive(f"method.{key}", m[key], 0)
        if m.tinit >= train.max_steps - m.tfinal:
            yield Problem(
                "method.tinit",
                f"tinit={m.tinit} + tfinal={m.tfinal} leave no step of train.max_steps="
                f"{train.max_steps} to reallocate ranks in; lower them or raise train.max_steps",
            )
        for key in ("beta1", "beta2"):
            if not 0 < m[key] < 1:
                yield Problem(f"method.{key}", f"must be in (0, 1), got {m[key]}")
        if m.orth_reg_weight < 0:
            yield Problem("method.orth_reg_weight", f"must be >= 0, got {m.orth_reg_weight}")
    if m.name == "lokr" and not (m.factor == -1 or m.factor >= 1):
        yield Problem("method.factor", f"must be -1 (automatic) or >= 1, got {m.factor}")
    if m.name == "ia3" and m.feedforward_modules is not None:
        if m.target_modules is None:
            yield Problem(
                "method.feedforward_modules",
                "set method.target_modules too: feedforward_modules must be a subset of them",
            )
        else:
            extra = [f for f in m.feedforward_modules if f not in m.target_modules]
            if extra:
                yield Problem(
                    "method.feedforward_modules",
                    f"{', '.join(extra)} not in method.target_modules [{', '.join(m.target_modules)}]",
                )


def _qlora(m, backend, train) -> Iterator[Problem]:
    if m.quant_type not in ("nf4", "fp4"):
        yield Problem("method.quant_type", f"'{m.quant_type}' is not one of nf4, fp4")
    if m.quant_storage not in QUANT_STORAGE:
        yield Problem("method.quant_storage", f"'{m.quant_storage}' is not one of {', '.join(QUANT_STORAGE)}")
    elif backend_family(backend)[0] == "fsdp" and m.quant_storage != "auto":
        # FSDP needs one float dtype per unit; "auto" stores the 4-bit weights in the dtype the parameters
        # are loaded in (train.dtype, or fp32 where the backend keeps fp32 master weights).
        yield Problem(
            "method.quant_storage",
            f"FSDP shards 4-bit weights only when they are stored in the parameters' "
            f"dtype: set method.quant_storage=auto, not {m.quant_storage}",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        yield Problem("method", "method=qlora needs bitsandbytes: pip install 'tuneforge[qlora]'")


#: bitsandbytes' 4-bit block size: its CPU kernel lays a weight's scales out as (out, in / block), so every
#: quantised linear needs in_features divisible by it (else the first no-grad forward, an eval, fails)
BNB_CPU_BLOCK = 64


def _qlora_on_cpu(model) -> Iterator[Problem]:
    from tuneforge.launch.preflight import model_shape

    shape, _ = model_shape(model)
    if shape is None:
        return  # no sizes known here: the job finds out
    widths = {
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_heads x head_dim": shape.heads * shape.dim,
    }
    bad = {name: width for name, width in widths.items() if width % BNB_CPU_BLOCK}
    if bad:
        key = "model.name_or_path" if model.kind == "hf" else "model"  # QLoRA needs trained weights: hf
        sizes = ", ".join(f"{name} {width}" for name, width in bad.items())
        yield Problem(
            key,
            f"method=qlora on CPU (cluster.gpus_per_node=0) needs the linear layers' input widths "
            f"to be multiples of {BNB_CPU_BLOCK} (bitsandbytes' CPU kernel); this model has {sizes}",
        )


def _targets(m, model) -> Iterator[Problem]:
    """Target names against the architecture's module names, when the architecture is known here."""
    model_type = _model_type(model)
    known = KNOWN_MODULES.get(model_type)
    if known is None:
        return  # unknown architecture or remote model: checked at job start (trainers/methods.py)
    for key in ("target_modules", "feedforward_modules"):
        for name in m[key] if key in m and m[key] is not None else []:
            if str(name).rsplit(".", 1)[-1] not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                yield Problem(
                    f"method.{key}",
                    f"'{name}' is not a module of a {model_type} model; {hint}its modules are {', '.join(known)}",
                )


def _model_type(model) -> Optional[str]:
    if model.kind == "tiny":
        return "llama"
    if model.model_type:
        return model.model_type
    path = Path(str(model.name_or_path or "")).expanduser() / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError):
        return None
