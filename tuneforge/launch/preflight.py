"""Preflight: before anything is queued, will the job fit in GPU memory, and what will it cost?

`check(cfg)` maps the composed config onto launch/estimate.py's plain inputs (a model shape, what the
method trains, a backend kind, the world size, micro batch, sequence length, dtype, activation
checkpointing) and returns a `Report`: memory per GPU against `cluster.gpu_memory_gb` (or the memory
of `cluster.gpu_type`), FLOPs and time per step from the GPU's peak and an MFU (the run's own measured
median once its metrics.jsonl has one, else `cluster.assumed_mfu`), GPU-hours, the Slurm time limit,
and, for a job that does not fit, the cheapest changes that would make it fit, each with its estimate.

The CLI prints `render(report)` for --dry-run and before submitting, refuses a job that does not fit
(exit 2) unless --force, and saves `report.to_dict()` as <run dir>/preflight.json (the task adds it to
the W&B config). Pure arithmetic and file reads: no torch.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tuneforge import units
from tuneforge.conf import backends
from tuneforge.conf.gpus import GPU_TYPES
from tuneforge.conf.schema import ClusterConfig, Config, ModelConfig
from tuneforge.launch import families, host
from tuneforge.launch.estimate import (
    GIB,
    HostMemory,
    Job,
    Memory,
    MethodSpec,
    ModelShape,
    flops_per_step,
    memory,
    method_spec,
    step_seconds,
)
from tuneforge.launch.site import disk_problems, partition_problems
from tuneforge.launch.suggest import Suggestion, Validator, suggest

ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")


# ---------------------------------------------------------------------------------- config -> inputs
#: config.json's names of the sizes an estimate needs (model.architecture.<name>)
CONFIG_JSON_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
#: a preset whose sizes, read by its family's spelling (tuneforge/arch), miss its declared params_b by
#: more than this has a wrong size: no estimate rather than a wrong one
PARAMS_TOLERANCE = 0.10


def model_shape(model_cfg: ModelConfig) -> Tuple[Optional[ModelShape], str]:
    """(shape, where it was read) or (None, why no estimate is possible). A hub model's sizes come from
    a local directory's config.json, else `model.architecture` (the presets), else the hub's config.json."""
    path = model_cfg.name_or_path
    if model_cfg.kind == "hf" and path:
        config_json = Path(path).expanduser() / "config.json"
        if config_json.is_file():
            return families.checkpoint_shape(config_json, model_cfg.trust_remote_code)
        if model_cfg.architecture:
            return _shape_from_architecture(model_cfg)
        if not _declares_architecture(model_cfg):
            return _shape_from_hub(path)
    shape = ModelShape(
        vocab=model_cfg.vocab_size,
        hidden=model_cfg.hidden_size,
        layers=model_cfg.num_layers,
        heads=model_cfg.num_heads,
        kv_heads=model_cfg.num_kv_heads,
        intermediate=model_cfg.intermediate_size,
        tie_embeddings=model_cfg.tie_word_embeddings,
    )
    return shape, "sizes from the model config"


def _declares_architecture(model_cfg: ModelConfig) -> bool:
    """Presets declare params_b and their sizes; a bare model=hf keeps the schema's tiny defaults."""
    default = ModelConfig()
    return model_cfg.params_b is not None or any(
        getattr(model_cfg, key) != getattr(default, key) for key in ARCHITECTURE_FIELDS
    )


def _shape_from_architecture(model_cfg: ModelConfig) -> Tuple[Optional[ModelShape], str]:
    config = json.dumps({"model_type": model_cfg.model_type, **model_cfg.architecture}, sort_keys=True)
    where = "sizes of the preset (model.architecture)"
    shape, read = families.config_shape(config, where, model_cfg.trust_remote_code)
    if shape is None:
        return None, f"model.architecture of {model_cfg.name_or_path}: {read}"
    declared = model_cfg.params_b
    if declared and abs(shape.params() / 1e9 - declared) > PARAMS_TOLERANCE * declared:
        return None, (
            f"model.architecture of {model_cfg.name_or_path}: read as model_type {model_cfg.model_type} its sizes "
            f"give {units.count(shape.params())} parameters, not the declared model.params_b={declared:g}B; "
            "correct the preset's sizes or params_b"
        )
    return shape, read


