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
    # Architecture family as in config.json's "model_type" (llama, mistral, qwen2, ...), so that
    # method.target_modules can be checked before launch; None: read from a local name_or_path.
    model_type: Optional[str] = None


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


# PEFT methods: peft trains a small adapter on a frozen base (trainers/methods.py maps these onto peft's
# config classes). Each has its own schema, so a knob of one method given to another is an unknown key.
PEFT_METHODS = ("lora", "qlora", "adalora", "ia3", "loha", "lokr", "dora")


@dataclass
class PeftMethodConfig(MethodConfig):
    # Module names (the last part, e.g. q_proj, or a dotted suffix) that get an adapter. None: every
    # linear layer of the decoder except the output head (IA3: peft's per-architecture default).
    target_modules: Optional[List[str]] = None


@dataclass
class LoraMethodConfig(PeftMethodConfig):
    name: str = "lora"  # low-rank update B @ A added to each target weight
    r: int = 8  # rank of the update
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.05  # dropout on the adapter's input
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)


@dataclass
class DoraMethodConfig(LoraMethodConfig):
    name: str = "dora"  # LoRA with the weight split into magnitude and direction (peft's use_dora)


@dataclass
class QLoraMethodConfig(LoraMethodConfig):
    name: str = "qlora"  # LoRA on a base loaded in 4 bits (bitsandbytes); compute dtype = train.dtype
    quant_type: str = "nf4"  # "nf4" | "fp4"
    double_quant: bool = True  # also quantise the quantisation constants (~0.4 bit per weight saved)
    # dtype holding the packed 4-bit weights: "auto" (the dtype the other parameters are loaded in, which
    # FSDP needs to shard them) | "uint8" | "fp32" | "bf16" | "fp16"
    quant_storage: str = "auto"


@dataclass
class AdaLoraMethodConfig(PeftMethodConfig):
    name: str = "adalora"  # LoRA whose ranks are reallocated between modules during training (SVD form)
    init_r: int = 12  # starting rank of every module
    target_r: int = 8  # average rank left at the end of the budget schedule
    alpha: float = 16.0  # scaling of the update (alpha / rank)
    dropout: float = 0.05
    tinit: int = 0  # warmup steps before ranks start to be cut
    tfinal: int = 0  # final steps with the ranks fixed
    deltaT: int = 1  # steps between two rank allocations
    beta1: float = 0.85  # EMA of the importance scores
    beta2: float = 0.85  # EMA of their uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality penalty on A and B (logged as orth_loss)


@dataclass
class IA3MethodConfig(PeftMethodConfig):
    name: str = "ia3"  # learned per-channel scaling vectors
    # Those of target_modules inside the MLP: IA3 scales their input instead of their output.
    # None: peft's per-architecture default (set it whenever target_modules is set).
    feedforward_modules: Optional[List[str]] = None


@dataclass
class LohaMethodConfig(PeftMethodConfig):
    name: str = "loha"  # low-rank Hadamard product update
    r: int = 8
    alpha: float = 8.0  # the update is scaled by alpha / r
    rank_dropout: float = 0.0  # dropout on each rank of the update
    module_dropout: float = 0.0  # probability of skipping a module's update in a step


@dataclass
class LokrMethodConfig(PeftMethodConfig):
    name: str = "lokr"  # low-rank Kronecker product update
    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    factor: int = -1  # Kronecker factor size; -1: as square as possible
    decompose_both: bool = False  # low-rank decompose the left Kronecker factor too


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
    shard_modules: List[str] = field(default_factory=list)  # class names sharded one unit each; empty: the
    # model's own transformer block classes (transformers' `_no_split_modules`, e.g. LlamaDecoderLayer)


@dataclass
class DeepSpeedConfig(BackendConfig):
    """DeepSpeed ZeRO. Batch sizes, gradient accumulation, clipping and precision always come from
    `train`, and the optimizer from trainers/optim.py, so the two can never disagree.

    Bucket sizes are in elements; None: DeepSpeed's default, capped at the model's trainable parameter
    count (a bucket larger than the model only allocates memory).
    """

    name: str = "deepspeed"
    stage: int = 2  # ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters
    offload_optimizer: bool = False  # optimizer state and step on the CPU (DeepSpeedCPUAdam)
    offload_params: bool = False  # parameters in CPU memory between uses; stage 3 only
    overlap_comm: bool = False  # overlap gradient reduction with the backward (more memory)
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are produced (less fragmentation)
    reduce_bucket_size: Optional[int] = None  # elements reduced at once
    allgather_bucket_size: Optional[int] = None  # elements all-gathered at once after the step (stages 1-2)
    prefetch_bucket_size: Optional[int] = None  # elements of parameters prefetched ahead of use (stage 3)
    param_persistence_threshold: Optional[int] = None  # parameters smaller than this stay unpartitioned (stage 3)
    config_file: Optional[str] = None  # a DeepSpeed JSON merged UNDER the keys built from this config and
    # `train`; a key that conflicts with ours is refused before launch


