"""DeepSpeed internals: where its ZeRO optimizers keep the partitions a rank holds (0.19's attribute
names), for the trainer's measured model-state bytes."""

from __future__ import annotations

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