def _shape_from_hub(repo_id: str) -> Tuple[Optional[ModelShape], str]:
    from tuneforge.launch.hubconfig import fetch_config

    config_json, where = fetch_config(repo_id)  # NotOnHub: _estimate refuses the job
    if config_json is None:
        keys = ", ".join(f"model.architecture.{k}" for k in CONFIG_JSON_SIZES)
        return None, (
            f"model.name_or_path={repo_id} is not a local directory and its config.json could not be read "
            f"({where}); give its sizes under config.json's names: {keys} (and head_dim, tie_word_embeddings "
            "where it has them), or use a local copy"
        )
    shape, read = families.checkpoint_shape(config_json)  # the one reading of a checkpoint's sizes
    return (shape, where) if shape is not None else (None, f"{where}: {read}")


def job_of(cfg: Config) -> Job:
    return Job(
        layout=backends.backend(cfg.backend).layout(cfg.backend),
        world_size=cfg.cluster.nodes * cfg.cluster.tasks_per_node,
        micro_batch=cfg.train.micro_batch,
        seq_len=cfg.train.seq_len,
        dtype=cfg.train.dtype,
        activation_checkpointing=cfg.train.activation_checkpointing,
        attention=families.estimated_attention(cfg.model),
    )


def gpu_of(cluster_cfg: ClusterConfig) -> Tuple[Optional[float], Optional[float], str]:
    """(memory bytes per GPU, peak TFLOP/s, label) from the cluster profile; None where unknown."""
    known = GPU_TYPES.get(cluster_cfg.gpu_type or "", (None, None))
    mem_gb = cluster_cfg.gpu_memory_gb or known[0]
    peak = cluster_cfg.peak_tflops or known[1]
    if not cluster_cfg.gpus_per_node:
        return None, cluster_cfg.peak_tflops, "CPU"
    return (mem_gb * GIB if mem_gb else None), peak, cluster_cfg.gpu_type or "GPU"


def measured_mfu(run_dir: Optional[str]) -> Tuple[Optional[float], int]:
    """(median `mfu` in <run dir>/metrics.jsonl, last step logged) of an existing run; (None, 0) if none."""
    path = Path(run_dir) / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return None, 0
    values, last = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            last = max(last, int(record.get("step", 0)))
        except (ValueError, TypeError, AttributeError):
            continue  # a line torn by a killed job
        if isinstance(record.get("mfu"), (int, float)) and record["mfu"] > 0:
            values.append(float(record["mfu"]))
    return (statistics.median(values) if values else None), last


