"""The fallback for a family arch/families.py does not know: the shape counted on the model itself.

`shape_on_meta(config)` builds the causal LM of a config.json on the meta device (no weights read or
allocated: well under a second at any size, plus importing torch and transformers) and reads its sizes
and one layout per kind of decoder layer; `shape_of(model)` does the same on a live model (the trainer),
reading its config first where the family is known. Imports torch and transformers, inside the
functions: the launcher imports this module only for an unfamiliar config, and its dry run says so.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Mapping, Tuple

from tuneforge.arch.families import language_config, shape_from_config
from tuneforge.arch.shape import Block, ModelShape, UnknownArchitecture, Weight

#: leaf name -> role, for layouts read from a model rather than written in arch/families.py
ROLES = {
    "q": ("q_proj", "query", "wq"),
    "k": ("k_proj", "key", "wk"),
    "v": ("v_proj", "value", "wv"),
    "qkv": ("qkv_proj", "query_key_value", "c_attn", "wqkv", "qkv", "w_pack"),
    "o": ("o_proj", "out_proj", "wo", "dense"),
    "gate": ("gate_proj", "w1"),
    "up": ("up_proj", "w3", "c_fc", "fc1", "fc_in", "dense_h_to_4h"),
    "down": ("down_proj", "w2", "fc2", "fc_out", "dense_4h_to_h"),
    "gate_up": ("gate_up_proj",),
}


def role_of(name: str) -> str:
    """The role of a weight from its path (GPT-2's attn.c_proj is o, mlp.c_proj down)."""
    leaf = name.rsplit(".", 1)[-1].lower()
    if leaf == "c_proj":
        return "o" if "attn" in name else "down"
    return next((role for role, leaves in ROLES.items() if leaf in leaves), "")


def build_on_meta(config: Mapping, trust_remote_code: bool = False):
    """The causal LM of a config.json dict, every tensor on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    for key in ("transformers_version", "architectures", "_name_or_path"):
        cfg.pop(key, None)
    hf_config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), trust_remote_code=trust_remote_code)


def shape_on_meta(config: Mapping, trust_remote_code: bool = False) -> ModelShape:
    """The shape of an unfamiliar config, counted on its model built on the meta device."""
    return shape_of_model(build_on_meta(language_config(config), trust_remote_code))


def shape_of(model) -> ModelShape:
    """A live model's shape (a PEFT wrapper is looked through): from its config where the family is
    known here, the answer the launcher gave, else counted on the model."""
    get_base = getattr(model, "get_base_model", None)
    model = get_base() if callable(get_base) else model
    try:
        return shape_from_config(model.config.to_dict())
    except UnknownArchitecture:
        return shape_of_model(model)


def decoder_layers(model) -> List[Tuple[str, object]]:
    """(name, module) of every decoder block: the classes transformers declares (`_no_split_modules`)."""
    names = next((set(m._no_split_modules) for m in model.modules() if getattr(m, "_no_split_modules", None)), set())
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in names and m is not model]


def layer_weights(layer) -> Tuple[Weight, ...]:
    """The matmul weights of one decoder layer as arch/shape.py describes them."""
    import torch

    out, seen = [], set()
    for name, mod in layer.named_modules():
        conv1d = type(mod).__name__ == "Conv1D"
        if conv1d or isinstance(mod, torch.nn.Linear):
            w = mod.weight
            fan_in, fan_out = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
            plain = conv1d or type(mod) is torch.nn.Linear  # what bitsandbytes replaces
            kind = "conv1d" if conv1d else "linear"
            out.append(
                Weight(name, int(fan_in), int(fan_out), mod.bias is not None, kind, role=role_of(name), plain=plain)
            )
            seen.update(id(p) for p in mod.parameters())
    for name, p in layer.named_parameters():
        if id(p) in seen:
            continue
        if p.dim() == 3:  # stacked experts (E, out, in)
            out.append(
                Weight(
                    name, int(p.shape[2]), int(p.shape[1]), kind="experts", experts=int(p.shape[0]), role=role_of(name)
                )
            )
        elif p.dim() == 2 and name.endswith(".weight"):  # a router's weight (E, hidden)
            out.append(Weight(name[: -len(".weight")], int(p.shape[1]), int(p.shape[0]), kind="router", role="router"))
    return tuple(out)


def shape_of_model(model) -> ModelShape:
    """Sizes and one layout per kind of decoder layer, read from a built model (meta or real)."""
    config = model.config
    layers = decoder_layers(model)
    if not layers:
        raise UnknownArchitecture(f"{type(model).__name__} declares no decoder block class (_no_split_modules)")
    blocks: Dict[Tuple[Tuple[Weight, ...], int], int] = {}
    for _, layer in layers:
        weights = layer_weights(layer)
        other = sum(p.numel() for p in layer.parameters()) - sum(w.params for w in weights)
        blocks[(weights, other)] = blocks.get((weights, other), 0) + 1
    in_layers = sum(p.numel() for _, layer in layers for p in layer.parameters())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight
    head_params = 0 if tied or head is None else sum(p.numel() for p in head.parameters())
    total = sum(p.numel() for p in model.parameters())  # tied weights once
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 0) or 0
    hidden = getattr(text, "hidden_size", 0) or 0
    vocab = getattr(text, "vocab_size", 0) or 0
    experts = max((w.experts for (ws, _) in blocks for w in ws if w.kind == "experts"), default=0)
    names = {id(m): n for n, m in model.named_modules()}
    outer = tuple(
        Weight(names[id(m)].rsplit(".", 1)[-1], a, b, role=role)
        for m, a, b, role in ((head, hidden, vocab, "head"), (emb, vocab, hidden, ""))
        if m is not None and id(m) in names
    )
    return ModelShape(
        vocab=vocab,
        hidden=hidden,
        layers=len(layers),
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        intermediate=getattr(text, "intermediate_size", None) or 0,
        head_dim=getattr(text, "head_dim", None) or (hidden // heads if heads else 0),
        tie_embeddings=tied,
        model_type=getattr(text, "model_type", "") or "",
        blocks=tuple(Block(count, ws, other) for (ws, other), count in blocks.items()),
        embedding=total - in_layers - head_params,
        head=head_params,
        final=0,
        experts=experts,
        experts_per_token=getattr(text, "num_experts_per_tok", 0) or (1 if experts else 0),
        outer=outer,
    )
