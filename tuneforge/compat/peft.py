"""peft internals (no public API does these)."""

from __future__ import annotations

import functools
import types


@functools.lru_cache(maxsize=None)
def trace_plain_dora_weights() -> None:
    """Let torch.compile trace a DoRA layer's forward in one graph (once per process).

    peft's DoRA reads the frozen weight through `peft.utils.integrations.dequantize_module_weight`,
    whose test for a torchao tensor (`type(weight).__module__.startswith(...)`) Dynamo cannot trace: the
    graph broke inside every adapted linear, and, the break falling in peft's loop over the active
    adapters, Dynamo ran the whole layer eagerly (the magnitude scaling and the weight norm unfused;
    benchmarks/adapters.py). While tracing, a plain parameter is returned as the function itself
    returns it; any other weight (4-bit, HQQ, torchao) goes through a copy of the function, traced
    as before. Eager calls are untouched."""
    import torch
    from peft.utils import integrations

    original = integrations.dequantize_module_weight
    as_before = types.FunctionType(original.__code__, original.__globals__, original.__name__, original.__defaults__)

    @torch.compiler.substitute_in_graph(original, skip_signature_check=True)
    def dequantize_module_weight(module):
        weight = module.weight
        if type(weight) is torch.nn.Parameter and not hasattr(module, "W_q"):
            return weight
        return as_before(module)
