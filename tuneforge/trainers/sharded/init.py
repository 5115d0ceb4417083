"""Random initialisation for pretraining, identical on every world size and backend.

A sharded rank must produce its shard of every parameter without the rest of the model. One global
random stream (what `torch.manual_seed(seed); from_config(config)` does) cannot give that: a rank would
have to draw every earlier parameter to reach its own. Instead the model is cut into init units, each with
its own seed derived from (seed, unit name): every transformer block is one unit, and every other module
that holds parameters (embeddings, final norm, head) is one. A unit is materialised on the CPU at full
size, initialised by the model's own `_init_weights` (so each architecture keeps its distributions:
normal(0, initializer_range) for linears and embeddings, padding row zeroed, ones for norms), sliced to
what the rank holds, and dropped. At most one unit is alive at a time.

The values therefore differ from a plain seeded `from_config` (same distributions, other draws), but they
are the same for world size 1 and N, for ddp, fsdp and zero3, and for any sharding: the world-1 run is the
reference. `dense_initialized` gives them to an unsharded model (ddp, zero1/2) so every backend starts
pretraining from the same weights.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from tuneforge.compat.transformers import guard_torch_init_functions, init_module_weights
from tuneforge.trainers.sharded.meta import own_parameters


def unit_seed(seed: int, unit: str) -> int:
    digest = hashlib.sha256(f"{seed}/{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_blocks(model: nn.Module) -> List[str]:
    """The model's own transformer block classes (transformers' `_no_split_modules`)."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return sorted(names)
    return []


class InitUnit:
    def __init__(self, name: str, module: nn.Module, recurse: bool):
        self.name, self.module, self.recurse = name, module, recurse


def init_units(model: nn.Module, block_classes: Sequence[str]) -> List[InitUnit]:
    """Transformer blocks (whole subtrees) and every other module with parameters of its own, in module order."""
    blocks = set(block_classes)
    units, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if type(module).__name__ in blocks and module is not model:
            units.append(InitUnit(name, module, recurse=True))
            inside.add(name + ".")
        elif own_parameters(module):
            units.append(InitUnit(name, module, recurse=False))
    return units


class InitSource:
    """A source (see fill.py) whose tensors are the initial values of a model built from its config.

    `model` is the meta model (before any PEFT wrap: names are the transformers model's); it is copied,
    the caller's model is not touched. `read_flat(name, start, stop, out)` materialises the unit holding
    `name` (if it is not the one cached) and copies elements [start, stop) of that parameter.
    """

    def __init__(self, model: nn.Module, seed: int, block_classes: Sequence[str]):
        self.model = copy.deepcopy(model)  # meta: costs nothing; keeps ties
        self.seed = seed
        self.units = init_units(self.model, block_classes)
        self._owner = _owners(self.model)
        self._unit_of: Dict[str, int] = {}
        self._first_unit_of_param: Dict[int, int] = {}
        for i, unit in enumerate(self.units):
            prefix = unit.name + "." if unit.name else ""
            params = unit.module.named_parameters() if unit.recurse else unit.module.named_parameters(recurse=False)
            for local, param in params:
                self._first_unit_of_param.setdefault(id(param), i)
                # a tied parameter is initialised by the first unit holding it; its other names read that
                self._unit_of[prefix + local] = self._first_unit_of_param[id(param)]
        self._cached: Optional[int] = None
        self._values: Dict[str, torch.Tensor] = {}
        self.bytes_generated = 0

    def __contains__(self, name: str) -> bool:
        return name in self._unit_of

    def shape(self, name: str):
        return tuple(self.model.get_parameter(name).shape)

    def read_flat(self, name: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if name not in self._unit_of:
            raise KeyError(f"{name!r} is not a parameter of the model being initialised")
        index = self._unit_of[name]
        if index != self._cached:
            self._values = self._materialise(index)
            self._cached = index
        flat = self._values[name].reshape(-1)[start:stop]
        if out is None:
            return flat.clone()
        return out.copy_(flat.view(out.shape))

    def release(self) -> None:
        self._values, self._cached = {}, None

    def _materialise(self, index: int) -> Dict[str, torch.Tensor]:
        self._values = {}  # free the previous unit first
        unit = self.units[index]
        prefix = unit.name + "." if unit.name else ""
        modules = list(unit.module.modules()) if unit.recurse else [unit.module]
        originals: List[Tuple[nn.Module, str, nn.Parameter]] = []
        real: Dict[int, nn.Parameter] = {}
        for module in modules:
            for attr, param in own_parameters(module):
                if self._first_unit_of_param.get(id(param)) != index:
                    continue
                if id(param) not in real:
                    real[id(param)] = nn.Parameter(
                        torch.empty(param.shape, dtype=param.dtype), requires_grad=param.requires_grad
                    )
                originals.append((module, attr, param))
                setattr(module, attr, real[id(param)])
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad(), guard_torch_init_functions():
                torch.manual_seed(unit_seed(self.seed, unit.name))
                for module in _post_order(unit.module) if unit.recurse else [unit.module]:
                    init_module_weights(self._owner[module], module)
            values = {}
            names = (
                unit.module.named_parameters(remove_duplicate=False)
                if unit.recurse
                else unit.module.named_parameters(recurse=False, remove_duplicate=False)
            )
            for local, param in names:
                if param.device.type != "meta":
                    values[prefix + local] = param.detach()
                    self.bytes_generated += param.numel() * param.element_size()
        finally:
            for module, attr, param in originals:
                setattr(module, attr, param)
        # names of this unit's parameters in other units (ties) read the same tensor
        for name, i in self._unit_of.items():
            if i == index and name not in values:
                values[name] = self._tied_value(name, values)
        return values

    def _tied_value(self, name: str, values: Dict[str, torch.Tensor]) -> torch.Tensor:
        target = self.model.get_parameter(name)
        for other, param in self.model.named_parameters(remove_duplicate=False):
            if param is target and other in values:
                return values[other]
        raise KeyError(name)


def _post_order(module: nn.Module):
    """Children before parents, as transformers' `initialize_weights` (smart_apply) visits them."""
    for child in module.children():
        yield from _post_order(child)
    yield module


def _owners(model: nn.Module) -> Dict[nn.Module, nn.Module]:
    """{module: the innermost transformers PreTrainedModel holding it} (whose _init_weights applies)."""
    from transformers import PreTrainedModel

    owners: Dict[nn.Module, nn.Module] = {}

    def walk(module, owner):
        if isinstance(module, PreTrainedModel):
            owner = module
        owners[module] = owner
        for child in module.children():
            walk(child, owner)

    walk(model, model if isinstance(model, PreTrainedModel) else None)
    if any(owner is None for owner in owners.values()):
        raise TypeError(f"{type(model).__name__} is not a transformers model")
    return owners


def dense_initialized(
    model: nn.Module, seed: int, block_classes: Optional[Sequence[str]] = None, device="cpu"
) -> nn.Module:
    """A meta model materialised whole on `device` with the initial values (world size 1, ddp, zero1/2)."""
    from tuneforge.trainers.sharded.fill import fill_from, whole
    from tuneforge.trainers.sharded.meta import init_buffers, materialize

    source = InitSource(model, seed, block_classes or init_blocks(model))
    materialize(model, device)
    fill_from(model, {m: n for n, m in model.named_modules()}, source, whole)
    source.release()
    init_buffers(model)
    return model
