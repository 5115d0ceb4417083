"""Validation: every problem of a composed config, found before anything is submitted.

First every field against the range or choices its schema declares (conf/fields.py), then the rules
below, each reading only the sub-configs it needs and yielding `Problem(key, message)`. `validate`
returns all of them, so a user fixes a config in one round trip. Types and unknown keys are already
checked by the schemas while composing.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from tuneforge import data as bundled_data
from tuneforge.conf import backends, ds_config, methods
from tuneforge.conf.backends import BackendConfig, DeepSpeedConfig
from tuneforge.conf.fields import field_problems
from tuneforge.conf.gpus import GPU_TYPES
from tuneforge.conf.methods import MethodConfig
from tuneforge.conf.schema import (
    ClusterConfig,
    Config,
    DataConfig,
    ModelConfig,
    SlurmClusterConfig,
    TrainConfig,
)
from tuneforge.data import prompts as eval_prompts
from tuneforge.data import records


@dataclass(frozen=True)
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


Rule = Callable[[Config], Iterator[Problem]]
RULES: List[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def validate(cfg: Config) -> List[Problem]:
    """Every problem of `cfg`: fields first, then the rules in order; empty when the config can run."""
    problems = [Problem(key, message) for key, message in field_problems(cfg)]
    for check in RULES:
        try:
            problems += list(check(cfg))
        except (ArithmeticError, ValueError, KeyError, TypeError):
            if not problems:
                raise
            # a rule tripped over a value already reported as out of range: that report is the answer
    return problems


def world_size(cluster: ClusterConfig) -> int:
    return cluster.nodes * cluster.tasks_per_node


# ------------------------------------------------------------------------------------- train
@rule
def _train(cfg: Config) -> Iterator[Problem]:
    t, world = cfg.train, world_size(cfg.cluster)
    if t.warmup_steps is not None and t.warmup_steps >= t.max_steps:
        yield Problem(
            "train.warmup_steps",
            f"must be below train.max_steps={t.max_steps}, got {t.warmup_steps} "
            "(leave it unset for a tenth of max_steps)",
        )
    per_step = t.micro_batch * world
    if t.global_batch % per_step:
        lower = max(per_step, t.global_batch // per_step * per_step)
        yield Problem(
            "train.global_batch",
            f"{t.global_batch} is not divisible by micro_batch x world size ({t.micro_batch} x {world} = {per_step}); "
            f"set train.global_batch={lower} or {lower + per_step}, or change train.micro_batch",
        )
    if cfg.debug.stop_after is not None and cfg.debug.stop_after > t.max_steps:
        yield Problem("debug.stop_after", f"must be at most train.max_steps={t.max_steps}, got {cfg.debug.stop_after}")


# ------------------------------------------------------------------------------------- model
@rule
def _model(cfg: Config) -> Iterator[Problem]:
    m, method = cfg.model, cfg.method
    if m.kind == "tiny" or (methods.method(method.name).builds and not m.name_or_path):
        if m.hidden_size % m.num_heads:
            yield Problem("model.hidden_size", f"{m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
        if m.num_heads % m.num_kv_heads:
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
    if m.kind == "tiny" and not methods.method(method.name).builds:
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
def _data(cfg: Config) -> Iterator[Problem]:
    """Settings, then the files themselves: every bad row named by file, row and field, and too few
    examples for one global batch, before anything is submitted (data/records.py; no torch)."""
    d = cfg.data
    if d.sources:  # a mixture: each source is checked by launch/data_rules.py
        return
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
        path = bundled_data.resolve_path(d.validation_path)
        if not path.exists():
            yield Problem("data.validation_path", f"'{d.validation_path}' does not exist")
        else:
            val = ("data.validation_path", path)
    for key, path in (x for x in (train, val) if x):
        yield from _data_files(key, path, d, cfg.train)


def _data_files(key: str, path: Path, d: DataConfig, t: TrainConfig) -> Iterator[Problem]:
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
def _cluster(cfg: Config) -> Iterator[Problem]:
    c = cfg.cluster
    if c.signal_delay_s >= c.timeout_min * 60:
        yield Problem(
            "cluster.signal_delay_s",
            f"must be below cluster.timeout_min x 60 = {c.timeout_min * 60}, got {c.signal_delay_s}",
        )
    if c.gpus_per_node and c.tasks_per_node != c.gpus_per_node:
        yield Problem(
            "cluster.tasks_per_node",
            f"one task per GPU: set cluster.tasks_per_node={c.gpus_per_node} "
            f"to match cluster.gpus_per_node={c.gpus_per_node}",
        )
    if c.gpu_type is not None and c.gpu_type not in GPU_TYPES:
        yield Problem(
            "cluster.gpu_type",
            f"unknown GPU type '{c.gpu_type}'; known: {', '.join(GPU_TYPES)}; or set "
            "cluster.gpu_memory_gb and cluster.peak_tflops instead",
        )
    if c.name == "local" and c.nodes > 1:
        yield Problem(
            "cluster.nodes", "cluster=local runs on this machine only; set cluster.nodes=1 or use cluster=slurm"
        )
    if isinstance(c, SlurmClusterConfig):
        yield from _slurm(c)


def _slurm(c: SlurmClusterConfig) -> Iterator[Problem]:
    # These values are written into the sbatch script: anything a shell would interpret is refused.
    for key in ("partition", "account", "qos", "constraint", "job_name"):
        value = getattr(c, key)
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


# ------------------------------------------------------------------------------------- backend
@rule
def _backend(cfg: Config) -> Iterator[Problem]:
    b, t = cfg.backend, cfg.train
    known = backends.BACKENDS.get(b.name)
    if known is None or not isinstance(b, known.schema):
        options = [n for n, spec in backends.BACKENDS.items() if isinstance(b, spec.schema)]
        yield Problem("backend.name", f"'{b.name}' is not a backend of this schema; one of {', '.join(options)}")
        return
    if known.family == "fsdp" and t.dtype == "fp16":
        yield Problem(
            "train.dtype",
            "fp16 needs loss scaling, which backend=fsdp does not do; use train.dtype=bf16, "
            "or a DeepSpeed backend (backend=zero2) for fp16",
        )
    if isinstance(b, DeepSpeedConfig):
        yield from _deepspeed(b, t, world_size(cfg.cluster))


def _deepspeed(b: DeepSpeedConfig, t: TrainConfig, world: int) -> Iterator[Problem]:
    if importlib.util.find_spec("deepspeed") is None:
        yield Problem(
            "backend", f"backend={b.name} needs DeepSpeed: pip install 'tuneforge[deepspeed]', or use backend=fsdp"
        )
    if b.offload_params and b.stage != 3:
        yield Problem(
            "backend.offload_params",
            f"parameter offload needs ZeRO stage 3 (backend.stage={b.stage}); "
            "use backend=zero3_offload, or set backend.offload_params=false",
        )
    if b.config_file:
        yield from _deepspeed_file(b, t, world)


def _deepspeed_file(b: DeepSpeedConfig, t: TrainConfig, world: int) -> Iterator[Problem]:
    """The user's DeepSpeed JSON is merged under ours: every key it sets differently is refused here."""
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
                f"'{key}' is {theirs!r} in {b.config_file} but {ours!r} from {ds_config.our_key(key)}; remove it "
                f"from the file or change {ds_config.our_key(key)}",
            )
        else:
            yield Problem(
                "backend.config_file",
                f"'{key}' is {theirs!r} in {b.config_file} but tuneforge needs {ours!r}; remove it from the file",
            )


