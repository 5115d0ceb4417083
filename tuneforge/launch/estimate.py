"""Memory and FLOPs of a training job by arithmetic alone: no torch, no weights, no network.

The inputs are plain values (a `ModelShape`, a `MethodSpec`, a backend kind string, world size, micro
batch, sequence length, dtype, activation checkpointing), so this module knows nothing of the config
tree; launch/preflight.py maps a composed config onto it. Every assumption about how a backend or a
method lays out its tensors is one entry of a table below, named and explained where it is declared:
when a backend changes its layout, its row changes, and tests/test_preflight.py compares the rows with
the bytes a real run holds.

Units: bytes and FLOPs as plain numbers; GiB (2**30) only when printed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence, Tuple, Union

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

#: gpu_type -> (memory in GiB as nvidia-smi reports it (MiB / 1024), dense bf16 peak TFLOP/s from the
#: vendor's datasheet, without sparsity; V100 and T4 have no bf16: their fp16 tensor-core peak).
GPU_TYPES: Dict[str, Tuple[float, float]] = {
    "a100_40g": (40.0, 312.0),
    "a100_80g": (80.0, 312.0),
    "h100_80g": (79.6, 989.0),  # SXM; the PCIe card peaks at 756
    "h100_pcie": (79.6, 756.0),
    "h100_nvl": (93.6, 835.0),
    "h200": (140.4, 989.0),
    "gh200": (94.5, 989.0),
    "b200": (178.4, 2250.0),
    "l40s": (44.4, 362.0),
    "l40": (44.4, 181.0),
    "l4": (22.0, 121.0),
    "a10g": (22.0, 70.0),
    "a10": (22.0, 125.0),
    "a6000": (47.5, 155.0),
    "rtx4090": (23.6, 165.0),
    "v100_16g": (16.0, 125.0),
    "v100_32g": (32.0, 125.0),
    "t4": (15.0, 65.0),
    "mi250x": (64.0, 383.0),  # one GCD (a Slurm "GPU") of the two on a card
    "mi300x": (192.0, 1307.0),
}

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


@dataclass(frozen=True)
class Layout:
    """How one backend places parameters (P), gradients (G) and optimizer state (O) on a rank."""

    shard_params: bool  # P split over ranks (ZeRO-3, FSDP)
    shard_grads: bool  # G split over ranks (ZeRO-2/3, FSDP)
    shard_optim: bool  # O split over ranks (ZeRO-1/2/3, FSDP)
    offload_params: bool = False  # P held in CPU memory
    offload_optim: bool = False  # O (and the G partition it reads) held in CPU memory
    # DeepSpeed keeps an fp32 copy of the trainable weights and fp32 Adam states, whatever the model
    # dtype; torch's AdamW (DDP, FSDP here: the model is loaded in train.dtype) keeps states in the
    # parameter dtype and no copy.
    fp32_master: bool = False
    # FSDP2 here: the model is built in fp32 and MixedPrecisionPolicy casts each layer for compute,
    # so the sharded parameters, their gradients and AdamW's moments are fp32 whatever train.dtype.
    fp32_params: bool = False
    label: str = ""


BACKENDS: Dict[str, Layout] = {
    "ddp": Layout(False, False, False, label="DDP: full replica, gradient buckets"),
    "fsdp": Layout(True, True, True, fp32_params=True, label="FSDP: params, grads, optimizer sharded"),
    "fsdp_offload": Layout(True, True, True, True, True, fp32_params=True, label="FSDP, params and optimizer on CPU"),
    # DeepSpeed 0.19 runs stage 1 with stage 2's optimizer: after backward a rank holds only its
    # partition of the reduced gradients (measured by tests/test_preflight.py), as under ZeRO-2.
    "zero1": Layout(False, True, True, fp32_master=True, label="ZeRO-1: optimizer sharded"),
    "zero2": Layout(False, True, True, fp32_master=True, label="ZeRO-2: grads + optimizer sharded"),
    "zero3": Layout(True, True, True, fp32_master=True, label="ZeRO-3: params, grads, optimizer sharded"),
    "zero3_offload": Layout(
        True, True, True, True, True, fp32_master=True, label="ZeRO-3, params and optimizer on CPU"
    ),
}
#: Sharding order, least to most: what "a higher stage" means when suggesting fixes.
SHARDING_ORDER = ("ddp", "zero1", "zero2", "fsdp", "zero3", "fsdp_offload", "zero3_offload")


# ------------------------------------------------------------------------------------------ model
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

    def largest_module_params(self) -> int:
        """Params of the largest single module (DeepSpeed's `largest_layer_params`): embedding or an MLP linear."""
        return max(self.vocab * self.hidden, max(a * b for a, b in self.linears().values()))


# ------------------------------------------------------------------------------------------ method
@dataclass(frozen=True)
class MethodSpec:
    """What a method trains: `trainable` params (adapters or all), and whether the base is 4-bit."""

    name: str
    trainable: int
    peft: bool  # the base is frozen and trainable weights are float32 adapters
    quantized: bool = False  # QLoRA: decoder linears in NF4


#: IA3's target modules when none are given: peft's own default for Llama/Mistral/Qwen2
#: (peft.utils.constants TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING). Every other method
#: adapts every linear of the decoder layers by default (trainers/methods.py: "all-linear").
IA3_DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)  # IA3 scales these on their input side
PEFT_METHODS = ("lora", "qlora", "dora", "adalora", "loha", "lokr", "ia3")
#: rank assumed when the method config has no `r` (peft's LoraConfig default)
DEFAULT_RANK = 8


