"""transformers internals: which module classes are a model's transformer blocks; building a model without
initialising it, marking weights initialised, and constructing under ZeRO-3 (trainers/sharded/)."""

from __future__ import annotations

import contextlib
from typing import List, Tuple


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


# ------------------------------------------------- building without initialising (trainers/sharded/)
def no_init_weights():
    """Context: models constructed inside skip their weight init (transformers.initialization, 5.x)."""
    from transformers.initialization import no_init_weights as context

    return context()


def guard_torch_init_functions():
    """Context: torch.nn.init functions skip tensors already marked initialised, as in from_pretrained."""
    from transformers.initialization import guard_torch_init_functions as context

    return context()


def mark_initialized(param) -> None:
    """Mark a parameter as holding its final values: `initialize_weights()` then leaves it alone (the flag
    from_pretrained sets on every weight it loaded)."""
    param._is_hf_initialized = True


def init_module_weights(owner, module) -> None:
    """The model's own initialisation of one module (`PreTrainedModel._init_weights`: its distributions,
    the padding row zeroed, ones for norms), what `initialize_weights` applies to every module."""
    owner._init_weights(module)


@contextlib.contextmanager
def zero3_model_construction(zero_init):
    """Construct a model partitioned by ZeRO-3 the way transformers' from_pretrained does under an
    HfDeepSpeedConfig: weight init off, RoPE's arange kept in its dtype (`prevent_arange_dtype_change`), then
    `zero_init` (the caller's `deepspeed.zero.Init` context), and inside it transformers told that it is
    building under zero.Init (`set_zero3_state`)."""
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    with no_init_weights(), prevent_arange_dtype_change(), zero_init, set_zero3_state():
        yield


def renames_checkpoint_on_load(model_type: str) -> bool:
    """Whether transformers converts this family's checkpoint names or layout while loading (5.x:
    Mixtral's block_sparse_moe, the per-expert weights Qwen2-MoE and OLMoE stack): the sharded loader
    (trainers/sharded/) reads a checkpoint's own names, so these families load whole, then shard."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4.x: no conversions at load
        return False
    return bool(get_checkpoint_conversion_mapping(model_type))


def encode_with_offsets(tokenizer, texts: List[str], add_special_tokens: bool) -> List[Tuple[List[int], list]]:
    """[(token ids, character offsets)] of each text, as `tokenizer(texts, return_offsets_mapping=True)`
    gives them. A fast tokenizer's Rust encodings are read directly: transformers' conversion of each
    encoding into a dict of lists took as long as the tokenising itself (benchmarks/data_prep.py)."""
    backend = _backend_as_called(tokenizer)
    if backend is None:
        encoded = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(zip(encoded["input_ids"], encoded["offset_mapping"]))
    return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]


def encode_ids(tokenizer, texts: List[str], add_special_tokens: bool) -> List[List[int]]:
    """The token ids of each text, as `tokenizer(texts)["input_ids"]`. A fast tokenizer skips the
    offsets altogether (`encode_batch_fast`): tracking them was a third of its Rust time."""
    backend = _backend_as_called(tokenizer)
    if backend is None:
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # tokenizers < 0.20: with offsets
    return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]


def _backend_as_called(tokenizer):
    """A fast tokenizer's Rust tokenizer with truncation, padding and the splitting of special tokens
    set as its __call__ sets them (a tokenizer.json may ship a truncation); None for a slow one."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(tokenizer, "set_truncation_and_padding"):
        return None
    from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

    tokenizer.set_truncation_and_padding(
        padding_strategy=PaddingStrategy.DO_NOT_PAD,
        truncation_strategy=TruncationStrategy.DO_NOT_TRUNCATE,
        max_length=None,
        stride=0,
        pad_to_multiple_of=None,
        padding_side=None,
    )
    if backend.encode_special_tokens != tokenizer.split_special_tokens:
        backend.encode_special_tokens = tokenizer.split_special_tokens
    return backend
