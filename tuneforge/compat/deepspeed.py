"""DeepSpeed internals: where its ZeRO optimizers keep the partitions a rank holds (0.19's attribute
names), for the trainer's measured model-state bytes; what a ZeRO-3 parameter holds (`ds_*` attributes), and
zero.Init's construction-time broadcast, for building a model partitioned from the start (trainers/sharded/)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

#: flat gradient partitions of the ZeRO-1/2 and ZeRO-3 optimizers
GRAD_PARTITIONS = ("averaged_gradients", "grad_partitions_flat_buffer")
#: fp32 master copies of the trainable weights
MASTER_PARTITIONS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


def partitions(optimizer, names) -> Iterator[Any]:
    """The objects held under `names` by a DeepSpeed optimizer (absent ones skipped)."""
    for name in names:
        value = getattr(optimizer, name, None)
        if value is not None:
            yield value


# ------------------------------------------------------------------ ZeRO-3 parameters (trainers/sharded/)
def full_numel(param) -> int:
    """Elements of a parameter whose storage may be a ZeRO-3 partition (`ds_numel`: its `numel()` is then 0)."""
    return getattr(param, "ds_numel", None) or param.numel()


def is_partitioned(param) -> bool:
    """A parameter made under `deepspeed.zero.Init` (it carries `ds_id`)."""
    return hasattr(param, "ds_id")


def full_shape(param):
    """The shape of the whole parameter (`ds_shape` for a ZeRO-3 one, whose `.shape` is a placeholder's)."""
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


def partition(param):
    """(flat local storage, first element, end, full shape) of the elements [start, stop) of the row-major
    whole parameter that this rank keeps: ZeRO-3 cuts the flattened parameter into `ds_tensor.ds_numel`
    elements per rank of its group, the last partition padded (the padding, zeroed here, is excluded)."""
    import torch.distributed as dist

    size = param.ds_tensor.ds_numel
    rank = dist.get_rank(group=param.ds_process_group)
    start = min(rank * size, param.ds_numel)
    stop = min(start + size, param.ds_numel)
    local = param.ds_tensor.data
    if stop - start < size:
        local[stop - start :].zero_()
    return local[: stop - start], start, stop, tuple(param.ds_shape)


@contextlib.contextmanager
def construction_without_broadcast():
    """Inside `deepspeed.zero.Init`, convert and partition each new parameter without broadcasting it.

    zero.Init broadcasts every parameter from rank 0 as it is made (`Init._zero_init_param`, 0.19), so that
    random initial values agree. trainers/sharded/ writes every element of every partition afterwards (from
    the checkpoint or its own init), so that broadcast only moves the whole model to every rank for nothing;
    it also cost memory (0.5B Llama x 4 gloo ranks: the receiving ranks kept 0.7-0.9 GiB of freed receive
    buffers in glibc's arenas). While this is active, `_zero_init_param` only converts and partitions. A
    DeepSpeed whose Init lacks those two methods is left as it is (the broadcast then costs time, not results).
    """
    from deepspeed.runtime.zero import partition_parameters as pp

    original = getattr(pp.Init, "_zero_init_param", None)
    if original is None or not hasattr(pp.Init, "_convert_to_deepspeed_param"):
        yield
        return

    def convert_and_partition(self, param):
        self._convert_to_deepspeed_param(param)
        param.partition()

    pp.Init._zero_init_param = convert_and_partition
    try:
        yield
    finally:
        pp.Init._zero_init_param = original
