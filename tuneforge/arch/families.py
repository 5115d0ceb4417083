"""The `ModelShape` of a causal LM from its config.json, for every family whose spelling is known here.

`shape_from_config(config)` takes the config.json dict (or `model.config.to_dict()`) and reads it the
way the family's modeling file does: `n_embd`/`n_layer`/`n_head` (GPT-2, GPT-J), `ffn_dim` (OPT),
`4 * hidden` defaults (GPT-2, Falcon, BLOOM), `head_dim`, fused QKV projections (Phi-3, GPT-NeoX,
Falcon, BLOOM, GPT-2's Conv1D `c_attn`), MoE fields (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE: stacked
experts, routers, shared experts, dense layers). The parameter count equals the numel of the model
transformers builds (tests/test_families.py checks every family against a meta-device build).

A family is one function below. An unfamiliar `model_type` raises UnknownArchitecture: the launcher
then counts on the meta device (arch/meta.py, which imports torch). Keys a config.json may omit (older
hub checkpoints) take the family's default from `DEFAULTS`, which tests/test_families.py compares with
transformers' config classes. Pure Python.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, List, Mapping, Tuple

from tuneforge.arch.shape import Block, ModelShape, UnknownArchitecture, Weight, llama_weights

# ------------------------------------------------------------------------------------------ defaults
#: Values the config classes of transformers 5 default to, for keys an older config.json may omit.
#: Only keys that change a size. Checked against AutoConfig.for_model(model_type) by the tests.
DEFAULTS: Dict[str, Dict[str, object]] = {
    "llama": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "head_dim": None},
    "mistral": {"tie_word_embeddings": False, "head_dim": None},
    "qwen2": {"tie_word_embeddings": False},
    "qwen3": {"tie_word_embeddings": False, "attention_bias": False, "head_dim": 128},
    "granite": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    "gemma": {"tie_word_embeddings": True, "attention_bias": False, "head_dim": 256},
    "gemma2": {"tie_word_embeddings": True, "attention_bias": False, "head_dim": 256},
    "olmo2": {"tie_word_embeddings": False, "attention_bias": False},
    "phi3": {"tie_word_embeddings": False},
    "starcoder2": {"tie_word_embeddings": True, "use_bias": True},
    "mixtral": {"tie_word_embeddings": False, "head_dim": None},
    "qwen2_moe": {
        "tie_word_embeddings": False,
        "qkv_bias": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "shared_expert_intermediate_size": 5632,
    },
    "qwen3_moe": {
        "tie_word_embeddings": False,
        "attention_bias": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "head_dim": None,
    },
    "olmoe": {"tie_word_embeddings": False, "attention_bias": False},
    "gpt_neox": {"tie_word_embeddings": False, "attention_bias": True},
    "gpt2": {"tie_word_embeddings": True, "n_inner": None},
    "gpt_bigcode": {"tie_word_embeddings": True, "n_inner": None, "multi_query": True},
    "gptj": {"tie_word_embeddings": False, "n_inner": None},
    "opt": {
        "tie_word_embeddings": True,
        "enable_bias": True,
        "do_layer_norm_before": True,
        "_remove_final_layer_norm": False,
        "layer_norm_elementwise_affine": True,
        "word_embed_proj_dim": None,
    },
    "falcon": {
        "tie_word_embeddings": True,
        "bias": False,
        "multi_query": True,
        "new_decoder_architecture": False,
        "parallel_attn": True,
        "num_ln_in_parallel_attn": None,
        "ffn_hidden_size": None,
        "num_kv_heads": None,
        "alibi": False,
    },
    "bloom": {"tie_word_embeddings": True},
    "phi": {"tie_word_embeddings": False, "qk_layernorm": False, "num_key_value_heads": None},
    "stablelm": {
        "tie_word_embeddings": False,
        "use_qkv_bias": False,
        "qk_layernorm": False,
        "use_parallel_residual": False,
    },
}


class _Config:
    """A config.json dict read the way transformers' config class would: aliases, then family defaults.
    `lenient`: a missing size reads 1 (for the module names, which do not depend on sizes)."""

    def __init__(self, cfg: Mapping, aliases: Dict[str, Tuple[str, ...]], lenient: bool):
        self.cfg, self.aliases, self.lenient = cfg, aliases, lenient
        self.defaults = DEFAULTS.get(cfg.get("model_type"), {})

    def __call__(self, key: str, default=KeyError):
        for k in (key,) + self.aliases.get(key, ()):
            if self.cfg.get(k) is not None or (k in self.cfg and default is not KeyError):
                return self.cfg[k]
        if key in self.defaults:
            return self.defaults[key]
        if default is not KeyError:
            return default
        if self.lenient:
            return 1
        raise UnknownArchitecture(f"config.json has no {key}")


def _common(c: _Config) -> dict:
    heads, hidden = c("num_attention_heads"), c("hidden_size")
    return dict(
        vocab=c("vocab_size"),
        hidden=hidden,
        layers=c("num_hidden_layers"),
        heads=heads,
        kv_heads=c("num_key_value_heads", None) or heads,
        head_dim=c("head_dim", None) or hidden // heads,
        tie_embeddings=bool(c("tie_word_embeddings", False)),
    )


def _attention(h, heads, kv, d, qkv_bias, o_bias, prefix="self_attn", o_name="o_proj") -> List[Weight]:
    return [
        Weight(f"{prefix}.q_proj", h, heads * d, qkv_bias, role="q"),
        Weight(f"{prefix}.k_proj", h, kv * d, qkv_bias, role="k"),
        Weight(f"{prefix}.v_proj", h, kv * d, qkv_bias, role="v"),
        Weight(f"{prefix}.{o_name}", heads * d, h, o_bias, role="o"),
    ]


def _swiglu(h: int, i: int, bias: bool = False, prefix="mlp") -> List[Weight]:
    return [
        Weight(f"{prefix}.gate_proj", h, i, bias, role="gate"),
        Weight(f"{prefix}.up_proj", h, i, bias, role="up"),
        Weight(f"{prefix}.down_proj", i, h, bias, role="down"),
    ]


def _experts(h: int, i: int, e: int, prefix="mlp") -> List[Weight]:
    """transformers 5's fused experts: gate_up_proj (E, 2I, H), down_proj (E, H, I), a router weight (E, H)."""
    return [
        Weight(f"{prefix}.gate", h, e, kind="router", role="router"),
        Weight(f"{prefix}.experts.gate_up_proj", h, 2 * i, kind="experts", experts=e, role="gate_up"),
        Weight(f"{prefix}.experts.down_proj", i, h, kind="experts", experts=e, role="down"),
    ]


