"""Memory and FLOPs of a training job by arithmetic alone: no torch, no weights, no network.

The inputs are plain values (a `ModelShape`, a `MethodSpec`, a backend `Layout`, world size, micro
batch, sequence length, dtype, activation checkpointing); launch/preflight.py maps a composed config
onto them. How a backend lays out its tensors is its `Layout` (conf/backends.py), the sizes of a
method's adapter its formula (conf/methods.py) over the family's target weights (tuneforge/arch/adapters.py),
FLOPs per token tuneforge/arch's count; every other assumption is one entry of a table below, named and
explained where it is declared:
when a backend changes its layout, its row changes, and tests/test_preflight.py compares the rows with
the bytes a real run holds.

Units: bytes and FLOPs as plain numbers; GiB (2**30) only when printed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from tuneforge.arch import ModelShape, adapters, flops_per_token
from tuneforge.conf import methods
from tuneforge.conf.backends import LAYOUTS, Layout
from tuneforge.conf.methods import MethodConfig

__all__ = ["LAYOUTS", "Layout", "ModelShape", "flops_per_token"]  # read through this module by the preflight

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# ------------------------------------------------------------------------------------ layout tables
#: Adapter weights of PEFT methods are float32 whatever the base dtype: peft's get_peft_model upcasts
#: bf16/fp16 adapters (autocast_adapter_dtype=True, its default); their grads and Adam states follow.
ADAPTER_BYTES = 4
#: QLoRA: bitsandbytes NF4 stores 2 weights per byte, one absmax per 64 weights; double quantisation
#: stores those as 8-bit with one fp32 constant per 256 blocks: 0.5 + 1/64 + 4/(64*256) bytes/weight.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
#: QLoRA: what bitsandbytes leaves unquantised (embeddings, lm_head, norms) is cast to float32 by
#: peft's prepare_model_for_kbit_training (the recipe in ENVIRONMENT.md).
QLORA_UNQUANTIZED_BYTES = 4
#: Fixed GPU memory outside the tensors: CUDA context, cuBLAS workspaces, NCCL buffers.
GPU_RUNTIME_OVERHEAD = 1.0 * GIB
#: The caching allocator never packs perfectly: a share of the tensor bytes is lost to fragmentation.
FRAGMENTATION = 0.05
#: DeepSpeed ZeRO-1/2 reduce bucket (reduce_bucket_size, elements), allocated in the gradient dtype.
DEEPSPEED_REDUCE_BUCKET = 5e8


# ------------------------------------------------------------------------------------------ method
@dataclass(frozen=True)
class MethodSpec:
    """What a method trains: `trainable` params (adapters or all), and whether the base is 4-bit."""

    name: str
    trainable: int
    peft: bool  # the base is frozen and trainable weights are float32 adapters
    quantized: bool = False  # QLoRA: decoder linears in NF4


def method_spec(method_cfg: MethodConfig, shape: ModelShape) -> MethodSpec:
    """What `method_cfg` trains on a model of `shape` (adapter sizes from conf/methods.py)."""
    m = methods.method(method_cfg.name)
    if not m.peft:
        return MethodSpec(method_cfg.name, shape.params(), peft=False)
    return MethodSpec(method_cfg.name, adapter_params(method_cfg, shape), peft=True, quantized=m.quantized)


def adapter_params(method_cfg: MethodConfig, shape: ModelShape) -> int:
    """Trainable params a PEFT method adds to its target weights of every decoder layer, which are the
    family's own (tuneforge/arch/adapters.py: the list the trainer hands peft), by the method's formula
    per weight (conf/methods.py). Raises ValueError for a target the model does not have."""
    m = methods.method(method_cfg.name)
    chosen = adapters.targets(shape, m, method_cfg)
    return adapters.adapter_params(
        chosen, lambda fan_in, fan_out, ff: m.adapter_params(fan_in, fan_out, method_cfg, ff)
    )


# ------------------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class Job:
    """The knobs of one job that memory and time depend on."""

    layout: Layout  # how the backend places tensors (conf/backends.py)
    world_size: int
    micro_batch: int
    seq_len: int
    dtype: str  # "fp32" | "bf16" | "fp16"
    activation_checkpointing: bool = False
    attention: str = "sdpa"  # "eager" materialises the seq x seq scores

    def with_(self, **changes) -> "Job":
        return replace(self, **changes)


@dataclass(frozen=True)
class Memory:
    """Bytes per rank. params/grads/optim are what the rank holds between steps (model states)."""

    params: float
    grads: float
    optim: float
    activations: float  # peak of forward + backward for one micro batch
    buffers: float  # communication / gathered-parameter buffers of the backend
    step_transient: float  # alive only inside optimizer.step (DeepSpeed's fp32 gradient copy)
    overhead: float  # CUDA context, workspaces, fragmentation; 0 on CPU
    cpu: float  # bytes this rank keeps in CPU memory (offload)
    grads_at_loss: float = 0.0  # gradients already there when backward starts (lm_head's)
    activations_at_start: float = 0.0  # activation peak early in backward (few gradients yet)
    activations_at_end: float = 0.0  # activation peak late in backward (alongside the gradients)

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optim

    @property
    def peak_dynamic(self) -> float:
        """What comes and goes within a step, at its peak. Backward frees activations layer by layer
        while gradients fill in (they are freed after each step: zero_grad(set_to_none=True)), so the
        peak is early in backward (activations, lm_head's gradient), late in backward (the first
        layer's activations, all gradients) or in the optimizer step (gradients and its buffer)."""
        return max(
            self.activations_at_start + self.grads_at_loss,
            self.activations_at_end + self.grads,
            self.grads + self.step_transient,
        )

    @property
    def total(self) -> float:
        return self.params + self.optim + self.buffers + self.overhead + self.peak_dynamic


def memory(shape: ModelShape, method: MethodSpec, job: Job, on_gpu: bool = True) -> Memory:
    layout = job.layout
    w, b = job.world_size, DTYPE_BYTES[job.dtype]
    stored = 4 if layout.fp32_params else b  # bytes of one weight as the backend stores it
    n_all, n_train = shape.params(), method.trainable
    train_bytes = ADAPTER_BYTES if method.peft else stored  # bytes of one trainable weight (and its grad)

    # Parameters: trainable weights + a frozen base (PEFT) in its own storage.
    if method.quantized:
        linear = shape.quantized_params()
        frozen = linear * NF4_BYTES + (n_all - linear) * QLORA_UNQUANTIZED_BYTES
    else:
        frozen = n_all * b if method.peft else 0  # a frozen base is loaded in train.dtype on every backend
    params = frozen + n_train * train_bytes
    grads = n_train * train_bytes
    # AdamW: two moments; DeepSpeed: fp32 moments plus an fp32 master copy.
    optim = n_train * (12 if layout.fp32_master else 2 * train_bytes)
    step_transient = n_train * 4 / w if layout.fp32_master and train_bytes < 4 else 0.0

    params_here = params / w if layout.shard_params else params
    grads_here = grads / w if layout.shard_grads else grads
    optim_here = optim / w if layout.shard_optim else optim
    cpu = 0.0
    if layout.offload_params:
        cpu, params_here = cpu + params_here, 0.0
    if layout.offload_optim:
        cpu, optim_here, grads_here = cpu + optim_here + grads_here, 0.0, 0.0
        step_transient = 0.0

    buffers = _buffers(shape, method, job, layout, b, train_bytes)
    tokens = job.micro_batch * job.seq_len
    _, at_start, at_end = activation_bytes_per_token(
        shape, job.dtype, job.activation_checkpointing, job.attention, job.seq_len
    )
    at_start, at_end = at_start * tokens, at_end * tokens
    activations = max(at_start, at_end)
    overhead = (
        GPU_RUNTIME_OVERHEAD + FRAGMENTATION * (params_here + grads_here + optim_here + buffers + activations)
        if on_gpu
        else 0.0
    )
    # lm_head's gradient is the first one backward writes; in full training it is there at the peak.
    head = 0.0 if method.peft or n_all == 0 else grads_here * shape.vocab * shape.hidden / n_all
    return Memory(
        params_here, grads_here, optim_here, activations, buffers, step_transient, overhead, cpu, head, at_start, at_end
    )


def _buffers(shape: ModelShape, method: MethodSpec, job: Job, layout: Layout, b: int, train_bytes: int) -> float:
    """Memory a backend adds for communication or for gathering sharded parameters."""
    if layout.kind == "ddp":
        # DDP copies gradients into buckets for the all-reduce (gradient_as_bucket_view=False), even
        # with one rank (measured: RSS grows by twice the gradient bytes in the first backward).
        return method.trainable * train_bytes
    if not layout.shard_params:  # ZeRO-1/2: one reduce bucket in the gradient dtype
        return min(DEEPSPEED_REDUCE_BUCKET, method.trainable) * train_bytes
    if layout.kind.startswith("zero3"):
        # DeepSpeed's own estimator: 4 bytes x the largest layer (its gathered bf16 params and grads).
        return 4 * shape.largest_module_params()
    # FSDP2: the root unit (embeddings, lm_head, final norm) stays gathered through forward and
    # backward, with its unsharded grads; one decoder layer is gathered and one prefetched.
    root, layer = shape.embedding_params(), shape.layer_params()
    return b * (2 * root + 2 * layer)


# ------------------------------------------------------------------------------------ host memory
#: Host memory of one rank's process before any weight: the interpreter with torch, transformers,
#: tokenizer and data pipeline (0.25 GiB with torch and transformers imported on the CPU box, measured;
#: peft, deepspeed and a data batch on top), and with a GPU the CUDA runtime's host side (driver,
#: kernels, pinned staging), about 1.5 GiB more.
HOST_RUNTIME_CPU = 0.5 * GIB
HOST_RUNTIME_GPU = 2.0 * GIB
#: A sharded load (trainers/sharded/: FSDP2, ZeRO-3) holds the rank's share of the weights plus the
#: block being read; measured at most 1.25 x the share plus one block
#: (benchmarks/results/load_memory_2026-12-01_cpu.md: 0.62-0.72 GiB for a 0.47 GiB share, 0.094 GiB block).
SHARDED_LOAD_FACTOR = 1.25


@dataclass(frozen=True)
class HostMemory:
    """Bytes of host (CPU) memory one rank holds at its peak, and the node's total."""

    load: float  # while the weights are read: the whole model, or the rank's share plus one block
    train: float  # while training: what lives in host memory (offloaded states; everything on CPU)
    runtime: float  # the process itself (HOST_RUNTIME_*)
    ranks_per_node: int
    sharded_load: bool

    @property
    def per_rank(self) -> float:
        return self.runtime + max(self.load, self.train)

    @property
    def per_node(self) -> float:
        return self.per_rank * self.ranks_per_node


def host_memory(
    shape: ModelShape,
    method: MethodSpec,
    job: Job,
    device_memory: Memory,
    ranks_per_node: int,
    load_dtype: str,
    sharded_load: bool,
    on_gpu: bool = True,
) -> HostMemory:
    """Host memory per rank and per node. `device_memory`: `memory(...)` of the same job; `load_dtype`:
    the dtype the weights are loaded in (conf/backends.py model_dtype); `sharded_load`: every rank reads
    only its share (conf/methods.py loads_sharded), else `from_pretrained` puts the whole model in every
    rank's host memory before it moves to the GPU (QLoRA on a GPU: bitsandbytes places each tensor on the
    GPU as it is read, one block at a time)."""
    b = DTYPE_BYTES[load_dtype]
    block = shape.layer_params() * b
    whole = shape.params() * b
    if sharded_load:
        load = SHARDED_LOAD_FACTOR * whole / job.world_size + block
    elif method.quantized and on_gpu:
        load = block
    else:
        load = whole
    train = device_memory.cpu if on_gpu else device_memory.total
    runtime = HOST_RUNTIME_GPU if on_gpu else HOST_RUNTIME_CPU
    return HostMemory(float(load), float(train), runtime, ranks_per_node, sharded_load)


#: Backward through one decoder layer holds that layer's saved tensors and, on top, the gradients of
#: its activations: a quarter of the layer's size at the peak (peak RSS of real CPU steps, 4 models).
LAYER_BACKWARD_FACTOR = 1.25


def activation_bytes_per_token(
    shape: ModelShape, dtype: str, checkpointing: bool, attention: str = "sdpa", seq_len: int = 0
) -> Tuple[float, float, float]:
    """(saved, at_start, at_end) bytes per token of one micro batch.

    saved: what the forward pass leaves for autograd (and the logits the loop holds), counted from
    what autograd keeps in Hugging Face's Llama layer (checked tensor by tensor with saved_tensors_hooks
    in tests/test_preflight.py): each RMSNorm keeps its float32 input, 1/rms, its normalised output,
    and the next linear its input (4h + 4 + 2bh); sdpa attention keeps q, k, v (k and v at GQA width),
    its output, which is also o_proj's input, and the log-sum-exp (b(2q + 2kv) + 4 x heads); eager
    attention keeps q, k and v repeated to all heads, o_proj's input and the float32 softmax with its
    cast copy (4bq + heads x seq x (4 + b)); the MLP keeps gate, silu(gate), up and down's input (4bi).
    The loss keeps the logits (bV) and log_softmax's float32 output (4V). With activation
    checkpointing a layer keeps only its input (bh).
    at_start: the peak early in backward, while (almost) no weight gradient exists yet: the loss
    gradient (8V: log_softmax's float32 output and input gradients) on top of everything saved, or
    the first layer's backward working set.
    at_end: the peak late in backward, alongside (almost) all weight gradients: the first layer's
    activations (recomputed, with checkpointing) and its backward working set.
    """
    b = DTYPE_BYTES[dtype]
    h, q, kv, i, v = shape.hidden, shape.heads * shape.dim, shape.kv_heads * shape.dim, shape.mlp_width(), shape.vocab
    norm = 4 * h + 4 + 2 * b * h
    if attention == "eager":
        attn = 4 * b * q + shape.heads * seq_len * (4 + (b if b < 4 else 0))
    else:
        attn = b * (2 * q + 2 * kv) + 4 * shape.heads
    layer = 2 * norm + attn + 4 * b * i
    loss = norm + (b + 4) * v
    saved = (shape.layers * b * h if checkpointing else shape.layers * layer) + loss
    first_layer = (LAYER_BACKWARD_FACTOR - (0 if checkpointing else 1)) * layer  # beyond what is saved
    at_start = max(saved + 8 * v, saved - loss + first_layer)
    at_end = LAYER_BACKWARD_FACTOR * layer
    return float(saved), float(at_start), float(at_end)


def flops_per_step(shape: ModelShape, method: MethodSpec, seq_len: int, recompute: bool, global_batch: int) -> float:
    """FLOPs of one optimizer step: tuneforge/arch's count per token (adapters: the frozen base's weight
    gradients skipped) over the global batch's tokens."""
    adapter = method.trainable if method.peft else None
    return flops_per_token(shape, seq_len, adapter, recompute=recompute) * global_batch * seq_len


def step_seconds(flops: float, world: int, peak: Optional[float], mfu: float) -> Optional[float]:
    """Seconds per step; None without a peak, or when the figures give no finite time."""
    step = flops / (world * peak * 1e12 * mfu) if peak else None
    return step if step is not None and math.isfinite(step) else None


def gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / GIB:.1f}"