# ---------------------------------------------------------------------------------------- cluster
@dataclass
class ClusterConfig:
    """Where the tasks run. One task per GPU (or per CPU process when no GPU is used)."""

    name: str = MISSING  # "local" | "slurm"
    nodes: int = 1  # number of machines
    tasks_per_node: int = 1  # processes per machine = GPUs per node
    gpus_per_node: int = 0  # GPUs requested per node; 0 trains on CPU with gloo
    timeout_min: int = 60  # wall-clock limit of one allocation, minutes
    # What the preflight checks against (launch/preflight.py); GPU types in launch/estimate.py GPU_TYPES:
    gpu_type: Optional[str] = None  # a100_40g | a100_80g | h100_80g | h200 | l40s | ...: memory and peak below
    gpu_memory_gb: Optional[float] = None  # memory per GPU in GiB; None: that of gpu_type
    # dense bf16 TFLOP/s of one device (per GPU, or per CPU process), for MFU and time estimates;
    # None: that of gpu_type, or on CPU measured at the model's GEMM shapes at the start of the run (~1 s)
    peak_tflops: Optional[float] = None
    assumed_mfu: float = 0.4  # model FLOPs utilisation for time estimates, until the run has measured its own
    # USR2 this long before the time limit: every rank finishes its step, a checkpoint is saved
    # collectively and the job requeues into the same run dir (Slurm may send it up to ~30 s earlier)
    signal_delay_s: int = 120
    max_requeues: int = 3  # times the job may requeue itself (time-outs and preemptions both count)
    # a collective that waits longer than this (a rank died or hangs) fails the job instead of hanging it
    collective_timeout_s: int = 600


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
    extra_sbatch: List[str] = field(default_factory=list)  # extra lines "--key=value", each one #SBATCH line
    setup: List[str] = field(default_factory=list)  # shell lines run before the task (module load, venv)


# ---------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """What the model reads, how it is rendered into tokens, and how tokens become rows (docs/data.md)."""

    name: str = "demo_corpus"  # a label for the dataset, shown in logs; names the bundled file when no path/hub_id
    path: Optional[str] = None  # local file or folder (.jsonl .json .parquet .csv .txt); None: bundled file `name`
    hub_id: Optional[str] = None  # a Hugging Face dataset id (or a dataset folder), read with datasets.load_dataset
    hub_config: Optional[str] = None  # the dataset's configuration (subset) name
    hub_split: str = "train"  # the split to train on
    hub_revision: Optional[str] = None  # a branch, tag or commit of the dataset repository
    format: str = "text"  # "text" | "alpaca" (instruction, input, output) | "chat" (messages) | "completion"
    text_field: str = "text"  # format=text: the field holding the document (rows of JSONL, CSV, Parquet)
    instruction_field: str = "instruction"  # format=alpaca
    input_field: str = "input"  # format=alpaca: optional context appended to the instruction
    output_field: str = "output"  # format=alpaca: the response
    prompt_field: str = "prompt"  # format=completion
    completion_field: str = "completion"  # format=completion: the response
    messages_field: str = "messages"  # format=chat: a list of {role: system|user|assistant, content}
    text_sample_by: str = "paragraph"  # .txt files: one document per "paragraph" (blank line) | "line" | "document"
    chat_template: Optional[str] = None  # Jinja chat template; None: the tokenizer's, else the default in docs/data.md
    train_on_prompt: bool = False  # False: only response tokens count in the loss (alpaca, chat, completion)
    packing: bool = True  # pack examples into full rows (attention stays within each one); False: one per row, padded
    streaming: bool = False  # read while training (corpora larger than memory or disk cache); no token cache
    stream_window: int = 1000  # streaming: examples read, packed and shuffled together (and re-read on resume)
    validation_path: Optional[str] = None  # validation file or folder, same format as the training data
    validation_fraction: float = 0.0  # without validation_path: carve this fraction of examples off for validation
    # tokenised data, keyed by data, tokenizer, format and seq_len; $TUNEFORGE_DATA_CACHE sets the default
    cache_dir: str = "${oc.env:TUNEFORGE_DATA_CACHE,'~/.cache/tuneforge/data'}"
    precheck: bool = True  # scan local files for bad rows before submitting; false when only compute nodes see them
    precheck_max_mb: int = 256  # scan at most this much before submitting; the job checks the rest at its start


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
    eval_every: int = 50  # steps between validation losses (and at the end), when there is validation data; 0: never
    eval_batches: int = 4  # global batches of validation data per evaluation (fewer when there is less data)
    stop_after: Optional[int] = None  # stop (as if preempted) after this step; for tests and debugging
    activation_checkpointing: bool = False  # recompute each block's activations in the backward instead of
    # keeping them (less memory, ~1/3 more compute); works with every backend
    # pause after every step: a run that lasts long enough to be preempted or to outlive its time
    # limit, whatever the machine's speed (tests of requeue and of `tuneforge status`); losses unchanged
    step_sleep_s: float = 0.0


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
    "method": {
        "base_full": FullConfig,
        "base_pretrain": PretrainConfig,
        "base_lora": LoraMethodConfig,
        "base_dora": DoraMethodConfig,
        "base_qlora": QLoraMethodConfig,
        "base_adalora": AdaLoraMethodConfig,
        "base_ia3": IA3MethodConfig,
        "base_loha": LohaMethodConfig,
        "base_lokr": LokrMethodConfig,
    },
    "backend": {"base_ddp": DDPConfig, "base_fsdp": FSDPConfig, "base_deepspeed": DeepSpeedConfig},
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
