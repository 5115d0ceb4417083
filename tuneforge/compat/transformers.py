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


def kv_cache_key() -> str:
    """The name of the KV cache in a causal LM's forward and output: `cache` in transformers 5.2x, where
    `past_key_values` is deprecated (removed in 5.40), `past_key_values` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