def _factor(n: int) -> Tuple[int, int]:
    """n = a x b with a <= b as close as possible (peft's lokr `factorization(n, -1)`)."""
    a = int(n**0.5)
    while n % a:
        a -= 1
    return a, n // a


def adapter_params(method: str, shape: ModelShape, r: int, targets: Union[str, Sequence[str], None]) -> int:
    """Trainable params a PEFT method adds to every decoder layer's target linears (peft's layouts)."""
    names = _targets(method, shape, targets)
    total = 0
    for name in names:
        fan_in, fan_out = shape.linears()[name]
        if method in ("lora", "qlora"):
            total += r * (fan_in + fan_out)  # A: r x in, B: out x r
        elif method == "dora":
            total += r * (fan_in + fan_out) + fan_out  # + the magnitude vector
        elif method == "adalora":
            total += r * (fan_in + fan_out) + r  # A, B and the singular values E
        elif method == "loha":
            total += 2 * r * (fan_in + fan_out)  # two Hadamard-multiplied low-rank pairs
        elif method == "lokr":
            (out_l, out_k), (in_m, in_n) = _factor(fan_out), _factor(fan_in)
            w2 = r * (out_k + in_n) if r < max(out_k, in_n) / 2 else out_k * in_n
            total += out_l * in_m + w2  # w1 full, w2 low-rank unless the rank is large
        elif method == "ia3":
            total += fan_in if name in IA3_FEEDFORWARD else fan_out
        else:
            raise ValueError(f"no adapter formula for method '{method}'")
    return total * shape.layers


def _targets(method: str, shape: ModelShape, targets) -> Sequence[str]:
    if targets in (None, "", []) and method == "ia3":
        return IA3_DEFAULT_TARGETS
    if targets in (None, "", [], "all-linear"):
        return tuple(shape.linears())
    names = [targets] if isinstance(targets, str) else list(targets)
    unknown = [n for n in names if n not in shape.linears()]
    if unknown:
        raise ValueError(
            f"target modules {unknown} are not linears of a Llama-family layer ({', '.join(shape.linears())})"
        )
    return names


# ------------------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class Job:
    """The knobs of one job that memory and time depend on."""

    backend: str  # a key of BACKENDS
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
    layout = BACKENDS[job.backend]
    w, b = job.world_size, DTYPE_BYTES[job.dtype]
    stored = 4 if layout.fp32_params else b  # bytes of one weight as the backend stores it
    n_all, n_train = shape.params(), method.trainable
    train_bytes = ADAPTER_BYTES if method.peft else stored  # bytes of one trainable weight (and its grad)

    # Parameters: trainable weights + a frozen base (PEFT) in its own storage.
    if method.quantized:
        linear = shape.layers * shape.layer_linear_params()
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
    if job.backend == "ddp":
        # DDP copies gradients into buckets for the all-reduce (gradient_as_bucket_view=False), even
        # with one rank (measured: RSS grows by twice the gradient bytes in the first backward).
        return method.trainable * train_bytes
    if not layout.shard_params:  # ZeRO-1/2: one reduce bucket in the gradient dtype
        return min(DEEPSPEED_REDUCE_BUCKET, method.trainable) * train_bytes
    if job.backend.startswith("zero3"):
        # DeepSpeed's own estimator: 4 bytes x the largest layer (its gathered bf16 params and grads).
        return 4 * shape.largest_module_params()
    # FSDP2: the root unit (embeddings, lm_head, final norm) stays gathered through forward and
    # backward, with its unsharded grads; one decoder layer is gathered and one prefetched.
    root, layer = shape.embedding_params(), shape.layer_params()
    return b * (2 * root + 2 * layer)


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
    h, q, kv, i, v = shape.hidden, shape.heads * shape.dim, shape.kv_heads * shape.dim, shape.intermediate, shape.vocab
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


# ------------------------------------------------------------------------------------------ FLOPs
def flops_per_token(shape: ModelShape, method: MethodSpec, seq_len: int, checkpointing: bool = False) -> float:
    """Training FLOPs per token, the same count as trainers/metrics.py's flops_per_token: 6 per
    trainable weight (forward 2, backward 4), 4 per frozen weight (no weight gradient), and attention
    12 x layers x hidden x seq_len. Activation checkpointing re-runs the forward: + 2N + attention/3."""
    base = shape.params()
    attention = 12 * shape.layers * shape.hidden * seq_len
    if method.peft:  # frozen base, adapters on top
        flops = 4 * base + 6 * method.trainable + attention
    else:
        flops = 6 * base + attention
    if checkpointing:
        flops += 2 * base + attention / 3
    return float(flops)


def gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / GIB:.1f}"
