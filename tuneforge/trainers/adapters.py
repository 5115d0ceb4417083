"""The LoRA family's hot path (lora, dora, qlora, adalora: peft's LoraLayer): the same maths, less work.

`speed_up(peft_model)` is applied by methods.apply_method to every model with LoRA layers:

- Dropout on the adapters' input with a cheaper random draw (`Dropout`). peft draws a separate mask for
  every adapted linear (7 per Llama layer), over the whole input of each: more random numbers per step
  than anything else in the model. torch's CPU dropout draws a float per element (and inductor's,
  compiled, a Philox number per element, slower still); this one takes 16 bits per element from one
  64-bit draw per four (`Tensor.random_`: the generator torch.manual_seed seeds and the checkpoints
  save) and compares them with the keep threshold. The same dropout up to the rounding of p to a
  multiple of 2^-16: a new mask on every call, each element kept independently, the kept ones scaled
  so that the expectation is x; compiled runs draw the eager masks (tests/test_adapter_speed.py).

- With a low-precision base (train.dtype=bf16) the adapters compute in the base's dtype. peft keeps
  adapter weights in fp32 and casts every adapter input up to fp32 (and the base layer's output with
  it), so each adapted linear runs its skinny matmuls in fp32 (on a CPU without fp32 matrix units,
  10-100x slower than in bf16) and moves fp32 copies of its activations. Here the input casts are
  switched off and the model's forward runs under `torch.autocast(dtype=<base dtype>)`: the adapter
  matmuls take bf16 copies of the fp32 weights, which stay the optimizer's fp32 master weights. That
  is what FSDP2's mixed precision and DeepSpeed's bf16 already do on those backends, and what HF
  Trainer's `bf16=True` does (autocast). QLoRA's fp32 embeddings and output head (peft's
  prepare_model_for_kbit_training upcasts them) then compute in bf16 too, as under HF's bf16=True.

- DoRA layers compile in one graph (compat.peft.trace_plain_dora_weights): peft's reading of the frozen
  weight broke the graph in every adapted linear, and Dynamo ran those layers eagerly.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


@torch.library.custom_op("tuneforge::keep_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def keep_mask(like: torch.Tensor, token: torch.Tensor, threshold: int) -> torch.Tensor:
    """A bool tensor of `like`'s shape whose elements are each True with probability
    (threshold + 2^15) / 2^16: 16 random bits per element, from one 64-bit draw per four elements.

    An opaque op, so that torch.compile does not re-run it in the backward (the partitioner never
    recomputes a custom op: it saves the mask); `token`, a new empty tensor per call, so that it does
    not merge two calls either (its common-subexpression pass merges equal calls of custom ops, but
    never two torch.empty: two dropouts of one input get two masks). The comparison runs here, in
    torch's vectorised kernel (inductor does not vectorise int16 comparisons fused with bf16 maths).
    Functional, not writing into a buffer given to it: an op that wrote into a torch.empty made inside
    a compiled block lost its write there (masks of uninitialised memory, different on every run)."""
    n = like.numel()
    bits = torch.empty(n + (-n) % 4, dtype=torch.int16, device=like.device)
    bits.view(torch.int64).random_(-(2**63), 2**63 - 1)
    return bits[:n].view(like.shape) < threshold


@keep_mask.register_fake
def _(like: torch.Tensor, token: torch.Tensor, threshold: int) -> torch.Tensor:
    return torch.empty(like.shape, dtype=torch.bool, device=like.device)


class Dropout(torch.nn.Module):
    """torch.nn.Dropout's maths (zero each element with probability p, scale the rest by 1 / (1 - p);
    the identity in eval mode), with p rounded to a multiple of 2^-16 (at most 7.7e-6 away: 0.05 ->
    0.0500031) and the scale to match, so that the output's expectation is still exactly x."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.kept = round((1.0 - self.p) * 2**16)  # of 2^16
        self.scale = 2**16 / self.kept if self.kept else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.kept == 2**16:  # p = 0 (or rounds to it)
            return x
        if self.kept == 0:
            return torch.zeros_like(x)
        token = torch.empty(0, dtype=torch.int8, device=x.device)  # one per call: never merged
        keep = keep_mask(x.detach(), token, self.kept - 2**15)  # int16 lanes are uniform on [-2^15, 2^15)
        return torch.where(keep, x * self.scale, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def lora_layers(model: torch.nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def speed_up(model: torch.nn.Module) -> dict:
    """Apply both levers to a peft model in place; returns what was done (for the run's log)."""
    layers = lora_layers(model)
    swapped = 0
    for layer in layers:
        for name, dropout in list(layer.lora_dropout.items()):
            if type(dropout) is torch.nn.Dropout:
                layer.lora_dropout[name] = Dropout(dropout.p)
                swapped += 1
    done = {"adapter_dropouts": swapped}
    if any(any(getattr(layer, "use_dora", {}).values()) for layer in layers):
        from tuneforge.compat.peft import trace_plain_dora_weights

        trace_plain_dora_weights()
        done["dora_compiled_whole"] = True
    base_dtype = compute_dtype(model)
    if layers and base_dtype in LOW_PRECISION:
        for layer in layers:
            layer.cast_input_dtype_enabled = False  # peft.helpers.disable_input_dtype_casting, kept on
        device_type = next(model.parameters()).device.type
        # Only `forward` is replaced (as compile.compile_blocks does): hooks and DDP's wrapper stay outside.
        model.forward = torch.autocast(device_type, dtype=base_dtype)(model.forward)
        done["adapter_compute_dtype"] = str(base_dtype).split(".")[-1]
    return done


def compute_dtype(model: torch.nn.Module):
    """The dtype the frozen base computes in: a 4-bit base's compute dtype (bitsandbytes), else the
    floating dtype most frozen weights are held in (None if none is frozen)."""
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantization is not None and getattr(quantization, "load_in_4bit", False):
        return quantization.bnb_4bit_compute_dtype
    sizes: dict = {}
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get) if sizes else None
