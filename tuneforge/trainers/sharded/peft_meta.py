"""A PEFT method applied to a base that is on the meta device, with the adapters a real base would get.

peft places each new adapter on its base layer's device, so on a meta base the adapters' initial values
would be lost. Instead the base is briefly given *skeleton* weights: real CPU tensors of the right shape and
dtype whose storage is a single element (`torch.zeros(()).expand(shape)`), so peft runs exactly as on a
loaded model (same code, same random draws in the same order as `torch.manual_seed(seed);
get_peft_model(model)`), while the base costs nothing. Afterwards the base goes back to meta and the
adapters' values are kept, full size, in a dict (they are small); the caller shards the model, fills the
base from the checkpoint and the adapters from that dict.

Values peft derives from the base weights at creation are wrong on a skeleton and are recomputed after the
base is filled: DoRA's magnitude vector (`recompute_dora_magnitudes`). LoRA variants that rewrite the base
at init (PiSSA, OLoRA, LoftQ, EVA) are refused.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from tuneforge.trainers.sharded.meta import meta_like, own_parameters, replace_parameters

BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "eva", "corda")


def skeleton_like(param: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.zeros((), dtype=param.dtype).expand(param.shape), requires_grad=param.requires_grad)


def is_skeleton(param: torch.Tensor) -> bool:
    return param.device.type == "cpu" and all(s == 0 for s in param.stride())


class WrappedOnMeta:
    """The result of `wrap_on_meta`: everything on meta again, plus what the caller needs to fill it."""

    def __init__(
        self,
        model: nn.Module,
        adapter_values: Dict[Tuple[nn.Module, str], torch.Tensor],
        derived: List[Tuple[nn.Module, str]],
        extra,
    ):
        self.model = model
        self.adapter_values = adapter_values  # (module, attribute) -> full initial value
        self.derived = derived  # (peft layer, adapter name): DoRA magnitudes to recompute
        self.extra = extra  # whatever `wrap` returned besides the model (tuneforge's method hooks)


def wrap_on_meta(model: nn.Module, wrap: Callable[[nn.Module], object]) -> WrappedOnMeta:
    """Apply `wrap(model)` (returns the wrapped model, or (model, extra)) to a meta model."""
    base = {id(p) for p in replace_parameters(model, skeleton_like).values()}
    result = wrap(model)
    wrapped, extra = result if isinstance(result, tuple) else (result, None)
    _refuse_base_rewriting(wrapped)
    adapter_values: Dict[Tuple[nn.Module, str], torch.Tensor] = {}
    for module in wrapped.modules():
        for attr, param in own_parameters(module):
            if id(param) in base:
                if not is_skeleton(param):  # something wrote the base: its values would be lost
                    raise RuntimeError(f"{type(module).__name__}.{attr}: the PEFT wrap replaced a base weight's data")
            elif param.device.type != "meta":
                adapter_values[(module, attr)] = param.detach()
    derived = dora_layers(wrapped)
    for layer, adapter in derived:  # made from the skeleton: recomputed after the base is loaded
        adapter_values.pop((layer.lora_magnitude_vector[adapter], "weight"), None)
    replace_parameters(wrapped, meta_like)
    return WrappedOnMeta(wrapped, adapter_values, derived, extra)


def dora_layers(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    layers = []
    for module in model.modules():
        vectors = getattr(module, "lora_magnitude_vector", None)
        if isinstance(vectors, nn.ModuleDict):
            layers += [(module, adapter) for adapter in vectors.keys()]
    return layers


def adapter_resolver(wrapped: WrappedOnMeta):
    """fill.Resolver for the adapters' saved values (keyed by module and attribute)."""
    from tuneforge.trainers.sharded.fill import TensorDictSource

    values = {f"{id(m)}.{a}": v for (m, a), v in wrapped.adapter_values.items()}
    source = TensorDictSource(values)

    def resolve(module, attr, qualified):
        key = f"{id(module)}.{attr}"
        return (source, key) if key in values else None

    return resolve


@torch.no_grad()
def recompute_dora_magnitudes(wrapped: WrappedOnMeta, local: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """DoRA's magnitude m = ||W + scaling * B A|| per output row, as peft computes it at creation, from
    each rank's rows: W, B and m are all split on the output dimension in the same way, A is whole (kept in
    `adapter_values`). `local(param)` gives the rows this rank holds (FSDP: the DTensor's local tensor)."""
    count = 0
    for layer, adapter in wrapped.derived:
        base = layer.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise NotImplementedError(f"DoRA on {type(base).__name__} is not loaded sharded (only Linear)")
        weight = local(base.weight)
        lora_a = wrapped.adapter_values[(layer.lora_A[adapter], "weight")]
        lora_b = local(layer.lora_B[adapter].weight)
        magnitude = layer.lora_magnitude_vector[adapter]
        # peft computes in the base's dtype (the adapters are cast to it at creation, upcast afterwards)
        lora_weight = lora_b.to(weight.dtype) @ lora_a.to(weight.dtype)
        norm = magnitude.get_weight_norm(weight, lora_weight, layer.scaling[adapter])
        local(magnitude.weight).copy_(norm)
        count += 1
    return count


def _refuse_base_rewriting(model: nn.Module) -> None:
    for config in (getattr(model, "peft_config", None) or {}).values():
        init = str(getattr(config, "init_lora_weights", True)).lower()
        if any(init.startswith(name) for name in BASE_REWRITING_INITS):
            raise NotImplementedError(
                f"init_lora_weights={init!r} rewrites the base weights at creation; "
                "it cannot be applied to a base loaded sharded"
            )
