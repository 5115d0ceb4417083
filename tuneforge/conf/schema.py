"""Config schemas: one dataclass per config group, registered in Hydra's ConfigStore.

Every YAML under conf/ starts from one of these (``defaults: [base_<name>]``) and sets values only,
so an unknown key or a wrong type fails while composing, naming the key. Options of a group whose
knobs differ (methods, backends, clusters) get their own subclass of the group's base schema: a knob
given to the wrong option is then an unknown key too. Cross-field rules live in launch/validate.py.

This module imports only the standard library, omegaconf and hydra: the submit path stays light.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# ---------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """Which network to train. Either loaded (``name_or_path``) or built from the fields below."""

    kind: str = "tiny"  # "tiny": Llama-architecture built from the fields below; "hf": loaded by id or path
    name_or_path: Optional[str] = None  # HF hub id or local directory; required unless the model is built
    tokenizer: Optional[str] = None  # tokenizer id/path; default: the model's own, or trained on the corpus
    trust_remote_code: bool = False  # passed to transformers' from_pretrained
    attn_implementation: str = "sdpa"  # "sdpa" | "eager" | "flash_attention_2"
    # Architecture, used when the model is built from config (model=tiny, or method=pretrain without a path):
    vocab_size: int = 1024  # also the size of a tokenizer trained on the corpus
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    params_b: Optional[float] = None  # declared size in billions, for presets (used by estimates only)


# ---------------------------------------------------------------------------------------- method
@dataclass
class MethodConfig:
    """How the weights are trained. ``name`` selects the implementation in trainers/methods.py."""

    name: str = MISSING  # "full" | "pretrain" | a PEFT method


@dataclass
class FullConfig(MethodConfig):
    name: str = "full"  # update every weight of a loaded model


@dataclass
class PretrainConfig(MethodConfig):
    name: str = "pretrain"  # random init from the model's architecture; trains a tokenizer if none given
    tokenizer_min_frequency: int = 2  # BPE merges need a pair seen at least this often


# ---------------------------------------------------------------------------------------- backend
@dataclass
class BackendConfig:
    """How parameters, gradients and optimizer state are laid out across ranks."""

    name: str = MISSING  # "ddp" | "fsdp" | "deepspeed"


@dataclass
class DDPConfig(BackendConfig):
    name: str = "ddp"
    bucket_cap_mb: int = 25  # gradient all-reduce bucket size
    find_unused_parameters: bool = False  # needed only when some parameters get no gradient in a step


# ---------------------------------------------------------------------------------------- cluster
@dataclass
class ClusterConfig:
    """Where the tasks run. One task per GPU (or per CPU process when no GPU is used)."""

    name: str = MISSING  # "local" | "slurm"
    nodes: int = 1  # number of machines
    tasks_per_node: int = 1  # processes per machine = GPUs per node
    gpus_per_node: int = 0  # GPUs requested per node; 0 trains on CPU with gloo
    timeout_min: int = 60  # wall-clock limit of one allocation, minutes
    peak_tflops: Optional[float] = None  # dense bf16 TFLOP/s of one device
    # (for MFU; None: measured at the model's GEMM shapes at the start of the run, ~1 s)


@dataclass
class LocalClusterConfig(ClusterConfig):
    name: str = "local"


@dataclass
class SlurmClusterConfig(ClusterConfig):
    name: str = "slurm"
    partition: Optional[str] = None  # sbatch --partition; None: the cluster's default
    account: Optional[str] = None  # sbatch --account
    qos: Optional[str] = None  # sbatch --qos
    cpus_per_task: int = 4  # sbatch --cpus-per-task (data workers + the trainer)
    mem_gb: Optional[int] = None  # memory per node in GB; None: the partition's default
    constraint: Optional[str] = None  # sbatch --constraint, e.g. "a100|h100"
    job_name: str = "tuneforge"  # sbatch --job-name
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = 3  # times the job may requeue itself after a time-out or preemption
    extra_sbatch: List[str] = field(default_factory=list)  # extra lines "--key=value", each one #SBATCH line
    setup: List[str] = field(default_factory=list)  # shell lines run before the task (module load, venv)


# ---------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """What the model reads."""

    name: str = "demo_corpus"  # a label for the dataset, shown in logs
    path: Optional[str] = None  # file or directory; None: the bundled file named by ``name``
    format: str = "text"  # "text": raw text (lines or a "text" field of JSONL rows)
    text_field: str = "text"  # field holding the text in JSONL rows


# ---------------------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    """Where metrics go besides <run dir>/metrics.jsonl (always written by rank 0)."""

    name: str = "none"  # "wandb" | "none"
    mode: str = "auto"  # "auto" (online when a key and route exist, else offline) | "online" | "offline" | "disabled"
    project: str = "tuneforge"
    entity: Optional[str] = None
    group: Optional[str] = None  # W&B group; sweeps set one per sweep
    tags: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    """The optimisation itself. global_batch = micro_batch x world size x grad accumulation."""

    max_steps: int = 100  # optimizer steps
    micro_batch: int = 4  # sequences per rank per forward pass
    global_batch: int = 8  # sequences per optimizer step, over all ranks
    seq_len: int = 64  # tokens per sequence
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 10  # linear warmup from 0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" (after warmup)
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    seed: int = 0
    dtype: str = "fp32"  # "fp32" | "bf16" | "fp16": parameter/compute dtype
    # torch.compile (inductor) the transformer blocks and the loss (trainers/compile.py). Faster steps
    # (1.1-1.4x on CPU at seq 512) for a one-off compile: 30-70 s cold, ~5-10 s once cached in
    # $TORCHINDUCTOR_CACHE_DIR (default ~/.cache/tuneforge/inductor). Off by default: tiny runs and
    # tests would only pay the compile.
    compile: bool = False
    checkpoint_every: int = 50  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 1  # steps between metric records
    stop_after: Optional[int] = None  # stop (as if preempted) after this step; for tests and debugging


# ---------------------------------------------------------------------------------------- run
@dataclass
class RunConfig:
    name: str = "default"  # run name: the run dir is runs/<name>/<timestamp> unless run.dir is set
    dir: Optional[str] = None  # the run directory; fixed at submission, reused by restarts and requeues
    root: str = "runs"  # parent of run directories


@dataclass
class Config:
    """The whole run. Groups are chosen in conf/train.yaml's defaults and on the command line."""

    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    backend: BackendConfig = MISSING
    cluster: ClusterConfig = MISSING
    data: DataConfig = MISSING
    logger: LoggerConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


#: group -> {option schema name: dataclass}. YAMLs say ``defaults: [<schema name>]``.
SCHEMAS: Dict[str, Dict[str, Any]] = {
    "model": {"base_model": ModelConfig},
    "method": {"base_full": FullConfig, "base_pretrain": PretrainConfig},
    "backend": {"base_ddp": DDPConfig},
    "cluster": {"base_local": LocalClusterConfig, "base_slurm": SlurmClusterConfig},
    "data": {"base_data": DataConfig},
    "logger": {"base_logger": LoggerConfig},
}


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=group, name=name, node=node)
