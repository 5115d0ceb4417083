"""Validation: every problem of a composed config, found before anything is submitted.

First every field against the range or choices its schema declares (conf/fields.py), then the rules
below, each reading only the sub-configs it needs and yielding `Problem(key, message)`. `validate`
returns all of them, so a user fixes a config in one round trip. Types and unknown keys are already
checked by the schemas while composing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

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
from tuneforge.launch import families, secrets
from tuneforge.slurm import executors


@dataclass(frozen=True)
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


Rule = Callable[[Config], Iterator[Problem]]
NO_WEIGHTS = "holds no weights"  # the problem of a model folder with a config.json only (launch/matrix.py skips it)
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
            found = list(_model_path("model.name_or_path", m.name_or_path, not methods.method(method.name).builds))
            yield from found
            config = None if found else families.local_config(m)  # found nothing wrong: it reads
            name, positions = _positions(config) if config else (None, None)
            if positions is not None and cfg.train.seq_len > positions:
                yield Problem(
                    "train.seq_len",
                    f"{cfg.train.seq_len} exceeds the model's {name}={positions} "
                    f"({Path(m.name_or_path).expanduser() / 'config.json'}): it knows {positions} positions; "
                    "lower train.seq_len",
                )
    if m.kind == "tiny" and not methods.method(method.name).builds:
        yield Problem(
            "method",
            f"method={method.name} needs trained weights, and model=tiny is built at random; "
            "use method=pretrain, or model=hf model.name_or_path=<a trained model>",
        )
    if m.tokenizer:
        yield from _model_path("model.tokenizer", m.tokenizer, False)


#: what a tokenizer folder holds (one of these): transformers' fast, SentencePiece and BPE files
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
#: what holds a model's weights for from_pretrained
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
#: sizes in a config.json (and in its text_config): positive integers, or transformers builds nonsense
CONFIG_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "head_dim",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
)


def _model_path(key: str, value: str, needs_weights: bool) -> Iterator[Problem]:
    """A local path must be a directory that holds what the job will load (config.json that parses, with
    integer sizes, and weights; or tokenizer files); anything else is taken as a hub id ("org/name")."""
    path = Path(value).expanduser()
    looks_local = value.startswith(("/", ".", "~")) or path.exists() or value.count("/") != 1
    if not looks_local:
        return
    if not path.exists():
        yield Problem(key, f"'{value}' does not exist; give an existing directory or a hub id like org/name")
        return
    kind = records.special_file(path)
    what = "a directory written by save_pretrained" if key == "model.name_or_path" else "the tokenizer's folder"
    if kind or path.is_file():
        yield Problem(key, f"'{value}' is {kind or 'a file'}; give {what}")
        return
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as e:
        yield Problem(key, f"'{value}' cannot be listed ({e.strerror or e})")
        return
    if not names:
        yield Problem(key, f"'{value}' is an empty folder; give {what}")
        return
    if key == "model.tokenizer":
        if not names & set(TOKENIZER_FILES):
            yield Problem(key, f"'{value}' holds no tokenizer ({', '.join(TOKENIZER_FILES)})")
        for name in sorted(names & {"tokenizer.json", "tokenizer_config.json"}):
            problem = read_json_file(path / name)[1]
            if problem:
                yield Problem(key, problem)
        return
    if "config.json" not in names:
        yield Problem(key, f"'{value}' has no config.json; point at a directory written by save_pretrained")
        return
    config, problem = read_json_file(path / "config.json")
    if problem:
        yield Problem(key, problem)
        return
    for where, node in (("", config), ("text_config.", config.get("text_config"))):
        for name in CONFIG_SIZES if isinstance(node, dict) else ():
            size = node.get(name)
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                yield Problem(
                    key,
                    f"{path / 'config.json'}: '{where}{name}' is {size!r} ({type(size).__name__}); "
                    "sizes must be positive integers",
                )
    if needs_weights and not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        yield Problem(key, f"'{value}' {NO_WEIGHTS} (model.safetensors or pytorch_model.bin); the method loads them")
    elif needs_weights:  # a file of a sharded checkpoint missing or cut short: found here, not after the queue
        from tuneforge import safetensors_files

        for problem in safetensors_files.problems(path):
            yield Problem(key, problem)


def read_json_file(file: Path):
    """(the JSON object in `file`, None) or (None, one line naming the file and the line, column or byte
    of the problem). A special file is refused before it is opened; so is a byte-order mark, which
    transformers' reader does not accept."""
    kind = records.special_file(file)
    if kind:
        return None, f"{file}: is {kind}, not a regular file"
    try:
        data = file.read_bytes()
    except OSError as e:
        return None, f"{file}: cannot be read ({e.strerror or e})"
    if data.startswith(records.BOM):
        return None, f"{file}: starts with a UTF-8 byte-order mark, which transformers cannot read; remove it"
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"{file}: not UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start})"
    except json.JSONDecodeError as e:
        return None, f"{file}:{e.lineno}: not JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, f"{file}: JSON nested too deeply to read"
    if not isinstance(value, dict):
        return None, f"{file}: must hold a JSON object, got {type(value).__name__}"
    return value, None


