"""PEFT per family: which weights a method adapts, what peft cannot do there, and the adapter's size.

The launcher counts adapters with these lists and the trainer hands the same lists to peft (explicit
paths, never peft's "all-linear" or its per-model tables), so the count before launch is the count
after, for every family. What a method can adapt is its description (conf/methods.py: `adapts`,
`default_roles`, `feedforward_roles`, `quantized`), passed in as `spec`; the method's config gives
`target_modules`, `feedforward_modules` and `dropout`. Duck-typed: arch imports no other part.

Defaults (method.target_modules unset): every weight of the decoder layers of a kind the method adapts
(nn.Linear, GPT-2's Conv1D, a mixture of experts' stacked expert weights and router, which peft's LoRA
adapts as parameters: `target_parameters`, its ParamWrapper, which has no dropout), or the weights of the
method's default roles (IA3: k, v or the fused qkv, and down, scaled on its input side).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, List, Tuple

from tuneforge.arch.shape import ModelShape, Weight

#: weights peft adapts as parameters (target_parameters), not as modules
PARAMETER_KINDS = ("experts", "router")
KIND_NAMES = {
    "linear": "linear layers",
    "conv1d": "GPT-2-style Conv1D layers",
    "experts": "stacked expert weights",
    "router": "router weights",
}


@dataclass(frozen=True)
class Targets:
    """What to hand peft: module paths (target_modules), parameter paths (target_parameters), IA3's
    feedforward modules; paths relative to a decoder layer (peft matches suffixes). `weights`: the
    (layers holding it, weight) chosen, for the count; `skipped`: default weights the method cannot adapt."""

    modules: Tuple[str, ...]
    parameters: Tuple[str, ...] = ()
    feedforward: Tuple[str, ...] = ()
    weights: Tuple[Tuple[int, Weight], ...] = ()
    skipped: Tuple[str, ...] = ()
    unadaptable: Tuple[Weight, ...] = ()  # requested weights of a kind the method cannot adapt


def _matches(w: Weight, name: str) -> bool:
    return w.name == name or w.name.endswith("." + name)


def _param_path(w: Weight) -> str:
    return w.name + ".weight" if w.kind == "router" else w.name


def _requested(value) -> List[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def targets(shape: ModelShape, spec, method_cfg) -> Targets:
    """The weights `method_cfg` adapts on `shape`: method.target_modules (leaf names, dotted suffixes,
    or "all-linear") or the method's default. Raises ValueError naming a target that matches nothing."""
    layer: dict = {}
    for count, w in shape.all_weights():  # a weight in several kinds of layer (MoE + dense): counted in each
        layer.setdefault(w.name, []).append((count, w))
    unique = [ws[0][1] for ws in layer.values()]
    kinds = tuple(spec.adapts)
    requested = _requested(method_cfg.target_modules)
    ff_given = getattr(method_cfg, "feedforward_modules", None)
    ff_requested = _requested(ff_given)
    outer: List[Weight] = []
    if not requested or requested == ["all-linear"]:
        roles = None if requested else spec.default_roles
        chosen = [w for w in unique if w.kind in kinds and (roles is None or w.role in roles)]
        skipped = tuple(w.name for w in unique if w.kind not in kinds and (roles is None or w.role in roles))
        unadaptable: Tuple[Weight, ...] = ()
    else:
        known = unique + list(shape.outer)
        unknown = [n for n in requested + ff_requested if not any(_matches(w, n) for w in known)]
        if unknown:
            names = sorted({n for w in known for n in (w.leaf, w.name)})
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"{', '.join(map(repr, unknown))} matches no weight of a {shape.model_type} model; {hint}"
                f"its layers' weights are {', '.join(w.name for w in unique)}, besides "
                f"{', '.join(w.name for w in shape.outer)}"
            )
        picked = [w for w in unique if any(_matches(w, n) for n in requested)]
        outer = [w for w in shape.outer if w.name in requested]
        chosen = [w for w in picked if w.kind in kinds]
        unadaptable = tuple(w for w in picked if w.kind not in kinds)
        skipped = ()
    if ff_given is None:  # the method's own feedforward roles (IA3: down), as peft's per-model default
        ff_requested = [w.name for w in chosen if w.role in (spec.feedforward_roles or ())]
    ff = tuple(w.name for w in chosen + outer if any(_matches(w, n) for n in ff_requested))
    counted = tuple((c, w) for w in chosen for c, _ in layer[w.name]) + tuple((1, w) for w in outer)
    return Targets(
        modules=tuple(w.name for w in chosen + outer if w.kind not in PARAMETER_KINDS),
        parameters=tuple(_param_path(w) for w in chosen if w.kind in PARAMETER_KINDS),
        feedforward=ff,
        weights=counted,
        skipped=skipped,
        unadaptable=unadaptable,
    )


def problems(shape: ModelShape, spec, method_cfg, chosen: Targets) -> List[Tuple[str, str]]:
    """(config key, message) for each reason peft would fail on these targets, with the way out."""
    out = []
    name, kinds = method_cfg.name, tuple(spec.adapts)
    layer = [w for w in dict((w.name, w) for _, w in shape.all_weights()).values()]
    adaptable = [w.name for w in layer if w.kind in kinds]
    if chosen.unadaptable:
        what = " and ".join(sorted({KIND_NAMES[w.kind] for w in chosen.unadaptable}))
        fix = f"method.target_modules=[{','.join(adaptable)}]" if adaptable else "method=lora"
        out.append(
            (
                "method.target_modules",
                f"peft's {name} cannot adapt the {what} of {shape.model_type} "
                f"({', '.join(w.name for w in chosen.unadaptable)}); use {fix}",
            )
        )
    elif not chosen.weights:
        there = "/".join(sorted({w.kind for w in layer}))
        out.append(
            (
                "method",
                f"peft's {name} has no layer for the weights of a {shape.model_type} layer "
                f"({', '.join(w.name for w in layer)}: {there}); use method=lora",
            )
        )
    if spec.quantized and not any(w.quantizable for w in layer):
        out.append(
            (
                "method",
                f"bitsandbytes quantises only nn.Linear and Conv1D modules, and {shape.model_type}'s are "
                f"subclasses or stacked experts ({', '.join(w.name for w in layer)}): method={name} would "
                "train on an unquantised base; use method=lora",
            )
        )
    dropout = getattr(method_cfg, "dropout", 0.0) or 0.0
    if chosen.parameters and dropout:
        out.append(
            (
                "method.dropout",
                f"{dropout} cannot apply to the {shape.model_type} weights peft adapts as parameters "
                f"({', '.join(chosen.parameters)}: its ParamWrapper has no dropout); set method.dropout=0, "
                f"or leave them out with method.target_modules=[{','.join(chosen.modules)}]",
            )
        )
    return out


Formula = Callable[[int, int, bool], int]  # (fan_in, fan_out, feedforward) -> adapter params on one weight


def adapter_params(chosen: Targets, formula: Formula) -> int:
    """Trainable params over every layer: the method's formula per weight, per expert of a stack
    (peft's ParamWrapper: one rank-r pair per expert, A: r*E x in, B: out x r*E)."""
    return sum(
        count * w.experts * formula(w.fan_in, w.fan_out, w.name in chosen.feedforward) for count, w in chosen.weights
    )
