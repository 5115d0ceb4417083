"""Tiny configs of real transformers architectures, and the matrix tests/test_families.py trains them in.

What a user brings with `model=hf model.name_or_path=<dir>`, at the smallest size that still has each
family's own layout (2 layers, hidden 64, 4 heads, 2 KV heads where the family has GQA; MoE: 4 experts,
2 per token). tests/test_families.py saves each with a BPE tokenizer and trains it; the README's table
of families (launch/matrix.py) is rendered from `FAMILIES` and `MATRIX`. `config(family)` imports
transformers (inside the function).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, POSITIONS = 64, 2, 4, 2, 128, 256

_LLAMA_LIKE = dict(
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=POSITIONS,
)
_MOE = dict(num_experts_per_tok=2)

#: family -> (model_type, config arguments); everything not given is the config class's default
FAMILIES: Dict[str, Tuple[str, dict]] = {
    "llama": ("llama", dict(_LLAMA_LIKE)),
    "qwen2": ("qwen2", dict(_LLAMA_LIKE)),
    "qwen3": ("qwen3", dict(_LLAMA_LIKE, head_dim=16)),
    "mistral": ("mistral", dict(_LLAMA_LIKE)),
    "mixtral": ("mixtral", dict(_LLAMA_LIKE, intermediate_size=64, num_local_experts=4, **_MOE)),
    "phi3": ("phi3", dict(_LLAMA_LIKE)),
    "olmo2": ("olmo2", dict(_LLAMA_LIKE)),
    "granite": ("granite", dict(_LLAMA_LIKE)),
    "gemma": ("gemma", dict(_LLAMA_LIKE, head_dim=16)),
    "gemma2": ("gemma2", dict(_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=64)),
    "starcoder2": ("starcoder2", dict(_LLAMA_LIKE)),
    "gpt_neox": (
        "gpt_neox",
        dict(
            hidden_size=HIDDEN,
            intermediate_size=INTER,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=POSITIONS,
        ),
    ),
    "gpt2": ("gpt2", dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS)),
    "opt": (
        "opt",
        dict(
            hidden_size=HIDDEN,
            ffn_dim=INTER,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=POSITIONS,
        ),
    ),
    # Falcon-7B's layout: multi-query attention, attention and MLP in parallel, FalconLinear
    "falcon": (
        "falcon",
        dict(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=POSITIONS
        ),
    ),
    "bloom": ("bloom", dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(_LLAMA_LIKE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, **_MOE),
    ),
    "olmoe": ("olmoe", dict(_LLAMA_LIKE, intermediate_size=32, num_experts=4, **_MOE)),
}

#: the families whose blocks, projections or parameters differ most from Llama's, trained on the sharded
#: backends too: FSDP2 wraps GPT2Block / FalconDecoderLayer / Gemma2DecoderLayer / MixtralDecoderLayer,
#: ZeRO-3 partitions Conv1D weights, FalconLinear, Gemma-2's extra norms and stacked experts
SHARDED_FAMILIES = ("gpt2", "falcon", "gemma2", "mixtral")
METHODS = ("full", "lora")
BACKENDS = ("ddp", "fsdp", "zero3")

#: (family, method, backend) trained on 2 CPU ranks by tests/test_families.py: both methods on DDP for
#: every family, and on FSDP2 and ZeRO-3 (activation checkpointing on) for SHARDED_FAMILIES
MATRIX: List[Tuple[str, str, str]] = [(f, m, "ddp") for f in FAMILIES for m in METHODS] + [
    (f, m, b) for f in SHARDED_FAMILIES for b in BACKENDS[1:] for m in METHODS
]


def config(family: str, vocab_size: int = 512, bos: int = 0, eos: int = 1, pad: int = 2, **overrides):
    """The transformers config of `family` at tiny size (special token ids inside the vocabulary)."""
    from transformers import AutoConfig

    model_type, kwargs = FAMILIES[family]
    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        **{**kwargs, **overrides},
    )


def required_overrides(family: str, method: str) -> List[str]:
    """What validation asks of this family before it trains (launch/families.py), the fix applied:
    tests/test_families.py checks that each is refused without it."""
    from tuneforge.arch import support

    model_type = FAMILIES[family][0]
    out = [] if support.packing_isolated(model_type) else ["data.packing=false"]
    moe = any(k in FAMILIES[family][1] for k in ("num_local_experts", "num_experts"))
    if method in ("lora", "qlora") and moe:
        out.append("method.dropout=0")  # peft's ParamWrapper (stacked experts, routers) has no dropout
    return out