# ---------------------------------------------------------------------------------- the report
@dataclass
class Report:
    available: bool
    reason: str = ""  # where the model shape came from, or why there is no estimate
    shape: Optional[ModelShape] = None
    method: Optional[MethodSpec] = None
    job: Optional[Job] = None
    memory: Optional[Memory] = None
    gpu_label: str = "CPU"
    gpu_memory: Optional[float] = None  # bytes; None: nothing to check against
    peak_tflops: Optional[float] = None
    mfu: Optional[float] = None
    mfu_source: str = ""
    flops_per_step: Optional[float] = None
    step_time_s: Optional[float] = None
    steps_left: int = 0
    gpu_hours: Optional[float] = None
    warnings: List[str] = field(default_factory=list)
    suggestions: List[Suggestion] = field(default_factory=list)
    host: Optional[HostMemory] = None  # host memory per rank and node
    host_limit: Optional[float] = None  # bytes per node (cluster.mem_gb); None: nothing to check against
    host_fixes: List[str] = field(default_factory=list)  # overrides that make the node's memory suffice
    #: "key: why" for what can never run as asked (the partition cannot hold the job, the run dir cannot
    #: take a checkpoint): refused whatever --force says
    problems: List[str] = field(default_factory=list)

    def refused(self, force: bool = False) -> bool:
        return bool(self.problems) or (self.misfit and not force)

    @property
    def misfit(self) -> bool:
        """Estimated not to fit in GPU memory or in the node's host memory (refused unless --force)."""
        return self.fits is False or self.host_fits is False

    @property
    def host_fits(self) -> Optional[bool]:
        """True/False against cluster.mem_gb per node; None without an estimate or a declared memory."""
        if self.host is None or self.host_limit is None:
            return None
        return self.host.per_node <= self.host_limit

    @property
    def fits(self) -> Optional[bool]:
        """True/False against the GPU's memory; None when there is no estimate or nothing to check against."""
        if self.memory is None or self.gpu_memory is None:
            return None
        return self.memory.total <= self.gpu_memory

    @property
    def mem_gb(self) -> Optional[int]:
        return None if self.host_limit is None else round(self.host_limit / GIB)

    @property
    def total_time_s(self) -> Optional[float]:
        return None if self.step_time_s is None else self.step_time_s * self.steps_left

    def to_dict(self) -> dict:
        m = self.memory
        out = {"available": self.available, "source": self.reason, "fits": self.fits, "host_fits": self.host_fits}
        if self.problems:
            out["problems"] = self.problems
        if not self.available:
            return {**out, "warnings": self.warnings} if self.warnings else out
        out.update(
            {
                "params": self.shape.params(),
                "trainable_params": self.method.trainable,
                "method": self.method.name,
                "backend": self.job.layout.kind,
                "world_size": self.job.world_size,
                "gpu": self.gpu_label,
                "gpu_memory_gib": _round(self.gpu_memory / GIB if self.gpu_memory else None),
                "total_gib": _round(m.total / GIB),
                "memory_bytes": {
                    k: int(getattr(m, k))
                    for k in (
                        "params",
                        "grads",
                        "optim",
                        "activations",
                        "buffers",
                        "step_transient",
                        "overhead",
                        "cpu",
                        "total",
                    )
                },
                "host_bytes": host.to_dict(self.host),
                "host_limit_gib": _round(self.host_limit / GIB if self.host_limit else None),
                "host_fixes": self.host_fixes,
                "peak_tflops": self.peak_tflops,
                "mfu": _round(self.mfu),
                "mfu_source": self.mfu_source,
                "flops_per_step": self.flops_per_step,
                "step_time_s": _round(self.step_time_s),
                "steps_left": self.steps_left,
                "total_time_h": _round(self.total_time_s and self.total_time_s / 3600),
                "gpu_hours": _round(self.gpu_hours),
                "warnings": self.warnings,
                "suggestions": [
                    {
                        "overrides": s.text(),
                        "total_gib": _round(s.memory.total / GIB),
                        "gpus": s.gpus,
                        "gpu_hours": _round(s.gpu_hours),
                    }
                    for s in self.suggestions
                ],
            }
        )
        return out


def check(cfg: Config, validator: Optional[Validator] = None, options: Optional[Dict[str, List[str]]] = None) -> Report:
    """The preflight report of a composed, validated config (with run.dir fixed).

    `validator`: every suggested change is composed with the user's overrides and validated through it
    before it is shown (launch/compose.py `validator`); without one, no change is suggested. `options`:
    the backend and method options that suggestions may use (default: every registered one).
    Then what the site says: the Slurm partition's limits (`partition_problems`) and the run dir's disk
    (`disk_problems`)."""
    report = _estimate(cfg, validator, options)
    if not getattr(cfg.cluster, "check_site", True):  # a Slurm profile of another cluster
        report.warnings.append("partition and disk checks off (cluster.check_site=false)")
        return report
    for problems, warnings in (
        partition_problems(cfg.cluster),
        disk_problems(cfg.run.dir, checkpoint_bytes(report)),
    ):
        report.problems += problems
        report.warnings += warnings
    return report


