"""torch internals (no public API does these)."""

from __future__ import annotations


def default_store():
    """The key-value store of the default process group (rank 0's TCPStore), for waiting without a
    collective timeout; None when there is no process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.distributed_c10d._get_default_store()


def scale_in_place(tensors, factor: float) -> None:
    """Multiply every tensor by `factor` in one foreach kernel (torch's private _foreach_mul_)."""
    import torch

    torch._foreach_mul_(tensors, factor)


def non_persistent_buffers(module) -> set:
    """Names of `module`'s own buffers left out of its state_dict (rotary `inv_freq`): no public accessor."""
    return set(module._non_persistent_buffers_set)


def dim0_shard(param):
    """(local flat storage, first element, end) of an FSDP2 DTensor sharded on dim 0 over a 1-D mesh: the
    rows torch.chunk gives this rank (ceil(rows / world) each, the last ones shorter or empty), as one
    contiguous element range of the row-major whole tensor. Computed here from the placement rather than
    with torch's private `compute_local_shape_and_global_offset`."""
    from torch.distributed.tensor import Shard

    placements = [p for p in param.placements if not p.is_replicate()]
    if param.device_mesh.ndim != 1 or any(not isinstance(p, Shard) or p.dim != 0 for p in placements):
        raise ValueError(f"only dim-0 sharding on a 1-D mesh is filled here, got {param.placements}")
    local = param.to_local()
    rows = param.shape[0] if len(param.shape) else 1
    world, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = -(-rows // world) if placements else rows
    first = min(rank * chunk, rows) if placements else 0
    expected = (min(first + chunk, rows) - first) if placements else rows
    if (len(param.shape) and local.shape[0] != expected) or not local.is_contiguous():
        raise ValueError(f"unexpected local shard {tuple(local.shape)} of {tuple(param.shape)} on rank {rank}")
    row = 1
    for s in param.shape[1:]:
        row *= s
    start = first * row
    return local.view(-1), start, start + local.numel()
