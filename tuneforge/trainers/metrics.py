"""Throughput, FLOPs and memory figures logged by every run."""
from __future__ import annotations

import resource
import sys

import torch


def flops_per_token(config, trainable_params: int, total_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for a fully trained model (forward 2N, backward 4N), attention
    scores and values 12 x layers x hidden x seq_len. Frozen weights (PEFT) skip the weight-gradient
    half of their backward: 4N_frozen instead of 6N."""
    frozen = total_params - trainable_params
    dense = 6 * trainable_params + 4 * frozen
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return float(dense + attention)


def peak_memory_mb(device: str) -> float:
    """Peak memory of this rank: allocated CUDA memory on GPU, resident set size on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# ------------------------------------------------------------------------- model-state memory
# What a rank holds, by storage: compared with launch/estimate.py's params/grads/optim by
# tests/test_preflight.py. Each tensor counts its whole storage once (views of one flat buffer, tied
# weights and shared quantisation tables are not counted twice); a DTensor counts its local shard.
# DeepSpeed keeps partitions outside the module (ZeRO-3 `ds_tensor`, flat gradient partitions, fp32
# master copies): those are looked up by the attribute names DeepSpeed 0.19 uses.
_DS_GRADS = ("averaged_gradients", "grad_partitions_flat_buffer")
_DS_MASTER = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _tensors(obj, depth: int = 0):
    """Every tensor in nested dicts / lists / tuples (optimizer state, DeepSpeed partitions)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value, depth + 1)


def storage_bytes(tensors) -> int:
    storages = {}
    for t in tensors:
        t = _local(t)
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        storages[(str(storage.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _quant_tensors(p):
    """bitsandbytes 4-bit weights keep their absmax and code tables in `quant_state` (double-quantised: state2)."""
    state = getattr(p, "quant_state", None)
    while state is not None:
        tables = (getattr(state, key, None) for key in ("absmax", "code", "offset"))
        yield from (t for t in tables if isinstance(t, torch.Tensor))
        state = getattr(state, "state2", None)


def grad_bytes(engine) -> int:
    """Gradient storage this rank holds now (call after backward, before the optimizer step)."""
    params = list(engine.module.parameters())
    tensors = [p.grad for p in params if p.grad is not None]
    optimizer = getattr(engine, "optimizer", None)
    tensors += [t for name in _DS_GRADS for t in _tensors(getattr(optimizer, name, None))]
    return storage_bytes(tensors)


def model_state_bytes(engine, grads: int) -> dict:
    """Parameter and optimizer-state storage this rank holds (after an optimizer step), with `grads`."""
    params = []
    for p in engine.module.parameters():
        params.append(getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None else p)
        params.extend(_quant_tensors(p))
    optim, optimizer = [], getattr(engine, "optimizer", None)
    while optimizer is not None:  # DeepSpeed wraps the torch optimizer: walk the chain
        if isinstance(optimizer, torch.optim.Optimizer):
            optim += list(_tensors(dict(optimizer.state)))
        optim += [t for name in _DS_MASTER for t in _tensors(getattr(optimizer, name, None))]
        inner = getattr(optimizer, "optimizer", None)
        optimizer = inner if inner is not optimizer else None
    return {"mem_params_bytes": storage_bytes(params), "mem_grads_bytes": grads, "mem_optim_bytes": storage_bytes(optim)}


def gather_per_rank(value: float) -> list:
    """Collective: `value` of every rank, in rank order (for the run summary, written by rank 0)."""
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