def _estimate(cfg: Config, validator: Optional[Validator], options: Optional[Dict[str, List[str]]]) -> Report:
    from tuneforge.launch.hubconfig import NotOnHub

    try:
        shape, source = model_shape(cfg.model)
    except NotOnHub as e:
        return Report(False, "the model is not on the hub", problems=[str(e)])
    if shape is None:
        return Report(False, source)
    try:
        method = method_spec(cfg.method, shape)
    except ValueError as e:
        return Report(False, f"method: {e}")
    job = job_of(cfg)
    gpu_memory, peak, label = gpu_of(cfg.cluster)
    mfu, last_step = measured_mfu(cfg.run.dir)
    report = Report(
        True,
        source,
        shape,
        method,
        job,
        memory(shape, method, job, on_gpu=label != "CPU"),
        label,
        gpu_memory,
        peak,
        mfu or cfg.cluster.assumed_mfu,
        "measured median in metrics.jsonl" if mfu else "cluster.assumed_mfu",
    )
    report.steps_left = max(0, cfg.train.max_steps - last_step)
    report.flops_per_step = flops_per_step(
        shape, method, job.seq_len, job.activation_checkpointing, cfg.train.global_batch
    )
    report.step_time_s = step_seconds(report.flops_per_step, job.world_size, peak, report.mfu)
    if report.step_time_s is not None:
        report.gpu_hours = report.total_time_s / 3600 * job.world_size
    report.host, report.host_limit = host.host_of(cfg, shape, method, job, report.memory, label != "CPU")
    if report.host_fits is False:
        report.host_fixes = host.host_fixes(cfg, shape, method, job, report.host, report.host_limit, label != "CPU")
    report.warnings = _warnings(report, cfg)
    if report.fits is False and validator is not None:
        report.suggestions = suggest(cfg, shape, method, job, gpu_memory, peak, report.mfu, validator, options)
    return report


def _warnings(report: Report, cfg) -> List[str]:
    out = [note for note in [families.attention(cfg.model)[1]] if note]  # "auto" on a model without SDPA
    c = cfg.cluster
    if c.gpus_per_node and report.gpu_memory is None:
        out.append(
            "GPU memory unknown: set cluster.gpu_type (one of "
            + ", ".join(GPU_TYPES)
            + ") or cluster.gpu_memory_gb; memory not checked"
        )
    total = report.total_time_s
    if c.name == "slurm" and total:
        usable = c.timeout_min * 60 - c.signal_delay_s
        allocations = math.ceil(total / usable)
        if allocations > 1:
            line = (
                f"estimated {units.duration(total)} exceeds cluster.timeout_min={c.timeout_min}: "
                f"{allocations - 1} requeue(s) needed"
            )
            if allocations - 1 > c.max_requeues:
                line += (
                    f", more than cluster.max_requeues={c.max_requeues}: raise cluster.timeout_min to "
                    f"{math.ceil((total / (c.max_requeues + 1) + c.signal_delay_s) / 60)} or "
                    f"cluster.max_requeues to {allocations - 1}"
                )
            out.append(line)
    return out


# ---------------------------------------------------------------------------------- the checkpoint
def checkpoint_bytes(report: Report) -> Optional[float]:
    """About what one checkpoint of the job takes on disk: the model and its optimizer state over all
    ranks (what engine.save writes); None without an estimate."""
    m, job = report.memory, report.job
    if m is None or job is None:
        return None
    w, layout = job.world_size, job.layout
    return m.params * (w if layout.shard_params else 1) + m.optim * (w if layout.shard_optim else 1) + m.cpu * w


# ---------------------------------------------------------------------------------- output
COLUMNS = ("params", "grads", "optim", "activ", "buffers", "runtime", "peak")


def _row(m: Memory, unit: float) -> str:
    values = (m.params, m.grads, m.optim, m.activations, m.buffers, m.overhead, m.total)
    return " ".join(f"{v / unit:7.1f}" for v in values)