def _outer(s: dict, head="lm_head", embedding="embed_tokens") -> Tuple[Weight, ...]:
    return (Weight(head, s["hidden"], s["vocab"], role="head"), Weight(embedding, s["vocab"], s["hidden"]))


def _decoder(
    model_type: str,
    s: dict,
    weights: List[Weight],
    other: int,
    head_bias: int = 0,
    embedding=None,
    final=None,
    names=("lm_head", "embed_tokens"),
    **extra,
) -> ModelShape:
    """One block of identical layers, a token embedding, an RMSNorm-style final norm (hidden), the head."""
    v, h = s["vocab"], s["hidden"]
    return ModelShape(
        model_type=model_type,
        blocks=(Block(s["layers"], tuple(weights), other),),
        embedding=v * h if embedding is None else embedding,
        head=0 if s["tie_embeddings"] else v * h + head_bias,
        final=h if final is None else final,
        outer=_outer(s, *names),
        **s,
        **extra,
    )


# ------------------------------------------------------------------------------------------ families
def _llama(cfg: Mapping, lenient: bool) -> ModelShape:
    """Llama, Mistral, Granite, Gemma, Qwen2, Qwen3, OLMo-2, Gemma-2 (two or four norms, q/k norms, biases)."""
    t = cfg["model_type"]
    c = _Config(cfg, {}, lenient)
    s = _common(c)
    h, d, heads, kv, i = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], c("intermediate_size")
    qkv_bias = {"qwen2": True, "mistral": False}.get(t, c("attention_bias", False))
    o_bias = False if t in ("qwen2", "mistral") else c("attention_bias", False)
    norms = 2 * h
    if t == "qwen3":
        norms += 2 * d  # q_norm, k_norm over the head dim
    elif t == "olmo2":
        norms += (heads + kv) * d  # q_norm, k_norm over all heads
    elif t == "gemma2":
        norms += 2 * h  # pre/post feedforward norms
    weights = llama_weights(h, heads, kv, d, i, bool(qkv_bias), bool(o_bias), bool(c("mlp_bias", False)))
    return _decoder(t, s, list(weights), norms, intermediate=i, qkv_bias=bool(qkv_bias))


