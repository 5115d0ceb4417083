"""Config schemas: one dataclass per config group, registered in Hydra's ConfigStore.

Every YAML under conf/ starts from one of these (``defaults: [base_<name>]``) and sets values only,
so an unknown key or a wrong type fails while composing, naming the key. Options of a group whose
knobs differ (methods, backends, clusters) get their own subclass of the group's base schema: a knob
given to the wrong option is then an unknown key too. Method and backend schemas live with their
descriptions (conf/methods.py, conf/backends.py). Each field declares its range or choices
(conf/fields.py `knob`), checked by validation; rules across fields live in launch/validate.py.

Composition ends in a `Config` instance (OmegaConf.to_object): every function after it reads typed
attributes, and the task receives the same dataclasses (they pickle).

This module imports only the standard library, omegaconf and hydra: the submit path stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from tuneforge.conf import backends, methods
from tuneforge.conf.backends import BackendConfig
from tuneforge.conf.fields import knob
from tuneforge.conf.methods import MethodConfig


# ---------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """Which network to train. Either loaded (``name_or_path``) or built from the fields below."""

    kind: str = knob(
        "tiny", choices=("tiny", "hf")
    )  # "tiny": Llama built from the fields below; "hf": loaded by id or path
    name_or_path: Optional[str] = None  # HF hub id or local directory; required unless the model is built
    tokenizer: Optional[str] = None  # tokenizer id/path; default: the model's own, or trained on the corpus
    trust_remote_code: bool = False  # passed to transformers' from_pretrained
    # "auto": sdpa where the model class has an SDPA path, else eager (said in the dry run and the log)
    attn_implementation: str = knob("auto", choices=("auto", "sdpa", "eager", "flash_attention_2"))
    # Architecture, used when the model is built from config (model=tiny, or method=pretrain without a path):
    vocab_size: int = knob(1024, ge=1, le=2**24)  # also the size of a tokenizer trained on the corpus
    hidden_size: int = knob(64, ge=1, le=2**17)
    intermediate_size: int = knob(128, ge=1, le=2**20)
    num_layers: int = knob(2, ge=1, le=1024)
    num_heads: int = knob(4, ge=1, le=2**12)
    num_kv_heads: int = knob(4, ge=1, le=2**12)
    max_position_embeddings: int = knob(512, ge=2, le=2**24)
    rope_theta: float = knob(10000.0, gt=0, le=1e12)
    tie_word_embeddings: bool = False
    params_b: Optional[float] = knob(
        None, gt=0, le=1e5
    )  # declared size in billions, for presets (used by estimates only)
    # A hub model's sizes under config.json's own names (hidden_size, num_hidden_layers, head_dim, ...),
    # so that the preflight estimates it offline: the presets set them (conf/model/*.yaml). {}: read the
    # local directory's config.json, else fetch it from the hub (launch/hubconfig.py).
    architecture: Dict[str, Any] = knob(factory=dict)
    # Architecture family as in config.json's "model_type" (llama, mistral, qwen2, ...), so that
    # method.target_modules can be checked before launch; None: read from a local name_or_path.
    model_type: Optional[str] = None
    # Vocabulary extension for domain terms (trainers/vocab.py): each term added to the tokenizer as one token;
    # a loaded model's embeddings (and untied head) grow to fit, the new rows starting as the mean of the old ones
    new_tokens: List[str] = knob(factory=list)
    new_tokens_file: Optional[str] = None  # a text file of terms, one per line (# comments), after new_tokens


# ---------------------------------------------------------------------------------------- cluster
@dataclass
class ClusterConfig:
    """Where the tasks run. One task per GPU (or per CPU process when no GPU is used)."""

    name: str = MISSING  # "local" | "slurm"
    nodes: int = knob(1, ge=1, le=100_000)  # number of machines
    tasks_per_node: int = knob(1, ge=1, le=1024)  # processes per machine = GPUs per node
    gpus_per_node: int = knob(0, ge=0, le=256)  # GPUs requested per node; 0 trains on CPU with gloo
    timeout_min: int = knob(60, ge=1, le=366 * 24 * 60)  # wall-clock limit of one allocation, minutes
    # What the preflight checks against (launch/preflight.py); GPU types in conf/gpus.py GPU_TYPES:
    gpu_type: Optional[str] = None  # a100_40g | a100_80g | h100_80g | h200 | l40s | ...: memory and peak below
    gpu_memory_gb: Optional[float] = knob(None, ge=0.001, le=16384)  # memory per GPU in GiB; None: that of gpu_type
    # dense bf16 TFLOP/s of one device (per GPU, or per CPU process), for MFU and time estimates;
    # None: the datasheet figure of gpu_type, or (no GPU type) measured at the model's GEMM shapes at the
    # start of the run (~1 s)
    peak_tflops: Optional[float] = knob(None, ge=0.001, le=1e6)
    assumed_mfu: float = knob(
        0.4, ge=0.001, le=1
    )  # model FLOPs utilisation for time estimates, until the run has measured its own
    # USR2 this long before the time limit: every rank finishes its step, a checkpoint is saved
    # collectively and the job requeues into the same run dir (Slurm may send it up to ~30 s earlier)
    signal_delay_s: int = knob(120, ge=0, le=24 * 3600)
    max_requeues: int = knob(
        3, ge=0, le=10_000
    )  # times the job may requeue itself (time-outs and preemptions both count)
    # a collective that waits longer than this (a rank died or hangs) fails the job instead of hanging it
    collective_timeout_s: int = knob(600, ge=10, le=7 * 24 * 3600)


@dataclass
class LocalClusterConfig(ClusterConfig):
    name: str = "local"


@dataclass
class SlurmClusterConfig(ClusterConfig):
    name: str = "slurm"
    partition: Optional[str] = None  # sbatch --partition; None: the cluster's default
    account: Optional[str] = None  # sbatch --account
    qos: Optional[str] = None  # sbatch --qos
    cpus_per_task: int = knob(4, ge=1, le=100_000)  # sbatch --cpus-per-task (data workers + the trainer)
    mem_gb: Optional[int] = knob(None, ge=1, le=2**20)  # memory per node in GB; None: the partition's default
    constraint: Optional[str] = None  # sbatch --constraint, e.g. "a100|h100"
    job_name: str = "tuneforge"  # sbatch --job-name
    extra_sbatch: List[str] = knob(factory=list)  # extra lines "--key=value", each one #SBATCH line
    setup: List[str] = knob(factory=list)  # shell lines run before the task (module load, venv)
    # before submitting, ask the scheduler what the partition offers (nodes, CPUs, memory, GPUs, time limit)
    # and check that the run dir's disk has room for a checkpoint, refusing a job that could never run
    # there; false: skip both (a profile written for another cluster, looked at from here)
    check_site: bool = True


CLUSTERS: Dict[str, type] = {"local": LocalClusterConfig, "slurm": SlurmClusterConfig}


# ---------------------------------------------------------------------------------------- data
FORMATS = ("text", "alpaca", "chat", "completion")
TEXT_SAMPLE_BY = ("paragraph", "line", "document")


@dataclass
class SourceConfig:
    """One source of a weighted mixture (`data.sources`, docs/data.md "Mixtures"): where its rows are,
    how they read, and its weight. A field left unset (None) takes the value of the same field of `data`."""

    name: str = MISSING  # labels its metrics (tokens_seen/<name>, eval_loss/<name>); without path or hub_id,
    # the bundled dataset of that name (demo_corpus, general_corpus, ...)
    weight: float = knob(1.0, gt=0, le=1e6)  # its share of the target tokens: weight / the sum of the weights
    path: Optional[str] = None  # local file or folder, as data.path
    hub_id: Optional[str] = None  # a Hugging Face dataset id (or a dataset folder), as data.hub_id
    hub_config: Optional[str] = None
    hub_split: Optional[str] = None  # None: data.hub_split
    hub_revision: Optional[str] = None
    format: Optional[str] = knob(None, choices=FORMATS)  # None: data.format
    text_field: Optional[str] = None  # None: data.text_field; likewise the other field names
    instruction_field: Optional[str] = None
    input_field: Optional[str] = None
    output_field: Optional[str] = None
    prompt_field: Optional[str] = None
    completion_field: Optional[str] = None
    messages_field: Optional[str] = None
    text_sample_by: Optional[str] = knob(None, choices=TEXT_SAMPLE_BY)
    validation_path: Optional[str] = None  # its validation file or folder, or a bundled name (general_validation)
    validation_fraction: Optional[float] = knob(None, ge=0, lt=1)  # None: data.validation_fraction


#: fields of a source that default to the same field of `data`
SOURCE_INHERITS = (
    "hub_split",
    "format",
    "text_field",
    "instruction_field",
    "input_field",
    "output_field",
    "prompt_field",
    "completion_field",
    "messages_field",
    "text_sample_by",
    "validation_fraction",
)


@dataclass
class DataConfig:
    """What the model reads, how it is rendered into tokens, and how tokens become rows (docs/data.md)."""

    name: str = "demo_corpus"  # a label for the dataset, shown in logs; names the bundled file when no path/hub_id
    path: Optional[str] = None  # local file or folder (.jsonl .json .parquet .csv .txt); None: bundled file `name`
    hub_id: Optional[str] = None  # a Hugging Face dataset id (or a dataset folder), read with datasets.load_dataset
    hub_config: Optional[str] = None  # the dataset's configuration (subset) name
    hub_split: str = "train"  # the split to train on
    hub_revision: Optional[str] = None  # a branch, tag or commit of the dataset repository
    format: str = knob(
        "text", choices=FORMATS
    )  # "text" | "alpaca" (instruction, input, output) | "chat" (messages) | "completion"
    text_field: str = "text"  # format=text: the field holding the document (rows of JSONL, CSV, Parquet)
    instruction_field: str = "instruction"  # format=alpaca
    input_field: str = "input"  # format=alpaca: optional context appended to the instruction
    output_field: str = "output"  # format=alpaca: the response
    prompt_field: str = "prompt"  # format=completion
    completion_field: str = "completion"  # format=completion: the response
    messages_field: str = "messages"  # format=chat: a list of {role: system|user|assistant, content}
    # .txt files: one document per "paragraph" (blank line) | "line" | "document"
    text_sample_by: str = knob("paragraph", choices=TEXT_SAMPLE_BY)
    chat_template: Optional[str] = None  # Jinja chat template; None: the tokenizer's, else the default in docs/data.md
    train_on_prompt: bool = False  # False: only response tokens count in the loss (alpaca, chat, completion)
    packing: bool = True  # pack examples into full rows (attention stays within each one); False: one per row, padded
    streaming: bool = False  # read while training (corpora larger than memory or disk cache); no token cache
    stream_window: int = knob(
        1000, ge=1, le=10**8
    )  # streaming: examples read, packed and shuffled together (and re-read on resume)
    validation_path: Optional[str] = None  # validation file or folder, same format as the training data
    validation_fraction: float = knob(
        0.0, ge=0, lt=1
    )  # without validation_path: carve this fraction of examples off for validation
    # tokenised data, keyed by data, tokenizer, format and seq_len; $TUNEFORGE_DATA_CACHE sets the default
    cache_dir: str = "${oc.env:TUNEFORGE_DATA_CACHE,'~/.cache/tuneforge/data'}"
    prepare_workers: int = knob(
        0, ge=0, le=4096
    )  # processes tokenising while the cache is built (same rows for any count); 0: one per CPU of the rank
    precheck: bool = True  # scan local files for bad rows before submitting; false when only compute nodes see them
    precheck_max_mb: int = knob(
        256, ge=0, le=2**24
    )  # scan at most this much before submitting; the job checks the rest at its start
    # A weighted mixture: two or more sources, each read, checked, tokenised and packed as a dataset of its own;
    # the training rows follow their weights by target tokens. Empty: the one source named by the fields above.
    #   data.sources='[{name:cricket,path:/data/cricket.txt,weight:0.8},{name:general_corpus,weight:0.2}]'
    sources: List[SourceConfig] = knob(factory=list)


def source_views(data: DataConfig) -> List[DataConfig]:
    """Each source of `data` as a data config of its own (its fields, the unset ones taken from `data`):
    what the single-source code reads. No sources: `data` itself."""
    if not data.sources:
        return [data]
    views = []
    for s in data.sources:
        inherited = {k: getattr(data, k) if getattr(s, k) is None else getattr(s, k) for k in SOURCE_INHERITS}
        views.append(
            replace(
                data,
                sources=[],
                name=s.name,
                path=s.path,
                hub_id=s.hub_id,
                hub_config=s.hub_config,
                hub_revision=s.hub_revision,
                validation_path=s.validation_path,
                **inherited,
            )
        )
    return views


def source_weights(data: DataConfig) -> List[float]:
    return [s.weight for s in data.sources] or [1.0]


# ---------------------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    """Where metrics go besides <run dir>/metrics.jsonl (always written by rank 0)."""

    name: str = knob("none", choices=("wandb", "none"))
    # "auto" (online when a key and route exist, else offline) | "online" | "offline" | "disabled"
    mode: str = knob("auto", choices=("auto", "online", "offline", "disabled"))
    project: str = "tuneforge"
    entity: Optional[str] = None
    group: Optional[str] = None  # W&B group; sweeps set one per sweep
    tags: List[str] = knob(factory=list)


# ---------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    """The optimisation itself. global_batch = micro_batch x world size x grad accumulation."""

    max_steps: int = knob(100, ge=1, le=10**10)  # optimizer steps
    micro_batch: int = knob(4, ge=1, le=2**20)  # sequences per rank per forward pass
    global_batch: int = knob(8, ge=1, le=2**30)  # sequences per optimizer step, over all ranks
    seq_len: int = knob(64, ge=2, le=2**24)  # tokens per sequence
    lr: float = knob(1e-3, gt=0, le=1)  # peak learning rate
    min_lr_ratio: float = knob(0.1, ge=0, le=1)  # the schedule ends at lr * min_lr_ratio
    warmup_steps: Optional[int] = knob(None, ge=0, le=10**10)  # linear warmup from 0; None: a tenth of max_steps
    schedule: str = knob("cosine", choices=("cosine", "linear", "constant"))  # after warmup
    weight_decay: float = knob(0.0, ge=0, le=1)
    beta1: float = knob(0.9, ge=0, lt=1)
    beta2: float = knob(0.95, ge=0, lt=1)
    grad_clip: float = knob(1.0, ge=0, le=1e6)  # max global grad norm; 0 disables clipping
    seed: int = knob(0, ge=0, le=2**32 - 1)
    dtype: str = knob("fp32", choices=("fp32", "bf16", "fp16"))  # parameter/compute dtype
    # torch.compile (inductor) the transformer blocks and the loss (trainers/compile.py). Faster steps
    # (1.1-1.4x on CPU at seq 512) for a one-off compile: 30-70 s cold, ~5-10 s once cached in
    # $TORCHINDUCTOR_CACHE_DIR (default ~/.cache/tuneforge/inductor). Off by default: tiny runs and
    # tests would only pay the compile.
    compile: bool = False
    checkpoint_every: int = knob(50, ge=0, le=10**10)  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = knob(2, ge=1, le=10**6)  # newest checkpoints kept on disk
    log_every: int = knob(1, ge=1, le=10**10)  # steps between metric records
    eval_every: int = knob(
        50, ge=0, le=10**10
    )  # steps between validation losses (and at the end), when there is validation data; 0: never
    eval_batches: int = knob(
        4, ge=1, le=10**6
    )  # global batches of validation data per evaluation (fewer when there is less data)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward instead of
    # keeping them (less memory, ~1/3 more compute); works with every backend
    # the validation loss (and the eval prompts' answers) at step 0 too, before any training: the "before"
    # of every run (a resumed run does not repeat it); takes effect when there is validation data or prompts
    eval_on_start: bool = True


def warmup_steps(train: TrainConfig) -> int:
    """The warm-up in steps: as set, else a tenth of max_steps (so that no max_steps is ever too short for it)."""
    return train.max_steps // 10 if train.warmup_steps is None else train.warmup_steps


# ---------------------------------------------------------------------------------------- eval, probe
@dataclass
class EvalConfig:
    """What the model answers, before and after: greedy answers to a few prompts at step 0 (with
    train.eval_on_start), at every evaluation and at the end, in <run dir>/samples.jsonl and a W&B Table;
    the run ends with the before/after table (`tuneforge compare <run dir>`)."""

    # JSONL of {"prompt": ..., "reference": ... (optional), "system": ... (optional)}: a path, or the name
    # of a bundled file (demo_prompts). A prompt is rendered as the training data is: a user turn with the
    # chat template (format=chat), the Alpaca prompt (alpaca), as it is (completion, text).
    # None: the first `num_prompts` held-out rows of instruction or chat data (none for text data).
    prompts: Optional[str] = None
    num_prompts: int = knob(3, ge=0, le=10**4)  # prompts used (the first of the file, or of the held-out rows); 0: none
    max_new_tokens: int = knob(48, ge=1, le=2**16)  # tokens generated per answer (greedy; ends earlier at EOS)


@dataclass
class ProbeConfig:
    """`tuneforge probe`: which base model is closest to your data (bits per byte), before any training."""

    examples: int = knob(256, ge=1, le=10**8)  # rows of the data scored per candidate (a seeded sample of train.seed)
    # the general-text reference: a bundled name or a path (text, one document per paragraph); the gap
    # between a model's bits per byte on your data and on it says how far your domain is from its training
    general: str = "general_validation"
    # a gap (bits per byte on your data minus on general text) above this recommends continued pretraining
    # on your domain before finetuning; below it, finetuning (PEFT) directly. A rule of thumb, not a law.
    large_gap: float = knob(0.3, gt=0, le=100)


# ---------------------------------------------------------------------------------------- debug, run
@dataclass
class DebugConfig:
    """Knobs for tests and debugging, not for training runs."""

    stop_after: Optional[int] = knob(None, ge=1, le=10**10)  # stop (as if preempted) after this step
    # pause after every step: a run that lasts long enough to be preempted or to outlive its time
    # limit, whatever the machine's speed (tests of requeue and of `tuneforge status`); losses unchanged
    step_sleep_s: float = knob(0.0, ge=0, le=3600)


@dataclass
class RunConfig:
    name: str = "default"  # run name: the run dir is runs/<name>/<timestamp> unless run.dir is set
    dir: Optional[str] = None  # the run directory; fixed at submission, reused by restarts and requeues
    root: str = "runs"  # parent of run directories
    # size cap of one safetensors file of final/ and `tuneforge export` (save_pretrained's max_shard_size:
    # "5GB", "500MB", ...); a larger model is written as several files plus model.safetensors.index.json
    max_shard_size: str = knob("5GB", size=True)
    # submit.json records the git commit, a diff stat and the diff's hash; true: also the diff itself (code
    # files only, credentials masked)
    record_diff: bool = False


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    run: RunConfig = field(default_factory=RunConfig)


#: group -> {option schema name: dataclass}. YAMLs say ``defaults: [<schema name>]``.
SCHEMAS: Dict[str, Dict[str, Any]] = {
    "model": {"base_model": ModelConfig},
    "method": methods.schema_names(),
    "backend": backends.schema_names(),
    "cluster": {f"base_{name}": schema for name, schema in CLUSTERS.items()},
    "data": {"base_data": DataConfig},
    "logger": {"base_logger": LoggerConfig},
}
#: group -> the schema of each `name` a group's node may carry (methods, backends and clusters differ by it)
BY_NAME: Dict[str, Dict[str, type]] = {
    "method": {name: m.schema for name, m in methods.METHODS.items()},
    "backend": {name: b.schema for name, b in backends.BACKENDS.items()},
    "cluster": CLUSTERS,
}


def register() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=group, name=name, node=node)


def from_container(values: Dict[str, Any]) -> Config:
    """A typed `Config` from plain values (a saved config.yaml): each group checked against the schema
    its `name` selects. Unknown keys and wrong types raise omegaconf's errors, naming the key."""
    from omegaconf import OmegaConf

    groups = {}
    for group, schema in ((f.name, f.type) for f in Config.__dataclass_fields__.values()):
        node = dict(values.get(group) or {})
        cls = BY_NAME[group].get(node.get("name")) if group in BY_NAME else None
        if cls is None:
            cls = {
                "model": ModelConfig,
                "data": DataConfig,
                "logger": LoggerConfig,
                "train": TrainConfig,
                "eval": EvalConfig,
                "probe": ProbeConfig,
                "debug": DebugConfig,
                "run": RunConfig,
            }.get(group)
        if cls is None:
            raise ValueError(f"{group}.name: '{node.get('name')}' is not one of {', '.join(BY_NAME[group])}")
        groups[group] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), node))
    unknown = sorted(set(values) - set(groups))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown section; sections are {', '.join(groups)}")
    return Config(**groups)


def to_container(cfg: Config) -> Dict[str, Any]:
    """Plain values of a config (for config.yaml, W&B and the checkpoint's record)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load(path) -> Config:
    """A run's saved config.yaml as a typed `Config` (`tuneforge export`, `tuneforge status`, reruns)."""
    from omegaconf import OmegaConf

    return from_container(OmegaConf.to_container(OmegaConf.load(path)))
