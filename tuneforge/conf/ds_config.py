"""The DeepSpeed JSON of a run, built from `backend` (DeepSpeedConfig) and `train`.

Pure Python (no torch, no deepspeed): launch/validate.py reports conflicts with a user's
`backend.config_file` before anything is submitted, and the task builds the same dict at start.

Our keys always win: batch sizes, gradient accumulation and clipping come from `train` (DeepSpeed's
own default clipping of 1.0 never applies), precision from `train.dtype`, ZeRO settings from the
backend config. The user's file supplies everything else (it is merged under ours). It may not carry
an "optimizer" or "scheduler" section: the optimizer and the LR schedule are trainers/optim.py's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

#: DeepSpeed's own defaults for the bucket sizes we expose (elements)
DS_DEFAULT_BUCKETS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
}
#: sections a config file may not set: trainers/optim.py owns the optimizer and the schedule
FORBIDDEN_SECTIONS = ("optimizer", "scheduler")
BUCKET_ALIGNMENT = 512  # DeepSpeed asks bucket sizes to be multiples of its alignment factor


def build(backend, train, world_size: int, trainable_params: Optional[int] = None) -> Dict[str, Any]:
    """Our keys only (no user file). `trainable_params` caps the buckets; None leaves DeepSpeed's defaults."""
    zero: Dict[str, Any] = {
        "stage": backend.stage,
        "overlap_comm": backend.overlap_comm,
        "contiguous_gradients": backend.contiguous_gradients,
        "reduce_bucket_size": _bucket(backend.reduce_bucket_size, "reduce_bucket_size", trainable_params),
    }
    if backend.stage < 3:
        zero["allgather_bucket_size"] = _bucket(
            backend.allgather_bucket_size, "allgather_bucket_size", trainable_params
        )
    else:
        zero["stage3_prefetch_bucket_size"] = _bucket(
            backend.prefetch_bucket_size, "stage3_prefetch_bucket_size", trainable_params
        )
        zero["stage3_param_persistence_threshold"] = (
            backend.param_persistence_threshold
            if backend.param_persistence_threshold is not None
            else DS_DEFAULT_BUCKETS["stage3_param_persistence_threshold"]
        )
        # save_checkpoint writes the sharded fp32 state; final/ and export gather it themselves
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    # Always explicit ("none" too), so that a file switching offload on conflicts instead of slipping in.
    zero["offload_optimizer"] = {"device": "cpu" if backend.offload_optimizer else "none"}
    zero["offload_param"] = {"device": "cpu" if backend.offload_params else "none"}
    accumulation = train.global_batch // (train.micro_batch * world_size)
    return {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": float(train.grad_clip),
        "bf16": {"enabled": train.dtype == "bf16"},
        "fp16": {"enabled": train.dtype == "fp16"},
        "zero_optimization": zero,
        # the optimizer is a torch AdamW (or DeepSpeedCPUAdam under offload) built by trainers/optim.py
        "zero_allow_untested_optimizer": True,
    }


#: defaults of ours that a user's file may change (merged under the file)
QUIET = {
    "steps_per_print": 1_000_000_000,  # the trainer logs; DeepSpeed's progress lines only add noise
    "wall_clock_breakdown": False,
}


def merged(backend, train, world_size: int, trainable_params: Optional[int] = None) -> Dict[str, Any]:
    """The user's file (if any) with our keys laid over it."""
    theirs = read_file(backend.config_file) if backend.config_file else {}
    return _merge(_merge(QUIET, theirs), build(backend, train, world_size, trainable_params))


def read_file(path: str) -> Dict[str, Any]:
    data = json.loads(Path(path).expanduser().read_text())
    if not isinstance(data, dict):
        raise ValueError("a DeepSpeed config is a JSON object")
    return data


def conflicts(backend, train, world_size: int) -> Iterator[Tuple[str, Any, Any]]:
    """(dotted key, value in the file, our value) for every key the user's file sets differently.

    Bucket sizes left at None are ours only once the model is known: a file may set those freely.
    DeepSpeed's "auto" values (as HF configs carry) never conflict: we fill them in.
    """
    if not backend.config_file:
        return
    theirs = read_file(backend.config_file)
    for section in FORBIDDEN_SECTIONS:
        if section in theirs:
            yield section, theirs[section], "trainers/optim.py (train.lr, train.schedule, train.beta1, ...)"
    ours = build(backend, train, world_size)
    for key, value in _leaves(ours):
        if key.split(".")[-1] in DS_DEFAULT_BUCKETS and _bucket_is_auto(backend, key):
            continue
        found, theirs_value = _lookup(theirs, key)
        if found and theirs_value != "auto" and not _same(theirs_value, value):
            yield key, theirs_value, value


def our_key(ds_key: str) -> str:
    """The tuneforge key that decides a DeepSpeed key, for error messages ("": tuneforge fixes it)."""
    names = {
        "train_batch_size": "train.global_batch",
        "train_micro_batch_size_per_gpu": "train.micro_batch",
        "gradient_accumulation_steps": "train.global_batch / (train.micro_batch x world size)",
        "gradient_clipping": "train.grad_clip",
        "bf16.enabled": "train.dtype",
        "fp16.enabled": "train.dtype",
        "zero_optimization.stage": "backend.stage",
        "zero_optimization.offload_optimizer": "backend.offload_optimizer",
        "zero_optimization.offload_param": "backend.offload_params",
        "zero_optimization.reduce_bucket_size": "backend.reduce_bucket_size",
        "zero_optimization.allgather_bucket_size": "backend.allgather_bucket_size",
        "zero_optimization.stage3_prefetch_bucket_size": "backend.prefetch_bucket_size",
        "zero_optimization.stage3_param_persistence_threshold": "backend.param_persistence_threshold",
        "zero_optimization.overlap_comm": "backend.overlap_comm",
        "zero_optimization.contiguous_gradients": "backend.contiguous_gradients",
    }
    for prefix, name in names.items():
        if ds_key == prefix or ds_key.startswith(prefix + "."):
            return name
    return ""


def _bucket(value: Optional[int], ds_key: str, trainable_params: Optional[int]) -> int:
    if value is not None:
        return int(value)
    default = DS_DEFAULT_BUCKETS[ds_key]
    if trainable_params is None:
        return default
    capped = -(-max(trainable_params, 1) // BUCKET_ALIGNMENT) * BUCKET_ALIGNMENT
    return min(default, capped)


def _bucket_is_auto(backend, key: str) -> bool:
    field = {
        "zero_optimization.reduce_bucket_size": "reduce_bucket_size",
        "zero_optimization.allgather_bucket_size": "allgather_bucket_size",
        "zero_optimization.stage3_prefetch_bucket_size": "prefetch_bucket_size",
        "zero_optimization.stage3_param_persistence_threshold": "param_persistence_threshold",
    }.get(key)
    return field is not None and getattr(backend, field) is None


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _leaves(d: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _lookup(d: Dict[str, Any], dotted: str) -> Tuple[bool, Any]:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b