def _phi3(cfg: Mapping, lenient: bool) -> ModelShape:
    c = _Config(cfg, {}, lenient)
    s = _common(c)
    h, d, heads, kv, i = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], c("intermediate_size")
    weights = [
        Weight("self_attn.qkv_proj", h, (heads + 2 * kv) * d, role="qkv"),
        Weight("self_attn.o_proj", heads * d, h, role="o"),
        Weight("mlp.gate_up_proj", h, 2 * i, role="gate_up"),
        Weight("mlp.down_proj", i, h, role="down"),
    ]
    return _decoder("phi3", s, weights, 2 * h, intermediate=i)


def _starcoder2(cfg: Mapping, lenient: bool) -> ModelShape:
    c = _Config(cfg, {}, lenient)
    s = _common(c)
    h, d, heads, kv, i = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], c("intermediate_size")
    b = bool(c("use_bias"))
    weights = _attention(h, heads, kv, d, b, b) + [
        Weight("mlp.c_fc", h, i, b, role="up"),
        Weight("mlp.c_proj", i, h, b, role="down"),
    ]
    return _decoder("starcoder2", s, weights, 4 * h, final=2 * h, intermediate=i, qkv_bias=b)  # LayerNorms


def _mixtral(cfg: Mapping, lenient: bool) -> ModelShape:
    c = _Config(cfg, {"num_local_experts": ("num_experts",)}, lenient)
    s = _common(c)
    h, d, heads, kv, i = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], c("intermediate_size")
    e, k = c("num_local_experts"), c("num_experts_per_tok")
    weights = _attention(h, heads, kv, d, False, False) + _experts(h, i, e)
    return _decoder("mixtral", s, weights, 2 * h, intermediate=i, experts=e, experts_per_token=k)