# ------------------------------------------------------------------------------------- method
@rule
def _method(cfg: Config) -> Iterator[Problem]:
    m = cfg.method
    spec = methods.METHODS.get(m.name)
    if spec is None or not isinstance(m, spec.schema):
        yield Problem("method.name", f"'{m.name}' is not a method of this schema; one of {', '.join(methods.METHODS)}")
        return
    if cfg.backend.name in backends.BACKENDS:
        reason = methods.incompatibility(m.name, cfg.backend)
        if reason:
            yield Problem("method", f"method={m.name} cannot run on backend={cfg.backend.name}: {reason}")
    if spec.checks is not None:
        yield from (Problem(key, message) for key, message in spec.checks(m, cfg.train.max_steps))
    if spec.quantized:
        yield from _quantized(m, cfg.backend, cfg.cluster, cfg.model)
    if spec.peft:
        yield from _targets(m, cfg.model)


def _quantized(
    m: MethodConfig, backend_cfg: BackendConfig, cluster: ClusterConfig, model: ModelConfig
) -> Iterator[Problem]:
    if backends.BACKENDS.get(backend_cfg.name, backends.BACKENDS["ddp"]).family == "fsdp" and m.quant_storage != "auto":
        # FSDP needs one float dtype per unit; "auto" stores the 4-bit weights in the dtype the parameters
        # are loaded in (train.dtype, or fp32 where the backend keeps fp32 master weights).
        yield Problem(
            "method.quant_storage",
            "FSDP shards 4-bit weights only when they are stored in the parameters' "
            f"dtype: set method.quant_storage=auto, not {m.quant_storage}",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        yield Problem("method", f"method={m.name} needs bitsandbytes: pip install 'tuneforge[qlora]'")
    if cluster.gpus_per_node == 0:
        yield from _quantized_on_cpu(m, model)


#: bitsandbytes' 4-bit block size: its CPU kernel lays a weight's scales out as (out, in / block), so every
#: quantised linear needs in_features divisible by it (else the first no-grad forward, an eval, fails)
BNB_CPU_BLOCK = 64


def _quantized_on_cpu(m: MethodConfig, model: ModelConfig) -> Iterator[Problem]:
    from tuneforge.launch.preflight import model_shape

    shape, _ = model_shape(model)
    if shape is None:
        return  # no sizes known here: the job finds out
    widths = {
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_heads x head_dim": shape.heads * shape.dim,
    }
    bad = {name: width for name, width in widths.items() if width % BNB_CPU_BLOCK}
    if bad:
        key = "model.name_or_path" if model.kind == "hf" else "model"  # QLoRA needs trained weights: hf
        sizes = ", ".join(f"{name} {width}" for name, width in bad.items())
        yield Problem(
            key,
            f"method={m.name} on CPU (cluster.gpus_per_node=0) needs the linear layers' input widths "
            f"to be multiples of {BNB_CPU_BLOCK} (bitsandbytes' CPU kernel); this model has {sizes}",
        )


# Module names of architectures whose layout is known without loading them; others are checked at job
# start. Linear projections first: those are what `target_modules: null` adapts.
_LLAMA_LAYOUT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens")
KNOWN_MODULES = {t: _LLAMA_LAYOUT for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")}


def _targets(m: MethodConfig, model: ModelConfig) -> Iterator[Problem]:
    """Target names against the architecture's module names, when the architecture is known here."""
    model_type = _model_type(model)
    known = KNOWN_MODULES.get(model_type)
    if known is None:
        return  # unknown architecture or remote model: checked at job start (trainers/methods.py)
    for key in ("target_modules", "feedforward_modules"):
        for name in getattr(m, key, None) or []:
            if str(name).rsplit(".", 1)[-1] not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                yield Problem(
                    f"method.{key}",
                    f"'{name}' is not a module of a {model_type} model; {hint}its modules are {', '.join(known)}",
                )


def _model_type(model: ModelConfig) -> Optional[str]:
    if model.kind == "tiny":
        return "llama"
    if model.model_type:
        return model.model_type
    path = Path(str(model.name_or_path or "")).expanduser() / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------- run
@rule
def _run(cfg: Config) -> Iterator[Problem]:
    if not re.match(r"^[A-Za-z0-9_.=,+-]+$", cfg.run.name):
        yield Problem("run.name", f"{cfg.run.name!r}: use letters, digits and _ . = , + - only (it names a directory)")
    if cfg.run.dir and Path(cfg.run.dir).exists() and not Path(cfg.run.dir).is_dir():
        yield Problem("run.dir", f"'{cfg.run.dir}' exists and is not a directory")


# ------------------------------------------------------------------------------------- eval
@rule
def _eval(cfg: Config) -> Iterator[Problem]:
    """The eval.prompts file exists and every row has a prompt (data/prompts.py), before submission."""
    if cfg.eval.prompts:
        try:
            eval_prompts.read(cfg.eval.prompts)
        except records.DataError as e:
            yield Problem("eval.prompts", str(e))


from tuneforge.launch import data_rules  # noqa: E402,F401 - registers the rules of data.sources and model.new_tokens
