"""The model on the meta device: its structure, names, shapes and ties, no memory.

`from_pretrained` in transformers 5 builds the same way (meta device, then weights, then
`initialize_weights()` for what the checkpoint lacks: the non-persistent buffers such as the rotary
`inv_freq`). `init_buffers` does that last step the same way, so those buffers are bit-identical to a
plain `from_pretrained`'s.
"""

from __future__ import annotations

import copy
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from tuneforge.compat.torch import non_persistent_buffers
from tuneforge.compat.transformers import mark_initialized


def build_meta_model(
    config, dtype: torch.dtype, attn_implementation: Optional[str] = None, trust_remote_code: bool = False
) -> nn.Module:
    """`AutoModelForCausalLM.from_config` on the meta device (tied weights tied, nothing initialised)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        # from_config mutates the config it is given (attn_implementation, dtype)
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(config), dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    return model


def own_parameters(module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(attribute, parameter) of the parameters `module` holds itself (not its children's)."""
    return list(module.named_parameters(recurse=False, remove_duplicate=False))


def unique_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str, nn.Parameter]]:
    """(qualified name, owning module, attribute, parameter), each parameter once (a tied one under the
    first name that holds it, as `named_parameters` orders them)."""
    seen = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in own_parameters(module):
            if id(param) in seen:
                continue
            seen.add(id(param))
            yield (f"{module_name}.{attr}" if module_name else attr), module, attr, param


def replace_parameters(model: nn.Module, make) -> Dict[int, nn.Parameter]:
    """Swap every parameter p for make(p) in every module that holds it (ties stay ties). Returns
    {id(old): new}."""
    done: Dict[int, nn.Parameter] = {}
    for module in model.modules():
        for attr, param in own_parameters(module):
            if id(param) not in done:
                done[id(param)] = make(param)
            setattr(module, attr, done[id(param)])
    return done


def materialize(model: nn.Module, device="cpu") -> nn.Module:
    """Uninitialised storage on `device` for every parameter and buffer of a meta model, ties kept
    (`nn.Module.to_empty` gives each module holding a tied parameter its own new one: it unties them)."""
    replace_parameters(model, lambda p: nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad))
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            setattr(module, name, torch.empty_like(buf, device=device))
    return model


def move_buffers(model: nn.Module, device) -> None:
    """Every buffer of `model` to `device` (the parameters stay where they are)."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            setattr(module, name, buf.to(device))


def meta_like(param: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=param.requires_grad)


def init_buffers(model: nn.Module) -> None:
    """Initialise the non-persistent buffers as `from_pretrained` does: every parameter is marked
    initialised (they come from the checkpoint or from `init`), then the model's own
    `initialize_weights()` runs, which then only writes what is left: the buffers."""
    from transformers import PreTrainedModel

    for param in model.parameters():
        mark_initialized(param)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.initialize_weights()  # the outermost transformers model recurses into its submodels
            return
    raise TypeError(f"{type(model).__name__}: no transformers model inside to initialise its buffers")


def non_persistent_buffer_names(model: nn.Module) -> List[str]:
    names = []
    for module_name, module in model.named_modules():
        skip = non_persistent_buffers(module)
        for b, _ in module.named_buffers(recurse=False):
            if b in skip:
                names.append(f"{module_name}.{b}" if module_name else b)
    return names


def module_names(model: nn.Module) -> Dict[nn.Module, str]:
    """{module: qualified name}: after a PEFT wrap the base modules are the same objects under new names."""
    return {module: name for name, module in model.named_modules()}