def _olmoe(cfg: Mapping, lenient: bool) -> ModelShape:
    c = _Config(cfg, {"num_experts": ("num_local_experts",)}, lenient)
    s = _common(c)
    h, d, heads, kv, i = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], c("intermediate_size")
    e, k = c("num_experts"), c("num_experts_per_tok")
    b = bool(c("attention_bias"))
    weights = _attention(h, heads, kv, d, b, b) + _experts(h, i, e)
    norms = 2 * h + h + (h // heads) * kv  # q_norm over hidden, k_norm over the KV width
    return _decoder("olmoe", s, weights, norms, intermediate=i, experts=e, experts_per_token=k, qkv_bias=b)


def _qwen_moe(cfg: Mapping, lenient: bool) -> ModelShape:
    """Qwen2-MoE (shared expert + its sigmoid gate, qkv bias) and Qwen3-MoE (q/k norms); dense layers
    where `mlp_only_layers` or `decoder_sparse_step` say so."""
    t = cfg["model_type"]
    c = _Config(cfg, {"num_experts": ("num_local_experts",)}, lenient)
    s = _common(c)
    h, d, heads, kv, layers = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], s["layers"]
    e, k = c("num_experts"), c("num_experts_per_tok")
    i_moe, i_dense = c("moe_intermediate_size"), c("intermediate_size")
    if t == "qwen2_moe":
        qkv_bias, o_bias, norms = bool(c("qkv_bias")), False, 2 * h
    else:
        qkv_bias = o_bias = bool(c("attention_bias"))
        norms = 2 * h + 2 * d
    attention = _attention(h, heads, kv, d, qkv_bias, o_bias)
    moe = attention + _experts(h, i_moe, e)
    if t == "qwen2_moe":
        shared = c("shared_expert_intermediate_size")
        moe += _swiglu(h, shared, prefix="mlp.shared_expert") + [
            Weight("mlp.shared_expert_gate", h, 1, role="shared_gate")
        ]
    only, step = set(c("mlp_only_layers") or []), c("decoder_sparse_step") or 1
    sparse = sum(1 for n in range(layers) if n not in only and e > 0 and (n + 1) % step == 0)
    blocks = [Block(sparse, tuple(moe), norms)]
    if sparse < layers:
        blocks.append(Block(layers - sparse, tuple(attention + _swiglu(h, i_dense)), norms))
    v = s["vocab"]
    return ModelShape(
        model_type=t,
        intermediate=i_moe,
        blocks=tuple(blocks),
        embedding=v * h,
        head=0 if s["tie_embeddings"] else v * h,
        final=h,
        experts=e,
        experts_per_token=k,
        qkv_bias=qkv_bias,
        outer=_outer(s),
        **s,
    )


def _gpt_neox(cfg: Mapping, lenient: bool) -> ModelShape:
    c = _Config(cfg, {}, lenient)
    s = _common(c)
    h, i, b = s["hidden"], c("intermediate_size"), bool(c("attention_bias"))
    s["kv_heads"] = s["heads"]
    weights = [
        Weight("attention.query_key_value", h, 3 * h, b, role="qkv"),
        Weight("attention.dense", h, h, b, role="o"),
        Weight("mlp.dense_h_to_4h", h, i, True, role="up"),
        Weight("mlp.dense_4h_to_h", i, h, True, role="down"),
    ]
    return _decoder(
        "gpt_neox", s, weights, 4 * h, final=2 * h, intermediate=i, qkv_bias=b, names=("lm_head", "embed_in")
    )


def _gpt2(cfg: Mapping, lenient: bool) -> ModelShape:
    """GPT-2 (Conv1D) and GPT-BigCode (multi-query: one K/V head; nn.Linear)."""
    t = cfg["model_type"]
    aliases = {
        "hidden_size": ("n_embd",),
        "num_hidden_layers": ("n_layer",),
        "num_attention_heads": ("n_head",),
        "max_position_embeddings": ("n_positions",),
    }
    c = _Config(cfg, aliases, lenient)
    s = _common(c)
    h, heads = s["hidden"], s["heads"]
    i = c("n_inner", None) or 4 * h
    d = h // heads
    kind = "conv1d" if t == "gpt2" else "linear"
    kv = 1 if t == "gpt_bigcode" and c("multi_query") else heads
    s.update(kv_heads=kv, head_dim=d)
    weights = [
        Weight("attn.c_attn", h, h + 2 * kv * d, True, kind, role="qkv"),
        Weight("attn.c_proj", h, h, True, kind, role="o"),
        Weight("mlp.c_fc", h, i, True, kind, role="up"),
        Weight("mlp.c_proj", i, h, True, kind, role="down"),
    ]
    positions = c("max_position_embeddings")
    return _decoder(
        t,
        s,
        weights,
        4 * h,
        embedding=(s["vocab"] + positions) * h,
        final=2 * h,
        intermediate=i,
        qkv_bias=True,
        position_limit=positions,
        names=("lm_head", "wte"),
    )


