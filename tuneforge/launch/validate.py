"""Cross-field validation: every problem of a composed config, found before anything is submitted.

Each rule receives only the sub-configs it reads and yields `Problem(key, message)`; `validate`
runs all of them and returns every problem, so a user fixes a config in one round trip.
Types and unknown keys are already checked by the schemas while composing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List

from omegaconf import DictConfig

from tuneforge import data as bundled_data
from tuneforge.data import records


@dataclass(frozen=True)
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


Rule = Callable[[DictConfig], Iterator[Problem]]
RULES: List[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def validate(cfg: DictConfig) -> List[Problem]:
    """Every problem of `cfg`, in rule order; empty when the config can run."""
    return [p for check in RULES for p in check(cfg)]


def world_size(cluster) -> int:
    return cluster.nodes * cluster.tasks_per_node


def _choice(key: str, value, allowed) -> Iterator[Problem]:
    if value not in allowed:
        yield Problem(key, f"'{value}' is not one of {', '.join(map(str, allowed))}")


def _positive(key: str, value, minimum: int = 1) -> Iterator[Problem]:
    if value < minimum:
        yield Problem(key, f"must be >= {minimum}, got {value}")


# ------------------------------------------------------------------------------------- train
@rule
def _train(cfg: DictConfig) -> Iterator[Problem]:
    t, world = cfg.train, world_size(cfg.cluster)
    for key in ("max_steps", "micro_batch", "global_batch", "seq_len", "log_every"):
        yield from _positive(f"train.{key}", t[key])
    yield from _positive("train.checkpoint_every", t.checkpoint_every, 0)
    yield from _positive("train.eval_every", t.eval_every, 0)
    yield from _positive("train.eval_batches", t.eval_batches)
    yield from _positive("train.keep_checkpoints", t.keep_checkpoints)
    yield from _choice("train.dtype", t.dtype, ("fp32", "bf16", "fp16"))
    yield from _choice("train.schedule", t.schedule, ("cosine", "linear", "constant"))
    if t.lr <= 0:
        yield Problem("train.lr", f"must be > 0, got {t.lr}")
    if not 0 <= t.min_lr_ratio <= 1:
        yield Problem("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    if t.grad_clip < 0:
        yield Problem("train.grad_clip", f"must be >= 0 (0 disables clipping), got {t.grad_clip}")
    if t.warmup_steps < 0 or (t.max_steps >= 1 and t.warmup_steps >= t.max_steps):
        yield Problem("train.warmup_steps", f"must be in [0, max_steps={t.max_steps}), got {t.warmup_steps}")
    per_step = t.micro_batch * world
    if per_step >= 1 and t.global_batch % per_step:
        lower = max(per_step, t.global_batch // per_step * per_step)
        yield Problem(
            "train.global_batch",
            f"{t.global_batch} is not divisible by micro_batch x world size ({t.micro_batch} x {world} = {per_step}); "
            f"set train.global_batch={lower} or {lower + per_step}, or change train.micro_batch",
        )
    if t.stop_after is not None and not 1 <= t.stop_after <= t.max_steps:
        yield Problem("train.stop_after", f"must be in [1, max_steps={t.max_steps}], got {t.stop_after}")
    if t.step_sleep_s < 0:
        yield Problem("train.step_sleep_s", f"must be >= 0, got {t.step_sleep_s}")


# ------------------------------------------------------------------------------------- model
@rule
def _model(cfg: DictConfig) -> Iterator[Problem]:
    m, method = cfg.model, cfg.method
    yield from _choice("model.kind", m.kind, ("tiny", "hf"))
    yield from _choice("model.attn_implementation", m.attn_implementation, ("sdpa", "eager", "flash_attention_2"))
    builds = m.kind == "tiny" or (method.name == "pretrain" and not m.name_or_path)
    if builds:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            yield from _positive(f"model.{key}", m[key])
        if m.num_heads >= 1 and m.hidden_size % m.num_heads:
            yield Problem("model.hidden_size", f"{m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
        if m.num_kv_heads >= 1 and m.num_heads % m.num_kv_heads:
            yield Problem("model.num_kv_heads", f"model.num_heads={m.num_heads} is not divisible by {m.num_kv_heads}")
        if cfg.train.seq_len > m.max_position_embeddings:
            yield Problem(
                "train.seq_len",
                f"{cfg.train.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}; "
                "lower train.seq_len or raise model.max_position_embeddings",
            )
    if m.kind == "hf":
        if not m.name_or_path:
            yield Problem(
                "model.name_or_path", "model=hf needs a hub id or a local directory: model.name_or_path=<id or path>"
            )
        else:
            yield from _model_path("model.name_or_path", m.name_or_path)
    if m.kind == "tiny" and method.name != "pretrain":
        yield Problem(
            "method",
            f"method={method.name} needs trained weights, and model=tiny is built at random; "
            "use method=pretrain, or model=hf model.name_or_path=<a trained model>",
        )
    if m.tokenizer:
        yield from _model_path("model.tokenizer", m.tokenizer)


def _model_path(key: str, value: str) -> Iterator[Problem]:
    """A local path must exist and look like a model; anything else is taken as a hub id ("org/name")."""
    path = Path(value).expanduser()
    looks_local = value.startswith(("/", ".", "~")) or path.exists() or value.count("/") != 1
    if looks_local and not path.exists():
        yield Problem(key, f"'{value}' does not exist; give an existing directory or a hub id like org/name")
    elif looks_local and path.is_dir() and not (path / "config.json").is_file() and key == "model.name_or_path":
        yield Problem(key, f"'{value}' has no config.json; point at a directory written by save_pretrained")


# ------------------------------------------------------------------------------------- data
@rule
def _data(cfg: DictConfig) -> Iterator[Problem]:
    """Settings, then the files themselves: every bad row named by file, row and field, and too few
    examples for one global batch, before anything is submitted (data/records.py; no torch)."""
    d = cfg.data
    yield from _choice("data.format", d.format, records.FORMATS)
    yield from _choice("data.text_sample_by", d.text_sample_by, ("paragraph", "line", "document"))
    yield from _positive("data.stream_window", d.stream_window)
    yield from _positive("data.precheck_max_mb", d.precheck_max_mb, 0)
    if not 0 <= d.validation_fraction < 1:
        yield Problem("data.validation_fraction", f"must be in [0, 1), got {d.validation_fraction}")
    if d.streaming and d.validation_fraction:
        yield Problem(
            "data.validation_fraction",
            "cannot carve a fraction off a stream; give data.validation_path=<file or folder> instead",
        )
    if d.hub_id and d.path:
        yield Problem("data.path", "give either data.path (local files) or data.hub_id (a dataset id), not both")
    train = None
    if not d.hub_id:
        path = bundled_data.resolve(d.path, d.name)
        if path is None:
            yield Problem(
                "data.path",
                f"no data: data.name={d.name} is not a bundled dataset; "
                "set data.path=<file or folder> or data.hub_id=<dataset id>",
            )
        elif not path.exists():
            yield Problem("data.path", f"'{d.path}' does not exist")
        else:
            train = ("data.path", path)
    val = None
    if d.validation_path:
        path = Path(d.validation_path).expanduser()
        if not path.exists():
            yield Problem("data.validation_path", f"'{d.validation_path}' does not exist")
        else:
            val = ("data.validation_path", path)
    for key, path in (x for x in (train, val) if x):
        yield from _data_files(key, path, cfg)


def _data_files(key: str, path: Path, cfg: DictConfig) -> Iterator[Problem]:
    d, t = cfg.data, cfg.train
    files = records.data_files(path)
    if not files:
        yield Problem(key, f"{path}: no data files ({', '.join(records.BUILDERS)})")
        return
    unknown = sorted({f.suffix or f.name for f in files if f.suffix not in records.BUILDERS})
    if unknown:
        yield Problem(key, f"{path}: unsupported file type {', '.join(unknown)}; use {', '.join(records.BUILDERS)}")
        return
    allowed = records.NEEDS_STRUCTURED_FILES.get(d.format)
    if allowed and any(f.suffix not in allowed for f in files):
        yield Problem(key, f"format={d.format} needs {', '.join(allowed)} files (its rows hold lists)")
        return
    if d.format != "text" and any(f.suffix == ".txt" for f in files):
        yield Problem(key, f"format={d.format} reads fields of rows: .txt files hold documents only (format=text)")
        return
    if not d.precheck:
        return
    scan = records.scan(files, d, max_bytes=d.precheck_max_mb * 2**20)
    for line in records.problem_summary(scan):
        yield Problem(key, line)
    if scan.bad_rows or not scan.complete:
        return  # the job checks what was not read, at its start
    if scan.examples == 0:
        yield Problem(key, f"{path}: the dataset is empty (no rows of format={d.format})")
    elif key == "data.path" and d.format != "text":  # documents may split into several rows: counted by the job
        held = (
            max(1, round(scan.examples * d.validation_fraction))
            if d.validation_fraction and not d.validation_path
            else 0
        )
        n = scan.examples - held
        if n < t.global_batch:
            after = f" ({held} of {scan.examples} held out by data.validation_fraction)" if held else ""
            yield Problem(
                key,
                f"{path}: {n} training examples{after}, fewer than one global batch "
                f"(train.global_batch={t.global_batch}); add data or lower train.global_batch",
            )


# ------------------------------------------------------------------------------------- cluster
SAFE_SBATCH_VALUE = re.compile(r"^[A-Za-z0-9_.,:@%+=/|&\[\]-]+$")
#: a literal value given to a credential variable (WANDB_API_KEY=..., HF_TOKEN=...); "$VAR" references pass
SECRET_ASSIGNMENT = re.compile(r"\b[A-Z0-9_]*(API_KEY|TOKEN|SECRET|PASSWORD)=['\"]?[^$'\"\s]")


@rule
def _cluster(cfg: DictConfig) -> Iterator[Problem]:
    c = cfg.cluster
    yield from _choice("cluster.name", c.name, ("local", "slurm"))
    yield from _positive("cluster.nodes", c.nodes)
    yield from _positive("cluster.tasks_per_node", c.tasks_per_node)
    yield from _positive("cluster.gpus_per_node", c.gpus_per_node, 0)
    yield from _positive("cluster.timeout_min", c.timeout_min)
    yield from _positive("cluster.max_requeues", c.max_requeues, 0)
    yield from _positive("cluster.collective_timeout_s", c.collective_timeout_s, 10)
    if c.signal_delay_s < 0 or c.signal_delay_s >= c.timeout_min * 60:
        yield Problem(
            "cluster.signal_delay_s", f"must be in [0, timeout_min x 60 = {c.timeout_min * 60}), got {c.signal_delay_s}"
        )
    if c.gpus_per_node and c.tasks_per_node != c.gpus_per_node:
        yield Problem(
            "cluster.tasks_per_node",
            f"one task per GPU: set cluster.tasks_per_node={c.gpus_per_node} "
            f"to match cluster.gpus_per_node={c.gpus_per_node}",
        )
    yield from _gpu(c)
    if c.name == "local" and c.nodes > 1:
        yield Problem(
            "cluster.nodes", "cluster=local runs on this machine only; set cluster.nodes=1 or use cluster=slurm"
        )
    if c.name == "slurm":
        yield from _slurm(c)


def _gpu(c) -> Iterator[Problem]:
    """What the preflight checks against (launch/preflight.py)."""
    from tuneforge.launch.estimate import GPU_TYPES

    if c.gpu_type is not None and c.gpu_type not in GPU_TYPES:
        yield Problem(
            "cluster.gpu_type",
            f"unknown GPU type '{c.gpu_type}'; known: {', '.join(GPU_TYPES)}; or set "
            "cluster.gpu_memory_gb and cluster.peak_tflops instead",
        )
    for key in ("gpu_memory_gb", "peak_tflops"):
        if c[key] is not None and c[key] <= 0:
            yield Problem(f"cluster.{key}", f"must be > 0, got {c[key]}")
    if not 0 < c.assumed_mfu <= 1:
        yield Problem("cluster.assumed_mfu", f"must be in (0, 1], got {c.assumed_mfu}")


def _slurm(c) -> Iterator[Problem]:
    # These values are written into the sbatch script: anything a shell would interpret is refused.
    for key in ("partition", "account", "qos", "constraint", "job_name"):
        value = c[key]
        if value is not None and not SAFE_SBATCH_VALUE.match(str(value)):
            yield Problem(
                f"cluster.{key}",
                f"{value!r} contains characters not allowed in an sbatch value (spaces, quotes, $, ;, newlines, ...)",
            )
    for i, line in enumerate(c.extra_sbatch):
        m = re.match(r"^--([a-z][a-z0-9-]*)(?:=(.+))?$", line)
        if not m or (m.group(2) and not SAFE_SBATCH_VALUE.match(m.group(2))):
            yield Problem(f"cluster.extra_sbatch[{i}]", f"{line!r} is not of the form --key=value with a plain value")
    for i, line in enumerate(c.setup):
        if "\n" in line or "\r" in line:
            yield Problem(f"cluster.setup[{i}]", "one shell line per entry: split it at the newline")
        if SECRET_ASSIGNMENT.search(line):
            yield Problem(
                f"cluster.setup[{i}]",
                "would write a secret into the sbatch script; export it in your "
                "shell before submitting instead (Slurm passes your environment on)",
            )
    yield from _positive("cluster.cpus_per_task", c.cpus_per_task)
    if c.mem_gb is not None:
        yield from _positive("cluster.mem_gb", c.mem_gb)


# ------------------------------------------------------------------------------------- backend
@rule
def _backend(cfg: DictConfig) -> Iterator[Problem]:
    b, t = cfg.backend, cfg.train
    yield from _choice("backend.name", b.name, ("ddp", "fsdp", "deepspeed"))
    if b.name == "fsdp" and t.dtype == "fp16":
        yield Problem(
            "train.dtype",
            "fp16 needs loss scaling, which backend=fsdp does not do; use train.dtype=bf16, "
            "or a DeepSpeed backend (backend=zero2) for fp16",
        )
    if b.name == "deepspeed":
        yield from _deepspeed(b, t, world_size(cfg.cluster))


def _deepspeed(b, t, world: int) -> Iterator[Problem]:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        yield Problem(
            "backend", f"backend={b.name} needs DeepSpeed: pip install 'tuneforge[deepspeed]', or use backend=fsdp"
        )
    yield from _choice("backend.stage", b.stage, (1, 2, 3))
    if b.offload_params and b.stage != 3:
        yield Problem(
            "backend.offload_params",
            f"parameter offload needs ZeRO stage 3 (backend.stage={b.stage}); "
            "use backend=zero3_offload, or set backend.offload_params=false",
        )
    for key in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size"):
        if b[key] is not None:
            yield from _positive(f"backend.{key}", b[key])
    if b.param_persistence_threshold is not None:
        yield from _positive("backend.param_persistence_threshold", b.param_persistence_threshold, 0)
    if b.config_file:
        yield from _deepspeed_file(b, t, world)


def _deepspeed_file(b, t, world: int) -> Iterator[Problem]:
    """The user's DeepSpeed JSON is merged under ours: every key it sets differently is refused here."""
    from tuneforge.trainers.backends import ds_config

    path = Path(b.config_file).expanduser()
    if not path.is_file():
        yield Problem("backend.config_file", f"'{b.config_file}' does not exist")
        return
    try:
        found = list(ds_config.conflicts(b, t, world))
    except ValueError as e:  # JSONDecodeError is a ValueError
        yield Problem("backend.config_file", f"'{b.config_file}' is not a DeepSpeed JSON object: {e}")
        return
    for key, theirs, ours in found:
        if key in ds_config.FORBIDDEN_SECTIONS:
            yield Problem(
                "backend.config_file",
                f"'{key}' section in {b.config_file}: the {key} comes from {ours}; remove the section",
            )
        elif ds_config.our_key(key):
            yield Problem(
                "backend.config_file",
                f"'{key}' is {theirs!r} in {b.config_file} but {ours!r} from "
                f"{ds_config.our_key(key)}; remove it from the file or change "
                f"{ds_config.our_key(key)}",
            )
        else:
            yield Problem(
                "backend.config_file",
                f"'{key}' is {theirs!r} in {b.config_file} but tuneforge needs {ours!r}; remove it from the file",
            )


# ------------------------------------------------------------------------------------- logger, run
@rule
def _logger(cfg: DictConfig) -> Iterator[Problem]:
    yield from _choice("logger.name", cfg.logger.name, ("wandb", "none"))
    yield from _choice("logger.mode", cfg.logger.mode, ("auto", "online", "offline", "disabled"))


@rule
def _run(cfg: DictConfig) -> Iterator[Problem]:
    if not re.match(r"^[A-Za-z0-9_.=,+-]+$", cfg.run.name):
        yield Problem("run.name", f"{cfg.run.name!r}: use letters, digits and _ . = , + - only (it names a directory)")
    if cfg.run.dir and Path(cfg.run.dir).exists() and not Path(cfg.run.dir).is_dir():
        yield Problem("run.dir", f"'{cfg.run.dir}' exists and is not a directory")


# ------------------------------------------------------------------------------------- method
from tuneforge.launch import method_rules  # noqa: E402,F401  (registers the PEFT rules; they import this module)
