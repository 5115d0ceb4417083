"""A model's architecture as plain numbers, and the FLOPs it costs per token: one reading for all.

`ModelShape` holds the sizes (hidden, layers, heads, KV heads, head dim, intermediate, vocab, tied
embeddings, experts and experts per token) and every weight of a decoder layer as a `Weight`: its
path under the layer, in/out features, bias, and whether it is an nn.Linear, a GPT-2 Conv1D, a stacked
expert parameter or a router. Built from the sizes alone it is a Llama-family layer (the presets, the
tiny model); `shape_from_config` (arch/families.py) builds it from any family's config.json.

`flops_per_token` is the one count of training FLOPs: the preflight multiplies it by the step's tokens,
the trainer divides achieved FLOP/s by the device's peak with it. Neither computes FLOPs any other way.
A mixture of experts counts every expert for memory (`params`) and the experts a token passes through
for FLOPs (`active_params`, `matmul_params`).

Pure Python: no torch, no transformers (the submit path reads this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

#: what a Weight is: an nn.Linear (or subclass), GPT-2's transposed Conv1D, a 3-D parameter of stacked
#: experts (transformers 5 fuses a layer's experts into one module), a router's 2-D weight parameter
KINDS = ("linear", "conv1d", "experts", "router")


@dataclass(frozen=True)
class Weight:
    """One weight of a decoder layer that enters a matmul.

    name: the module's path under the decoder layer ("self_attn.q_proj", "attn.c_attn",
    "mlp.experts.gate_up_proj"; a router: its module, the parameter is `name + ".weight"`).
    role: what it computes (q k v qkv o gate up gate_up down router shared_gate), which methods'
    defaults read (IA3: k, v, down). plain: exactly nn.Linear or Conv1D, what bitsandbytes quantises
    (Falcon's FalconLinear subclass is not)."""

    name: str
    fan_in: int
    fan_out: int
    bias: bool = False
    kind: str = "linear"
    experts: int = 1
    role: str = ""
    plain: bool = True

    @property
    def params(self) -> int:
        return self.experts * (self.fan_in * self.fan_out + (self.fan_out if self.bias else 0))

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def quantizable(self) -> bool:
        return self.plain and self.kind in ("linear", "conv1d")


@dataclass(frozen=True)
class Block:
    """`count` identical decoder layers: their weights and what else they hold (`other`: norms)."""

    count: int
    weights: Tuple[Weight, ...]
    other: int

    @property
    def params(self) -> int:
        return sum(w.params for w in self.weights) + self.other

    def active_params(self, experts_per_token: int) -> int:
        """Params a token passes through: of each expert stack only `experts_per_token` experts."""
        return self.other + sum(
            w.params if w.kind != "experts" else w.params // w.experts * experts_per_token for w in self.weights
        )


def llama_weights(
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    qkv_bias=False,
    o_bias=False,
    mlp_bias=False,
) -> Tuple[Weight, ...]:
    """A Llama decoder layer: q, k, v, o projections and a SwiGLU MLP (gate, up, down)."""
    h, q, kv, i = hidden, heads * head_dim, kv_heads * head_dim, intermediate
    return (
        Weight("self_attn.q_proj", h, q, qkv_bias, role="q"),
        Weight("self_attn.k_proj", h, kv, qkv_bias, role="k"),
        Weight("self_attn.v_proj", h, kv, qkv_bias, role="v"),
        Weight("self_attn.o_proj", q, h, o_bias, role="o"),
        Weight("mlp.gate_proj", h, i, mlp_bias, role="gate"),
        Weight("mlp.up_proj", h, i, mlp_bias, role="up"),
        Weight("mlp.down_proj", i, h, mlp_bias, role="down"),
    )


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer. The sizes alone (blocks left empty) describe a Llama-family model
    (Llama, Mistral, Qwen2: SwiGLU, RMSNorm, GQA); arch/families.py fills in every other family's layout."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int  # the dense MLP width; a mixture of experts: one expert's width
    head_dim: int = 0  # 0: hidden // heads
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    model_type: str = "llama"
    blocks: Tuple[Block, ...] = ()  # (): the Llama layout of the sizes above
    embedding: Optional[int] = None  # input tables (tokens, learned positions, their norms); None: vocab x hidden
    head: Optional[int] = None  # the output head (and its bias) unless tied; None: vocab x hidden, 0 when tied
    final: Optional[int] = None  # the final norm; None: hidden (RMSNorm)
    experts: int = 0  # routed experts per MoE layer (0: dense)
    experts_per_token: int = 0
    position_limit: int = 0  # learned position embeddings (GPT-2, OPT): the longest sequence; 0: no table
    # modules outside the decoder layers that method.target_modules may name (the head, the token embedding)
    outer: Tuple[Weight, ...] = ()

    def __post_init__(self):
        fill = object.__setattr__
        if not self.blocks:
            weights = llama_weights(self.hidden, self.heads, self.kv_heads, self.dim, self.intermediate, self.qkv_bias)
            fill(self, "blocks", (Block(self.layers, weights, 2 * self.hidden),))  # two RMSNorm weights
        if self.embedding is None:
            fill(self, "embedding", self.vocab * self.hidden)
        if self.head is None:
            fill(self, "head", 0 if self.tie_embeddings else self.vocab * self.hidden)
        if self.final is None:
            fill(self, "final", self.hidden)
        if not self.outer:
            fill(
                self,
                "outer",
                (
                    Weight("lm_head", self.hidden, self.vocab, role="head"),
                    Weight("embed_tokens", self.vocab, self.hidden),
                ),
            )

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    # ------------------------------------------------------------------------- weights
    def layer_weights(self) -> Tuple[Weight, ...]:
        """The weights of the largest decoder layer (an MoE model may have dense layers too)."""
        return max(self.blocks, key=lambda b: b.params).weights

    def all_weights(self) -> List[Tuple[int, Weight]]:
        """(layers holding it, weight) over every kind of decoder layer."""
        return [(b.count, w) for b in self.blocks for w in b.weights]

    def linears(self) -> Dict[str, Tuple[int, int]]:
        """(in, out) features of each linear module of the largest decoder layer, by its path."""
        return {w.name: (w.fan_in, w.fan_out) for w in self.layer_weights() if w.kind in ("linear", "conv1d")}

    def module_names(self) -> Tuple[str, ...]:
        """Names method.target_modules may use: each weight's leaf and path, and the outer modules."""
        names: Dict[str, None] = {}
        for _, w in self.all_weights():
            names.update({w.leaf: None, w.name: None})
        names.update({w.name: None for w in self.outer})
        return tuple(names)

    # ------------------------------------------------------------------------- counts
    def layer_params(self) -> int:
        return max(b.params for b in self.blocks)

    def embedding_params(self) -> int:
        """Input embedding, lm_head (unless tied) and the final norm: what no decoder layer holds."""
        return self.embedding + self.head + self.final

    def params(self) -> int:
        """Every parameter (what memory holds), tied weights once."""
        return sum(b.count * b.params for b in self.blocks) + self.embedding_params()

    def active_params(self) -> int:
        """Parameters one token uses: an MoE layer's top-k experts only."""
        k = self.experts_per_token or 1
        return sum(b.count * b.active_params(k) for b in self.blocks) + self.embedding_params()

    def matmul_params(self) -> int:
        """Weights a token's matrix multiplies use: all active ones but the input tables, which are
        lookups (a token table tied to the output head is the head's matmul)."""
        return self.active_params() - self.embedding + (self.vocab * self.hidden if self.tie_embeddings else 0)

    def quantized_params(self) -> int:
        """Weights bitsandbytes holds in 4 bits for QLoRA: exactly nn.Linear and Conv1D modules of the
        decoder layers (not subclasses such as FalconLinear, not stacked experts, not the head)."""
        return sum(count * w.fan_in * w.fan_out for count, w in self.all_weights() if w.quantizable)

    def mlp_width(self) -> int:
        """The MLP width one token passes through: the dense width, or its top-k experts' (+ a shared expert)."""
        shared = sum(w.fan_out for w in self.layer_weights() if w.name.endswith("shared_expert.up_proj"))
        return self.intermediate * max(1, self.experts_per_token) + shared

    def largest_module_params(self) -> int:
        """Params of the largest single module (DeepSpeed's `largest_layer_params`): an embedding or a
        layer's weight; a layer's stacked experts are one module, gathered together."""
        modules: Dict[str, int] = {}
        for _, w in self.all_weights():
            key = w.name.rsplit(".", 1)[0] if w.kind == "experts" else w.name
            modules[key] = modules.get(key, 0) + w.params
        tables = [self.vocab * self.hidden, self.head, self.position_limit * self.hidden]  # embeddings, the head
        return max(tables + list(modules.values()))

    def gemm_shapes(self, tokens: int) -> Tuple[Tuple[int, int, int], ...]:
        """(M, K, N) of the forward GEMMs of one decoder block (one expert of a stack) and the output head."""
        return tuple(
            sorted(
                {(tokens, w.fan_in, w.fan_out) for w in self.layer_weights() if w.kind != "router"}
                | {(tokens, self.hidden, self.vocab)}
            )
        )


class UnknownArchitecture(ValueError):
    """A config.json whose sizes cannot be read here (an unfamiliar family, or a size missing)."""


def flops_per_token(
    shape: ModelShape, seq_len: int, adapter_params: Optional[int] = None, recompute: bool = False
) -> float:
    """Training FLOPs per token (the usual convention: 6N + attention, N the matmul weights a token uses).

    Forward 2 and backward 4 per trained weight; a frozen weight (the base under a PEFT adapter,
    `adapter_params` given) skips its weight gradient: 4. Attention scores and values: 12 x layers x
    hidden x seq_len. `recompute` (activation checkpointing) adds the forward run again, 2N + a third
    of attention: the FLOPs a step costs, which the preflight's time estimate needs; MFU counts model
    FLOPs only, so the trainer leaves it out."""
    n = shape.matmul_params()
    attention = 12 * shape.layers * shape.hidden * seq_len
    if adapter_params is None:
        flops = 6 * n + attention
    else:
        flops = 4 * n + 6 * adapter_params + attention
    if recompute:
        flops += 2 * n + attention / 3
    return float(flops)
