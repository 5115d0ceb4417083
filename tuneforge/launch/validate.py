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
            yield Problem("model.name_or_path", "model=hf needs a hub id or a local directory: model.name_or_path=<id or path>")
        else:
            yield from _model_path("model.name_or_path", m.name_or_path)
    if m.kind == "tiny" and method.name != "pretrain":
        yield Problem("method", f"method={method.name} needs trained weights, and model=tiny is built at random; "
                                "use method=pretrain, or model=hf model.name_or_path=<a trained model>")
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
    d = cfg.data
    yield from _choice("data.format", d.format, ("text",))
    path = bundled_data.resolve(d.path, d.name)
    if path is None:
        yield Problem("data.path", f"no data: data.name={d.name} is not a bundled dataset; set data.path=<file or directory>")
    elif not path.exists():
        yield Problem("data.path", f"'{d.path}' does not exist")


# ------------------------------------------------------------------------------------- cluster
SAFE_SBATCH_VALUE = re.compile(r"^[A-Za-z0-9_.,:@%+=/|&\[\]-]+$")


@rule
def _cluster(cfg: DictConfig) -> Iterator[Problem]:
    c = cfg.cluster
    yield from _choice("cluster.name", c.name, ("local", "slurm"))
    yield from _positive("cluster.nodes", c.nodes)
    yield from _positive("cluster.tasks_per_node", c.tasks_per_node)
    yield from _positive("cluster.gpus_per_node", c.gpus_per_node, 0)
    yield from _positive("cluster.timeout_min", c.timeout_min)
    if c.gpus_per_node and c.tasks_per_node != c.gpus_per_node:
        yield Problem("cluster.tasks_per_node", f"one task per GPU: set cluster.tasks_per_node={c.gpus_per_node} "
                                                f"to match cluster.gpus_per_node={c.gpus_per_node}")
    if c.peak_tflops is not None and c.peak_tflops <= 0:
        yield Problem("cluster.peak_tflops", f"must be > 0 (dense bf16 TFLOP/s of one device), got {c.peak_tflops}; "
                                             "or leave it unset (null) to measure it at the start of the run")
    if c.name == "local" and c.nodes > 1:
        yield Problem("cluster.nodes", f"cluster=local runs on this machine only; set cluster.nodes=1 or use cluster=slurm")
    if c.name == "slurm":
        yield from _slurm(c)


def _slurm(c) -> Iterator[Problem]:
    # These values are written into the sbatch script: anything a shell would interpret is refused.
    for key in ("partition", "account", "qos", "constraint", "job_name"):
        value = c[key]
        if value is not None and not SAFE_SBATCH_VALUE.match(str(value)):
            yield Problem(f"cluster.{key}", f"{value!r} contains characters not allowed in an sbatch value "
                                            "(spaces, quotes, $, ;, newlines, ...)")
    for i, line in enumerate(c.extra_sbatch):
        m = re.match(r"^--([a-z][a-z0-9-]*)(?:=(.+))?$", line)
        if not m or (m.group(2) and not SAFE_SBATCH_VALUE.match(m.group(2))):
            yield Problem(f"cluster.extra_sbatch[{i}]", f"{line!r} is not of the form --key=value with a plain value")
    for i, line in enumerate(c.setup):
        if "\n" in line or "\r" in line:
            yield Problem(f"cluster.setup[{i}]", "one shell line per entry: split it at the newline")
    yield from _positive("cluster.cpus_per_task", c.cpus_per_task)
    yield from _positive("cluster.max_requeues", c.max_requeues, 0)
    if c.mem_gb is not None:
        yield from _positive("cluster.mem_gb", c.mem_gb)
    if c.signal_delay_s < 0 or c.signal_delay_s >= c.timeout_min * 60:
        yield Problem("cluster.signal_delay_s", f"must be in [0, timeout_min x 60 = {c.timeout_min * 60}), got {c.signal_delay_s}")


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
