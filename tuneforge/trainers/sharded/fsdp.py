"""FSDP2 sharded from the start: meta model -> (PEFT wrap) -> fully_shard -> local shards -> filled.

No rank ever holds a full parameter. Each one builds the model on the meta device, lets the caller's
`shard` apply `fully_shard` (each transformer block, then the root: what backends/fsdp.py does), allocates
only its own shards (`to_empty`), and reads into them exactly its rows of every tensor from the
checkpoint's safetensors (or, pretraining, its rows of each init unit, see init.py). The non-persistent
buffers are then initialised by the model itself, as `from_pretrained` does, and tied weights stay one
parameter (FSDP2 shards a shared parameter once, in the group of the module that holds it first).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from tuneforge.trainers.sharded import fill, meta
from tuneforge.trainers.sharded.init import InitSource, init_blocks
from tuneforge.trainers.sharded.safetensors_io import ShardedCheckpoint


@dataclass
class LoadStats:
    """What one rank did while building its part of the model."""

    seconds: float = 0.0
    bytes_read: int = 0  # from the checkpoint's safetensors
    bytes_generated: int = 0  # random init (pretraining): full units made on this rank
    elements_filled: int = 0  # elements this rank holds
    checkpoint_bytes: int = 0  # the whole checkpoint
    details: Dict[str, int] = field(default_factory=dict)


def build_fsdp_model(
    config,
    *,
    dtype: torch.dtype,
    shard: Callable[[nn.Module], None],
    block_classes: Optional[Sequence[str]] = None,
    weights: Optional[str] = None,
    seed: int = 0,
    device: str = "cpu",
    buffer_device: Optional[str] = None,
    wrap: Optional[Callable[[nn.Module], object]] = None,
    attn_implementation: Optional[str] = None,
    trust_remote_code: bool = False,
):
    """Returns (model, extra, LoadStats): the model already sharded by `shard`; `extra` is what `wrap`
    returned besides the model (None without `wrap`).

    config: the transformers config; weights: a model directory with safetensors, or None for the random
    init of init.py (seeded by `seed`); wrap(model) -> model or (model, extra): a PEFT method, applied
    before sharding (peft_meta.py); shard(model): applies fully_shard to the blocks and the root;
    block_classes: the init units of the random init (default: the model's `_no_split_modules`, the same
    whatever the backend shards, so that every backend starts from the same weights); device: where the
    shards live (the CPU under FSDP's CPU offload); buffer_device: where the buffers go (the GPU the forward
    runs on, when the shards are offloaded; default: `device`).
    """
    from torch.distributed.fsdp import FSDPModule

    started = time.perf_counter()
    model = meta.build_meta_model(config, dtype, attn_implementation, trust_remote_code)
    base_names = meta.module_names(model)
    source = open_source(weights) if weights is not None else None
    if source is None:
        source = InitSource(model, seed, block_classes or init_blocks(model))
    wrapped = None
    if wrap is not None:
        from tuneforge.trainers.sharded.peft_meta import wrap_on_meta

        wrapped = wrap_on_meta(model, wrap)
        model = wrapped.model
    shard(model)
    if not isinstance(model, FSDPModule):
        raise ValueError("shard(model) must apply fully_shard to the model (its root)")
    model.to_empty(device=device)
    filled = fill_sharded(model, base_names, source, wrapped, fill.fsdp_shard, prefix_model=_inner(model))
    if buffer_device is not None and buffer_device != device:
        meta.move_buffers(model, buffer_device)
    stats = LoadStats(seconds=time.perf_counter() - started, elements_filled=sum(filled.values()))
    finish_source(source, stats)
    return model, (wrapped.extra if wrapped else None), stats


def open_source(weights):
    """The source of a build: a model directory's safetensors (a path), or a source object as it is."""
    if isinstance(weights, (str, os.PathLike)):
        return ShardedCheckpoint(weights)
    return weights


def finish_source(source, stats: LoadStats) -> None:
    """Record what the source read (or generated) in `stats`, and release it."""
    if hasattr(source, "bytes_read"):
        stats.bytes_read = source.bytes_read
        stats.checkpoint_bytes = source.checkpoint_bytes()
        source.close()
    else:
        stats.bytes_generated = source.bytes_generated
        source.release()


def fill_sharded(model: nn.Module, base_names, source, wrapped, place, prefix_model=None) -> Dict[str, int]:
    """Fill the base from `source`, the adapters from their saved values, recompute DoRA magnitudes,
    initialise the non-persistent buffers; fail if any parameter was left unfilled."""
    resolvers = [fill.base_resolver(base_names, source, prefix_model)]
    derived = set()
    if wrapped is not None:
        from tuneforge.trainers.sharded.peft_meta import adapter_resolver

        resolvers.append(adapter_resolver(wrapped))
        derived = {id(layer.lora_magnitude_vector[a].weight) for layer, a in wrapped.derived}

    def resolve(module, attr, qualified):
        for r in resolvers:
            found = r(module, attr, qualified)
            if found is not None:
                return found
        return None

    filled = fill.fill_parameters(model, resolve, place)
    if wrapped is not None and wrapped.derived:
        from tuneforge.trainers.sharded.peft_meta import recompute_dora_magnitudes

        recompute_dora_magnitudes(wrapped, _local)
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [names[i] for i in names if i not in derived and names[i] not in filled]
    if missing:
        raise RuntimeError(f"{len(missing)} parameter(s) had no source, first {missing[0]}")
    meta.init_buffers(model)
    return filled


def _local(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param.data


def _inner(model: nn.Module):
    """The transformers model (for its base_model_prefix)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    return None


def shard_blocks(mesh, block_classes: Sequence[str], reshard_after_forward: bool = True, **fsdp_kwargs):
    """A `shard` callable: fully_shard each transformer block, then the root (kept gathered after the
    forward), as backends/fsdp.py does. For tests and benchmarks; the trainer passes its backend's own."""
    from torch.distributed.fsdp import fully_shard

    def shard(model: nn.Module) -> None:
        names = set(block_classes)
        for module in [m for m in model.modules() if type(m).__name__ in names and m is not model]:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
        fully_shard(model, mesh=mesh, reshard_after_forward=False, **fsdp_kwargs)

    return shard