def _gptj(cfg: Mapping, lenient: bool) -> ModelShape:
    aliases = {"hidden_size": ("n_embd",), "num_hidden_layers": ("n_layer",), "num_attention_heads": ("n_head",)}
    c = _Config(cfg, aliases, lenient)
    s = _common(c)
    h = s["hidden"]
    i = c("n_inner", None) or 4 * h
    s["kv_heads"] = s["heads"]
    weights = _attention(h, s["heads"], s["heads"], h // s["heads"], False, False, prefix="attn", o_name="out_proj")
    weights += [Weight("mlp.fc_in", h, i, True, role="up"), Weight("mlp.fc_out", i, h, True, role="down")]
    return _decoder(
        "gptj", s, weights, 2 * h, final=2 * h, head_bias=s["vocab"], intermediate=i, names=("lm_head", "wte")
    )


def _phi(cfg: Mapping, lenient: bool) -> ModelShape:
    c = _Config(cfg, {}, lenient)
    s = _common(c)
    h, d, heads, kv, i = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], c("intermediate_size")
    weights = _attention(h, heads, kv, d, True, True, o_name="dense")
    weights += [Weight("mlp.fc1", h, i, True, role="up"), Weight("mlp.fc2", i, h, True, role="down")]
    norms = 2 * h + (4 * d if c("qk_layernorm") else 0)
    return _decoder("phi", s, weights, norms, final=2 * h, head_bias=s["vocab"], intermediate=i, qkv_bias=True)


def _stablelm(cfg: Mapping, lenient: bool) -> ModelShape:
    c = _Config(cfg, {}, lenient)
    s = _common(c)
    h, d, heads, kv, i = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"], c("intermediate_size")
    b = bool(c("use_qkv_bias"))
    weights = _attention(h, heads, kv, d, b, False) + _swiglu(h, i)
    norms = (2 if c("use_parallel_residual") else 4) * h
    norms += (heads + kv) * d if c("qk_layernorm") else 0  # per-head norms, no bias
    return _decoder("stablelm", s, weights, norms, final=2 * h, intermediate=i, qkv_bias=b)


def _opt(cfg: Mapping, lenient: bool) -> ModelShape:
    c = _Config(cfg, {}, lenient)
    s = _common(c)
    h, i, b, v = s["hidden"], c("ffn_dim"), bool(c("enable_bias")), s["vocab"]
    s["kv_heads"] = s["heads"]
    proj = c("word_embed_proj_dim", None) or h
    norm = 2 * h if c("layer_norm_elementwise_affine") else 0
    weights = [
        Weight("self_attn.k_proj", h, h, b, role="k"),
        Weight("self_attn.v_proj", h, h, b, role="v"),
        Weight("self_attn.q_proj", h, h, b, role="q"),
        Weight("self_attn.out_proj", h, h, b, role="o"),
        Weight("fc1", h, i, b, role="up"),
        Weight("fc2", i, h, b, role="down"),
    ]
    final = norm if c("do_layer_norm_before") and not c("_remove_final_layer_norm") else 0
    positions = c("max_position_embeddings")
    embedding = v * proj + (positions + 2) * h + (2 * proj * h if proj != h else 0)
    shape = _decoder(
        "opt",
        s,
        weights,
        2 * norm,
        embedding=embedding,
        final=final,
        intermediate=i,
        qkv_bias=b,
        position_limit=positions,
    )
    if not s["tie_embeddings"] and proj != h:
        shape = replace(shape, head=v * proj)
    return shape


