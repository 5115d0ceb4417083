"""One description per backend: its schema, how it lays tensors out, what the trainer imports for it.

Read by validation (which options exist, what a backend refuses), the preflight (`layout` for the
memory estimate, the options it may suggest), the README's matrix and the trainers (`family`: the
module under trainers/backends/; `mixed_precision`: the dtype the model is built in).

A backend option is a YAML file under conf/backend/ whose `name` is a key of `BACKENDS`; the file
sets the values of the option's schema. Adding a backend: its schema and entry here, its YAML, its
module under trainers/backends/ (three files).

Pure Python: no torch, no deepspeed (the submit path reads this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from omegaconf import MISSING

from tuneforge.conf.fields import knob


# ---------------------------------------------------------------------------------------- schemas
@dataclass
class BackendConfig:
    """How parameters, gradients and optimizer state are laid out across ranks."""

    name: str = MISSING  # the option: a key of conf/backends.py BACKENDS (ddp, fsdp, zero1, ...)


@dataclass
class DDPConfig(BackendConfig):
    name: str = "ddp"
    bucket_cap_mb: int = knob(25, ge=1, le=2**20)  # gradient all-reduce bucket size
    find_unused_parameters: bool = False  # needed only when some parameters get no gradient in a step


@dataclass
class FSDPConfig(BackendConfig):
    """FSDP2 (torch.distributed.fsdp.fully_shard): parameters, gradients and optimizer state sharded.

    Each transformer block is one sharding unit (all-gathered for its forward and backward), then the
    root takes the rest (embeddings, final norm, head). With train.dtype=bf16 the sharded parameters
    stay fp32 (the optimizer steps fp32 master weights) and a MixedPrecisionPolicy computes in bf16
    and reduces gradients in fp32.
    """

    name: str = "fsdp"
    reshard_after_forward: bool = True  # free each block's gathered weights after its forward (re-gather in
    # backward): less memory, one more all-gather per block; False keeps them until the backward
    cpu_offload: bool = False  # keep sharded params, grads and optimizer state in CPU memory (CPUOffloadPolicy);
    # the optimizer then steps on the CPU. Only meaningful on GPUs (cluster.gpus_per_node > 0)
    shard_modules: List[str] = knob(factory=list)  # class names sharded one unit each; empty: the
    # model's own transformer block classes (transformers' `_no_split_modules`, e.g. LlamaDecoderLayer)


@dataclass
class DeepSpeedConfig(BackendConfig):
    """DeepSpeed ZeRO. Batch sizes, gradient accumulation, clipping and precision always come from
    `train`, and the optimizer from trainers/optim.py, so the two can never disagree.

    Bucket sizes are in elements; None: DeepSpeed's default, capped at the model's trainable parameter
    count (a bucket larger than the model only allocates memory).
    """

    name: str = "zero2"
    stage: int = knob(2, choices=(1, 2, 3))  # ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters
    offload_optimizer: bool = False  # optimizer state and step on the CPU (DeepSpeedCPUAdam)
    offload_params: bool = False  # parameters in CPU memory between uses; stage 3 only
    overlap_comm: bool = False  # overlap gradient reduction with the backward (more memory)
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are produced (less fragmentation)
    reduce_bucket_size: Optional[int] = knob(None, ge=1, le=2**40)  # elements reduced at once
    allgather_bucket_size: Optional[int] = knob(
        None, ge=1, le=2**40
    )  # elements all-gathered at once after the step (stages 1-2)
    prefetch_bucket_size: Optional[int] = knob(
        None, ge=1, le=2**40
    )  # elements of parameters prefetched ahead of use (stage 3)
    param_persistence_threshold: Optional[int] = knob(
        None, ge=0, le=2**40
    )  # parameters smaller than this stay unpartitioned (stage 3)
    config_file: Optional[str] = None  # a DeepSpeed JSON merged UNDER the keys built from this config and
    # `train`; a key that conflicts with ours is refused before launch


# ---------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """How one backend places parameters (P), gradients (G) and optimizer state (O) on a rank."""

    kind: str  # a short name of the layout (ddp, zero2, fsdp_offload, ...), shown by the preflight
    sharding: int  # 0 = none ... higher = more sharded: what "a milder change" means when suggesting fixes
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

    @property
    def offload(self) -> bool:
        return self.offload_params or self.offload_optim


def _ddp_layout(cfg: BackendConfig) -> Layout:
    return Layout("ddp", 0, False, False, False, label="DDP: full replica, gradient buckets")


def _fsdp_layout(cfg: FSDPConfig) -> Layout:
    if cfg.cpu_offload:
        return Layout(
            "fsdp_offload", 5, True, True, True, True, True, fp32_params=True, label="FSDP, params and optimizer on CPU"
        )
    return Layout("fsdp", 3, True, True, True, fp32_params=True, label="FSDP: params, grads, optimizer sharded")


def _zero_layout(cfg: DeepSpeedConfig) -> Layout:
    stage = cfg.stage
    if stage == 3 and (cfg.offload_params or cfg.offload_optimizer):
        return Layout(
            "zero3_offload",
            6,
            True,
            True,
            True,
            cfg.offload_params,
            cfg.offload_optimizer,
            fp32_master=True,
            label="ZeRO-3, params and optimizer on CPU",
        )
    # DeepSpeed 0.19 runs stage 1 with stage 2's optimizer: after backward a rank holds only its
    # partition of the reduced gradients (measured by tests/test_preflight.py), as under ZeRO-2.
    labels = {
        1: "ZeRO-1: optimizer sharded",
        2: "ZeRO-2: grads + optimizer sharded",
        3: "ZeRO-3: params, grads, optimizer sharded",
    }
    return Layout(
        f"zero{stage}",
        {1: 1, 2: 2, 3: 4}[stage],
        stage == 3,
        True,
        True,
        False,
        cfg.offload_optimizer,
        fp32_master=True,
        label=labels[stage],
    )


#: every layout a backend config can produce, by kind (for the estimator's tables and tests)
LAYOUTS: Dict[str, Layout] = {
    layout.kind: layout
    for layout in (
        _ddp_layout(DDPConfig()),
        _fsdp_layout(FSDPConfig()),
        _fsdp_layout(FSDPConfig(cpu_offload=True)),
        *(_zero_layout(DeepSpeedConfig(stage=stage)) for stage in (1, 2, 3)),
        _zero_layout(DeepSpeedConfig(stage=3, offload_optimizer=True, offload_params=True)),
    )
}


# ---------------------------------------------------------------------------------------- descriptions
@dataclass(frozen=True)
class Backend:
    family: str  # "ddp" | "fsdp" | "deepspeed": the module under trainers/backends/ that implements it
    schema: type  # its config dataclass
    layout: Callable[[BackendConfig], Layout]  # how a config of it places tensors (launch/estimate.py reads it)
    # the backend keeps fp32 master weights and casts to train.dtype for compute itself (the model is
    # then built in fp32); False: the model is built in train.dtype
    mixed_precision: bool = False
    # the backend scales the loss (and skips steps whose fp16 gradients overflow): train.dtype=fp16 needs it
    loss_scaling: bool = False


#: option name (conf/backend/<name>.yaml) -> its description
BACKENDS: Dict[str, Backend] = {
    "ddp": Backend("ddp", DDPConfig, _ddp_layout),
    "fsdp": Backend("fsdp", FSDPConfig, _fsdp_layout, mixed_precision=True),
    "zero1": Backend("deepspeed", DeepSpeedConfig, _zero_layout, mixed_precision=True, loss_scaling=True),
    "zero2": Backend("deepspeed", DeepSpeedConfig, _zero_layout, mixed_precision=True, loss_scaling=True),
    "zero3": Backend("deepspeed", DeepSpeedConfig, _zero_layout, mixed_precision=True, loss_scaling=True),
    "zero3_offload": Backend("deepspeed", DeepSpeedConfig, _zero_layout, mixed_precision=True, loss_scaling=True),
}


def backend(cfg: BackendConfig) -> Backend:
    """The description of a backend config (by its option name)."""
    try:
        return BACKENDS[cfg.name]
    except KeyError:
        raise ValueError(f"backend.name: unknown backend '{cfg.name}'; one of {', '.join(BACKENDS)}") from None


def schema_names() -> Dict[str, type]:
    """ConfigStore name -> schema, for conf/schema.py's register(): YAMLs say `defaults: [base_<family>]`."""
    return {f"base_{b.family}": b.schema for b in BACKENDS.values()}


def model_dtype(cfg: BackendConfig, train_dtype: str, peft: bool = False) -> str:
    """The dtype to build or load the model in: fp32 (the master weights) when the backend does mixed
    precision itself. Not for a PEFT method's frozen base, which the optimizer never steps: in
    train.dtype it takes half the memory under FSDP, and QLoRA's packed 4-bit bytes, stored in it,
    pass the backend's own cast unchanged (from fp32 storage the cast would rewrite them as numbers).
    The adapters are fp32 whatever the base (peft upcasts them)."""
    return "fp32" if backend(cfg).mixed_precision and not peft else train_dtype
