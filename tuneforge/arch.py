"""A model's architecture as plain numbers, and the FLOPs it costs per token: one reading for all.

`shape_from_config(config.json as a dict)` gives the `ModelShape` that the preflight's memory and time
estimate and the trainer's logged MFU both use, and `flops_per_token` is the one count of training
FLOPs: the preflight multiplies it by the step's tokens, the trainer divides achieved FLOP/s by the
device's peak with it. Neither computes FLOPs any other way.

Pure Python: no torch, no transformers (the submit path reads this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer of the Llama family (Llama, Mistral, Qwen2: SwiGLU, RMSNorm, GQA)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int = 0  # 0: hidden // heads
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linears(self) -> Dict[str, Tuple[int, int]]:
        """(in, out) features of each linear of one decoder layer, by its Hugging Face name."""
        h, q, kv, i = self.hidden, self.heads * self.dim, self.kv_heads * self.dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    def layer_params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.dim if self.qkv_bias else 0
        return self.layer_linear_params() + bias + 2 * self.hidden  # two RMSNorm weights

    def embedding_params(self) -> int:
        """Input embedding, lm_head (unless tied) and the final norm: what no decoder layer holds."""
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params()

    def matmul_params(self) -> int:
        """Weights that take part in a matrix multiply: all but an untied input embedding, which is a
        table lookup (tied to the output head, it is the head's matmul)."""
        return self.params() - (0 if self.tie_embeddings else self.vocab * self.hidden)

    def largest_module_params(self) -> int:
        """Params of the largest single module (DeepSpeed's `largest_layer_params`): embedding or an MLP linear."""
        return max(self.vocab * self.hidden, max(a * b for a, b in self.linears().values()))

    def gemm_shapes(self, tokens: int) -> Tuple[Tuple[int, int, int], ...]:
        """(M, K, N) of the forward GEMMs of one decoder block and the output head at `tokens` rows."""
        return tuple(
            sorted(
                {(tokens, fan_in, fan_out) for fan_in, fan_out in self.linears().values()}
                | {(tokens, self.hidden, self.vocab)}
            )
        )


class UnknownArchitecture(ValueError):
    """A config.json whose sizes cannot be read as a decoder of a known layout."""


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """The shape of a Hugging Face config (config.json as a dict, or `model.config.to_dict()`)."""
    config = config.get("text_config") or config  # multimodal wrappers keep the language model inside
    if any(config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise UnknownArchitecture("mixture-of-experts models are not estimated")
    try:
        heads = config["num_attention_heads"]
        return ModelShape(
            vocab=config["vocab_size"],
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            intermediate=config["intermediate_size"],
            head_dim=config.get("head_dim") or 0,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        )
    except KeyError as e:
        raise UnknownArchitecture(f"no {e.args[0]}: not a Llama-family config") from None


def flops_per_token(
    shape: ModelShape, seq_len: int, adapter_params: Optional[int] = None, recompute: bool = False
) -> float:
    """Training FLOPs per token (the usual convention: 6N + attention, N the matmul weights).

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