def render(report: Report) -> str:
    """The short table printed by --dry-run and before submission."""
    if not report.available:
        lines = [f"# preflight: no estimate ({report.reason})"] + [f"  warning: {w}" for w in report.warnings]
        return "\n".join(lines + [f"  refused: {p}" for p in report.problems])
    s, m, j = report.shape, report.method, report.job
    ckpt = "activation checkpointing" if j.activation_checkpointing else "no activation checkpointing"
    unit, unit_name = (GIB, "GiB") if report.memory.total >= GIB else (2**20, "MiB")
    lines = [
        f"# preflight: {units.count(s.params())} params{_active(s)} ({report.reason}), {m.name}: "
        f"{units.count(m.trainable)} "
        f"trainable; {j.layout.kind} x {j.world_size} {report.gpu_label}; micro_batch {j.micro_batch} x seq_len "
        f"{j.seq_len}, {j.dtype}, {ckpt}",
        f"  {unit_name} per rank {' '.join(f'{c:>7}' for c in COLUMNS)}   limit",
        f"  estimate     {_row(report.memory, unit)}   {_limit(report)}",
        "  (peak: activations and gradients are never all alive at once; runtime: CUDA context, fragmentation)",
    ]
    if report.memory.cpu:
        lines.append(f"  CPU memory per rank (offloaded): {units.gib(report.memory.cpu)} GiB")
    if report.host is not None:
        lines.append("  " + host.describe(report.host, report.host_limit, report.mem_gb))
    if report.flops_per_step:
        time = "time: set cluster.gpu_type or cluster.peak_tflops to estimate it"
        if report.step_time_s is not None:
            time = (
                f"{report.step_time_s:.2f} s/step at MFU {report.mfu:.2f} ({report.mfu_source}) of "
                f"{report.peak_tflops:g} TFLOP/s; {report.steps_left} steps: {units.duration(report.total_time_s)}, "
                f"{report.gpu_hours:.2f} GPU-hours"
            )
        lines.append(f"  {report.flops_per_step:.3g} FLOP/step; {time}")
    lines += [f"  warning: {w}" for w in report.warnings]
    lines += [f"  refused: {p}" for p in report.problems]
    if report.fits is False:
        lines.append(
            "  changes that fit, cheapest first:"
            if report.suggestions
            else "  no change tried fits (backend, dtype, activation checkpointing, micro batch, GPUs, method)"
        )
        for sug in report.suggestions:
            cost = f"{sug.gpus} GPU" + (f", {sug.gpu_hours:.2f} GPU-h" if sug.gpu_hours is not None else "")
            cost += f", {units.gib(sug.memory.cpu)} GiB CPU per rank" if sug.memory.cpu else ""
            lines.append(f"  {'':12} {_row(sug.memory, unit)}   {cost}: {sug.text()}")
    return "\n".join(lines)


def refusal(report: Report) -> str:
    if report.problems:
        return (
            f"tuneforge: {len(report.problems)} problem(s) with the model, the cluster or the disk, nothing submitted:\n"
            + "\n".join(f"  {p}" for p in report.problems)
        )
    lines = [host.refusal(report.host, report.mem_gb, report.host_fixes)] if report.host_fits is False else []
    if report.fits is not False:  # the GPUs would hold it: the node's host memory does not
        return lines[0]
    return "\n".join(lines + [_gpu_refusal(report)])


def _gpu_refusal(report: Report) -> str:
    return (
        f"tuneforge: the job does not fit: {units.gib(report.memory.total)} GiB per GPU estimated, "
        f"{units.gib(report.gpu_memory)} GiB on {report.gpu_label}; nothing submitted. Apply a change listed "
        "above, or pass --force to submit anyway."
    )


def save(report: Report, run_dir: Path) -> Path:
    path = Path(run_dir) / "preflight.json"
    path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return path


def _active(shape: ModelShape) -> str:
    """A mixture of experts: the parameters a token passes through, which FLOPs count."""
    if not shape.is_moe:
        return ""
    return f" ({units.count(shape.active_params())} active: {shape.experts_per_token} of {shape.experts} experts)"


def _limit(report: Report) -> str:
    if report.gpu_memory is None:
        return "none (CPU run: report only)" if report.gpu_label == "CPU" else "unknown"
    verdict = "fits" if report.fits else "DOES NOT FIT"
    return f"{units.gib(report.gpu_memory)} ({report.gpu_label}): {verdict}"


def _round(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(float(v), 4)
