"""Which elements of each parameter this rank holds, and filling them from a source.

A placement maps a parameter to (local flat tensor, first global element, end): the elements [start, stop)
of the row-major full tensor that this rank stores, and where. FSDP2 shards dim 0 (torch.chunk: ceil(rows
/ world) rows per rank, the last ones shorter or empty), so a shard is a contiguous element range; ZeRO-3
partitions the flattened parameter into ceil(numel / world) elements per rank (the last padded). Either
way a rank asks its source for exactly the elements it keeps.

A source has `shape(name)` and `read_flat(name, start, stop, out)`: `ShardedCheckpoint` (the safetensors
of a model dir), `init.InitSource` (pretraining), `TensorDictSource` (adapters kept in memory).
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from tuneforge.compat import deepspeed as deepspeed_compat
from tuneforge.compat import torch as torch_compat

Placement = Callable[[torch.Tensor], Tuple[torch.Tensor, int, int, Tuple[int, ...]]]


def whole(param: torch.Tensor):
    """An unsharded tensor: all of it."""
    data = param.data if isinstance(param, nn.Parameter) else param
    return data.view(-1), 0, data.numel(), tuple(data.shape)


def fsdp_shard(param: torch.Tensor):
    """An FSDP2 parameter: a DTensor sharded on dim 0 (one mesh dimension); its local rows."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return whole(param)
    local, start, stop = torch_compat.dim0_shard(param)
    return local, start, stop, tuple(param.shape)


def zero3_partition(param: torch.Tensor):
    """A ZeRO-3 parameter (deepspeed.zero.Init): its flat partition `ds_tensor`, padding excluded."""
    if not deepspeed_compat.is_partitioned(param):
        return whole(param)
    return deepspeed_compat.partition(param)


class TensorDictSource:
    """Full tensors held in memory (adapter weights made before sharding), keyed by name."""

    def __init__(self, values: Mapping[str, torch.Tensor]):
        self.values = dict(values)

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def shape(self, name: str):
        return tuple(self.values[name].shape)

    def read_flat(self, name: str, start: int, stop: int, out: Optional[torch.Tensor] = None):
        flat = self.values[name].reshape(-1)[start:stop]
        return flat.clone() if out is None else out.copy_(flat.view(out.shape))


def source_shape(source, name: str) -> Tuple[int, ...]:
    return tuple(source.shape(name))


Resolver = Callable[[nn.Module, str, str], Optional[Tuple[object, str]]]


@torch.no_grad()
def fill_parameters(model: nn.Module, resolve: Resolver, place: Placement, buffers: bool = True) -> Dict[str, int]:
    """Fill every parameter (each once: ties share one) and, with `buffers`, every persistent buffer that
    `resolve(module, attr, qualified name)` maps to (source, key); a None answer leaves the tensor alone.
    Returns {qualified name: elements filled} for what was filled."""
    filled: Dict[str, int] = {}
    seen = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        params = dict(module.named_parameters(recurse=False, remove_duplicate=False))
        tensors = list(params.items())
        if buffers:
            skip = torch_compat.non_persistent_buffers(module)
            tensors += [(b, t) for b, t in module.named_buffers(recurse=False, remove_duplicate=False) if b not in skip]
        for attr, tensor in tensors:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            qualified = f"{module_name}.{attr}" if module_name else attr
            found = resolve(module, attr, qualified)
            if found is None:
                continue
            source, key = found
            out, start, stop, shape = place(tensor) if attr in params else whole(tensor)
            expected = source_shape(source, key)
            if tuple(expected) != tuple(shape):
                raise ValueError(
                    f"{qualified}: the model's shape {tuple(shape)} != {tuple(expected)} of {key!r} in the source"
                )
            source.read_flat(key, start, stop, out)
            filled[qualified] = stop - start
    return filled


def checkpoint_key(model: nn.Module, checkpoint, name: str) -> Optional[str]:
    """The checkpoint's name for the model's tensor `name` (also with or without the base_model_prefix)."""
    if name in checkpoint:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in checkpoint:
            return name[len(prefix) + 1 :]
        if f"{prefix}.{name}" in checkpoint:
            return f"{prefix}.{name}"
    return None


def base_resolver(names: Mapping[nn.Module, str], source, model_for_prefix: Optional[nn.Module] = None) -> Resolver:
    """Resolve tensors of the modules in `names` (the base model's, by their base names) from `source`;
    a base tensor the source lacks is an error (a checkpoint that does not fit the architecture)."""

    def resolve(module, attr, qualified):
        base = names.get(module)
        if base is None:
            return None
        name = f"{base}.{attr}" if base else attr
        key = (
            checkpoint_key(model_for_prefix, source, name)
            if model_for_prefix is not None
            else (name if name in source else None)
        )
        if key is None:
            raise KeyError(
                f"{name}: not in the checkpoint (an architecture whose checkpoint names transformers "
                "converts while loading cannot be loaded sharded yet)"
            )
        return source, key

    return resolve


def fill_from(model: nn.Module, names: Mapping[nn.Module, str], source, place: Placement) -> Dict[str, int]:
    return fill_parameters(model, base_resolver(names, source), place)