def _falcon(cfg: Mapping, lenient: bool) -> ModelShape:
    c = _Config(cfg, {"num_hidden_layers": ("n_layer",), "num_attention_heads": ("n_head",)}, lenient)
    s = _common(c)
    h, heads, b = s["hidden"], s["heads"], bool(c("bias"))
    d = h // heads
    new = bool(c("new_decoder_architecture"))
    kv = (c("num_kv_heads", None) or heads) if (new or not c("multi_query")) else 1
    qkv = (2 * kv + heads) * d if new else (h + 2 * d if c("multi_query") else 3 * h)
    i = c("ffn_hidden_size", None) or 4 * h
    s.update(kv_heads=kv, head_dim=d)
    n_ln = c("num_ln_in_parallel_attn", None)
    if n_ln is None and new:
        n_ln = 2
    norms = 2 * (2 if not c("parallel_attn") or n_ln == 2 else 1) * h
    weights = [  # FalconLinear: an nn.Linear subclass, which bitsandbytes leaves alone
        Weight("self_attention.query_key_value", h, qkv, b, role="qkv", plain=False),
        Weight("self_attention.dense", h, h, b, role="o", plain=False),
        Weight("mlp.dense_h_to_4h", h, i, b, role="up", plain=False),
        Weight("mlp.dense_4h_to_h", i, h, b, role="down", plain=False),
    ]
    return _decoder(
        "falcon", s, weights, norms, final=2 * h, intermediate=i, qkv_bias=b, names=("lm_head", "word_embeddings")
    )


def _bloom(cfg: Mapping, lenient: bool) -> ModelShape:
    c = _Config(cfg, {"num_hidden_layers": ("n_layer",), "num_attention_heads": ("n_head",)}, lenient)
    s = _common(c)
    h = s["hidden"]
    s["kv_heads"] = s["heads"]
    weights = [
        Weight("self_attention.query_key_value", h, 3 * h, True, role="qkv"),
        Weight("self_attention.dense", h, h, True, role="o"),
        Weight("mlp.dense_h_to_4h", h, 4 * h, True, role="up"),
        Weight("mlp.dense_4h_to_h", 4 * h, h, True, role="down"),
    ]
    embedding = s["vocab"] * h + 2 * h  # + word_embeddings_layernorm
    return _decoder(
        "bloom",
        s,
        weights,
        4 * h,
        embedding=embedding,
        final=2 * h,
        intermediate=4 * h,
        qkv_bias=True,
        names=("lm_head", "word_embeddings"),
    )


FAMILIES: Dict[str, Callable[[Mapping, bool], ModelShape]] = {
    **{t: _llama for t in ("llama", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2", "olmo2")},
    "phi3": _phi3,
    "starcoder2": _starcoder2,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "qwen2_moe": _qwen_moe,
    "qwen3_moe": _qwen_moe,
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
    "gpt_bigcode": _gpt2,
    "gptj": _gptj,
    "phi": _phi,
    "stablelm": _stablelm,
    "opt": _opt,
    "falcon": _falcon,
    "bloom": _bloom,
}


def language_config(config: Mapping) -> Mapping:
    """The language model's part of a config: multimodal wrappers keep it in `text_config`."""
    return config.get("text_config") or config


def shape_from_config(config: Mapping) -> ModelShape:
    """The shape of a Hugging Face config (config.json as a dict, or `model.config.to_dict()`).

    Raises UnknownArchitecture for a family not known here, or a size its config lacks."""
    config = language_config(config)
    reader = FAMILIES.get(config.get("model_type"))
    if reader is None:
        raise UnknownArchitecture(f"model_type {config.get('model_type')!r} is not a family known to tuneforge.arch")
    try:
        return reader(config, False)
    except (TypeError, ZeroDivisionError) as e:
        raise UnknownArchitecture(f"config.json sizes unreadable: {e}") from None


def layout_of(config: Mapping) -> ModelShape:
    """The layout (module names, kinds) of a known family even when config.json lacks sizes: a shape
    whose missing sizes read 1. Raises UnknownArchitecture for an unfamiliar family."""
    config = language_config(config)
    reader = FAMILIES.get(config.get("model_type"))
    if reader is None:
        raise UnknownArchitecture(f"model_type {config.get('model_type')!r} is not a family known to tuneforge.arch")
    return reader(config, True)