def _positions(config: dict) -> Tuple[Optional[str], Optional[int]]:
    """(the config key, the longest sequence the model was built for), or (None, None)."""
    for node in (config, config.get("text_config") or {}):
        for name in ("max_position_embeddings", "n_positions"):
            if isinstance(node, dict) and isinstance(node.get(name), int) and not isinstance(node.get(name), bool):
                return name, node[name]
    return None, None


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
    if d.validation_path and d.validation_fraction:
        yield Problem(
            "data.validation_fraction",
            "ignored when data.validation_path is given; set only one of them",
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
    try:
        files = records.data_files(path)
    except records.DataError as e:  # a FIFO or another special file: refused before anything opens it
        yield Problem(key, str(e))
        return
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
    yield from _devices(cfg)


def local_gpus() -> int:
    """GPUs this machine shows (NVIDIA device nodes, or AMD's render nodes behind /dev/kfd), limited
    by CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES; no torch import (the submit path stays light)."""
    dev = Path("/dev")
    count = len([p for p in dev.glob("nvidia*") if p.name[6:].isdigit()])
    if not count and (dev / "kfd").exists():
        count = len(list((dev / "dri").glob("renderD*")))
    for name in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        visible = os.environ.get(name)
        if visible is not None:
            entries = [x for x in visible.split(",") if x.strip()]
            count = 0 if not entries or entries[0].strip() == "-1" else min(count, len(entries))
    return count


def _devices(cfg: Config) -> Iterator[Problem]:
    """Requests that contradict the devices: GPUs this machine lacks, GPU settings for a CPU job,
    flash attention where it cannot run."""
    c, m, t = cfg.cluster, cfg.model, cfg.train
    if c.name == "local" and c.gpus_per_node:
        have = local_gpus()
        if c.gpus_per_node > have:
            yield Problem(
                "cluster.gpus_per_node",
                f"{c.gpus_per_node} GPU(s) asked for, and this machine (cluster=local runs here) has "
                f"{have or 'none'}; set cluster.gpus_per_node={have} (0: train on the CPU)",
            )
    if not c.gpus_per_node:
        for key in ("gpu_memory_gb", "gpu_type"):
            if getattr(c, key) is not None:
                yield Problem(
                    f"cluster.{key}",
                    "describes a GPU, but the job asks for none (cluster.gpus_per_node=0); set "
                    f"cluster.gpus_per_node, or cluster.{key}=null",
                )
    if m.attn_implementation.startswith("flash"):
        if not c.gpus_per_node:
            yield Problem(
                "model.attn_implementation",
                f"{m.attn_implementation} runs on GPUs only and the job asks for none (cluster.gpus_per_node=0); "
                "use model.attn_implementation=sdpa",
            )
        elif importlib.util.find_spec("flash_attn") is None:
            yield Problem(
                "model.attn_implementation",
                f"{m.attn_implementation} needs the flash-attn package: pip install flash-attn, or use sdpa",
            )
        if t.dtype == "fp32":
            yield Problem(
                "train.dtype",
                f"model.attn_implementation={m.attn_implementation} computes in bf16 or fp16 only; set train.dtype=bf16",
            )


def _slurm(c: SlurmClusterConfig) -> Iterator[Problem]:
    """What is written into the sbatch script (slurm/executors.py says how): plain sbatch values,
    plain option names, one shell line per setup entry; the whole value is checked (fullmatch)."""
    for key in ("partition", "account", "qos", "constraint", "job_name"):
        value = getattr(c, key)
        if value is None:
            continue
        bad = executors.unsafe_character(value)
        if bad or not executors.SBATCH_VALUE.fullmatch(str(value)):
            yield Problem(
                f"cluster.{key}",
                (f"holds {bad}; " if bad else "")
                + "use letters, digits and _ . , : @ % + = / | & [ ] - only (no spaces, quotes, $, ;, line breaks)",
            )
    for i, line in enumerate(c.extra_sbatch):
        key = f"cluster.extra_sbatch[{i}]"
        bad = executors.unsafe_character(line)
        option, sep, value = line[2:].partition("=") if line.startswith("--") else ("", "", "")
        if (
            bad
            or not executors.SBATCH_OPTION.fullmatch(option)
            or (sep and not executors.SBATCH_VALUE.fullmatch(value))
        ):
            yield Problem(
                key,
                (f"holds {bad}; " if bad else "")
                + "give one sbatch option as --key=value (or a bare --flag) with a plain value: letters, digits "
                "and _ . , : @ % + = / | & [ ] -",
            )
            continue
        owner = executors.reserved_option(option)
        if owner:
            yield Problem(key, f"--{option} is set by tuneforge from {owner}; set that instead of an extra line")
    for i, line in enumerate(c.setup):
        bad = executors.unsafe_character(line)
        if bad:
            yield Problem(f"cluster.setup[{i}]", f"holds {bad}: give one shell line per entry")
        elif line.lstrip().upper().startswith("#SBATCH"):
            yield Problem(
                f"cluster.setup[{i}]",
                "an #SBATCH line among the setup lines would be read as a directive; use cluster.extra_sbatch",
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
    if not known.loss_scaling and t.dtype == "fp16":
        yield Problem(
            "train.dtype",
            f"fp16 needs loss scaling, which backend={b.name} does not do (its gradients would underflow); use "
            "train.dtype=bf16, or a DeepSpeed backend (backend=zero2) for fp16",
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
    widths: dict = {}  # input width -> the quantised weights that read it (the family's own layout)
    for _, w in shape.all_weights():
        if w.quantizable and w.fan_in % BNB_CPU_BLOCK:
            widths.setdefault(w.fan_in, []).append(w.name)
    if widths:
        key = "model.name_or_path" if model.kind == "hf" else "model"  # QLoRA needs trained weights: hf
        sizes = ", ".join(
            f"hidden_size {width}" if width == shape.hidden else f"{'/'.join(names)} input width {width}"
            for width, names in widths.items()
        )
        yield Problem(
            key,
            f"method={m.name} on CPU (cluster.gpus_per_node=0) needs the linear layers' input widths "
            f"to be multiples of {BNB_CPU_BLOCK} (bitsandbytes' CPU kernel); this model has {sizes}",
        )


# ------------------------------------------------------------------------------------- model families
# Every causal-LM family (#20): what tuneforge/arch and peft cannot train is refused here, naming its key;
# the checks themselves live in launch/families.py (no torch unless a config's family is unfamiliar).
@rule
def _family(cfg: Config) -> Iterator[Problem]:
    yield from (Problem(key, message) for key, message in families.problems(cfg))


# ------------------------------------------------------------------------------------- secrets
@rule
def _secrets(cfg: Config) -> Iterator[Problem]:
    """No string of the config (setup and extra #SBATCH lines, paths, ids) carries a credential: they are
    written into the sbatch script and the run's records. The message masks the value."""
    for key, message in secrets.in_config(cfg):
        yield Problem(key, message)


# ------------------------------------------------------------------------------------- run
@rule
def _run(cfg: Config) -> Iterator[Problem]:
    """run.name, run.root and run.dir make the run dir, which is written (quoted) into the sbatch script
    and into submitit's log paths, where % starts a pattern (%j: the job id) for submitit and sbatch
    alike and a backslash turns sbatch's patterns off."""
    if not re.fullmatch(r"[A-Za-z0-9_.=,+-]+", cfg.run.name):
        yield Problem("run.name", "use letters, digits and _ . = , + - only (it names a directory)")
    for key in ("root", "dir"):
        value = getattr(cfg.run, key)
        if value is None:
            continue
        bad = executors.unsafe_character(value)
        if bad:
            yield Problem(f"run.{key}", f"holds {bad}; a run dir path must be one plain line")
        elif "%" in value:
            yield Problem(
                f"run.{key}", "holds '%', which submitit and sbatch read in log paths as a pattern (%j: the job id)"
            )
        elif cfg.cluster.name == "slurm" and "\\" in value:
            yield Problem(f"run.{key}", "holds a backslash, which turns sbatch's log path patterns (%j) off")
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
