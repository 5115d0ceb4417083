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
