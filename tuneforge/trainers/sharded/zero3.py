"""ZeRO-3 partitioned at construction: `deepspeed.zero.Init`, then each rank reads its own partitions.

transformers' own route (`HfDeepSpeedConfig` alive before `from_pretrained`) also constructs under
zero.Init, but then rank 0 reads every checkpoint file whole into memory (`load_state_dict(...,
map_location="cpu")`, all files merged) and scatters module by module (GatheredParameters,
modifier_rank=0): rank 0 peaks at the whole model, and it alone reads the checkpoint. Here every rank
constructs under zero.Init too (weight init switched off, as transformers does, and RoPE buffers kept
in their own dtype), then fills its flat partition of each parameter (`param.ds_tensor`) with exactly
those elements of the safetensors, one positioned read each: no rank holds more than its partitions,
and together the ranks read the checkpoint once.

An `HfDeepSpeedConfig` is kept alive on the model (`model._tuneforge_hf_ds_config`): peft's DoRA init and
transformers' own code look it up to gather partitioned weights when they need them.

PEFT: the base is built and filled first, then `wrap` applies the method as on any model (adapters are
ordinary tensors, made with the same random draws as on an unsharded base, DoRA computed by peft from
the gathered base); `deepspeed.initialize` partitions them with the rest (rank 0's values).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from tuneforge.compat import deepspeed as deepspeed_compat
from tuneforge.compat import transformers as transformers_compat
from tuneforge.trainers.sharded import fill, meta
from tuneforge.trainers.sharded.fsdp import LoadStats, finish_source, open_source
from tuneforge.trainers.sharded.init import InitSource, init_blocks


def build_zero3_model(
    config,
    *,
    ds_config: dict,
    block_classes: Optional[Sequence[str]] = None,
    weights=None,
    seed: int = 0,
    wrap: Optional[Callable[[nn.Module], object]] = None,
    attn_implementation: Optional[str] = None,
    trust_remote_code: bool = False,
):
    """Returns (model, extra, LoadStats): the model's parameters are ZeRO-3 partitions (in the dtype the
    DeepSpeed config trains in: bf16/fp16 if enabled, else fp32), ready for `deepspeed.initialize` with the
    same config. `weights`: a model directory with safetensors (or a source over one, see fill.py), or None
    for init.py's random init."""
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    started = time.perf_counter()
    # names and shapes (and InitSource's copy) from a meta model built before ZeRO-3 is announced
    skeleton = meta.build_meta_model(config, torch.float32, attn_implementation, trust_remote_code)
    deepspeed.init_distributed(dist_init_required=False)  # joins the existing process group
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # transformers and peft see ZeRO-3 from here on
    source = open_source(weights) if weights is not None else None
    if source is None:
        source = InitSource(skeleton, seed, block_classes or init_blocks(skeleton))
    model_cls = type(skeleton)
    del skeleton
    zero_init = contextlib.ExitStack()
    zero_init.enter_context(deepspeed_compat.construction_without_broadcast())
    zero_init.enter_context(deepspeed.zero.Init(config_dict_or_path=ds_config))
    with transformers_compat.zero3_model_construction(zero_init):
        model = model_cls(_configured(config, attn_implementation))
    model.tie_weights()  # no_init_weights also skipped the tying post_init does
    names = meta.module_names(model)
    filled = fill.fill_parameters(model, fill.base_resolver(names, source, model), fill.zero3_partition)
    missing = [n for n, p in model.named_parameters() if n not in filled]
    if missing:
        raise RuntimeError(f"{len(missing)} parameter(s) not in the checkpoint, first {missing[0]}")
    meta.init_buffers(model)
    extra = None
    if wrap is not None:
        with _full_shapes(model):
            result = wrap(model)
        model, extra = result if isinstance(result, tuple) else (result, None)
    model._tuneforge_hf_ds_config = hf_ds_config
    stats = LoadStats(seconds=time.perf_counter() - started, elements_filled=sum(filled.values()))
    finish_source(source, stats)
    return model, extra, stats


@contextlib.contextmanager
def _full_shapes(model: nn.Module):
    """A ZeRO-3 parameter's `.data` is an empty placeholder, and some PEFT methods size their adapters
    from `base_layer.weight.shape` (LoHa). While the method is applied, each partitioned parameter shows
    a skeleton of its full shape instead (`torch.zeros(()).expand(shape)`: one element of storage). What
    needs the values (DoRA's magnitudes) gathers them, as peft does under ZeRO-3, which puts the
    placeholder back itself; the others get their placeholder back here."""
    swapped = []
    for param in {id(p): p for p in model.parameters()}.values():
        if deepspeed_compat.is_partitioned(param) and param.data.numel() == 0:
            placeholder = param.data
            shape = deepspeed_compat.full_shape(param)
            param.data = torch.zeros((), dtype=param.dtype, device=placeholder.device).expand(shape)
            swapped.append((param, placeholder))
    try:
        yield
    finally:
        for param, placeholder in swapped:
            if param.data.numel() != 0 and all(s == 0 for s in param.data.stride()):
                param.data = placeholder


def _configured(config, attn_implementation):
    """The config as from_config would hand it to the model class (attention implementation resolved)."""
    import copy

    config = copy.deepcopy(config)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    return config


def full_parameter_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of a model whose weights may be ZeRO-3 partitions (numel() of a partitioned one is 0)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(deepspeed_compat.full_numel(p) for p in params if p.requires_grad or not trainable_only)
