"""transformers internals: which module classes are a model's transformer blocks."""

from __future__ import annotations

from typing import List


def block_class_names(model) -> List[str]:
    """The transformer block classes as transformers declares them (`_no_split_modules`, e.g.
    LlamaDecoderLayer), first declaration found; PEFT wrappers are walked through. The unit FSDP2
    shards, torch.compile compiles and activation checkpointing recomputes."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return list(names)
    return []
