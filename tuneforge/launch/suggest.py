"""The preflight's suggestions: for a job that does not fit in GPU memory, the fewest and mildest changes
that would (backend, method, dtype, activation checkpointing, more GPUs, a smaller micro batch), each
with its estimate, and shown only when the changed config passes validation."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from tuneforge.conf import backends, methods
from tuneforge.conf.schema import Config
from tuneforge.launch.estimate import (
    Job,
    Memory,
    MethodSpec,
    ModelShape,
    flops_per_step,
    memory,
    method_spec,
    step_seconds,
)

#: validation of a config given as overrides: its problems, none when it passes
Validator = Callable[[Sequence[str]], List[str]]

NODE_SIZE = 8  # GPUs per node suggested when a job asks for fewer
#: a suggested change must leave this share of the GPU free, so that a few % of estimation error
#: does not turn the fix into an out-of-memory
SUGGESTION_HEADROOM = 0.05
MAX_SUGGESTIONS = 7
PER_CATEGORY = 3  # suggestions shown per kind: same GPUs / more GPUs / another method
#: methods a full finetune that does not fit may switch to (a LoRA run may switch to QLoRA)
SMALLER_METHODS = ("lora", "qlora")


@dataclass
class Suggestion:
    overrides: Dict[str, object]
    memory: Memory
    gpus: int
    gpu_hours: Optional[float]

    def arguments(self) -> List[str]:
        """The change as command-line overrides."""
        return [f"{k}={_override_value(v)}" for k, v in self.overrides.items()]

    def text(self) -> str:
        return " ".join(self.arguments())


def suggest(
    cfg: Config,
    shape: ModelShape,
    method: MethodSpec,
    job: Job,
    gpu_memory: float,
    peak: Optional[float],
    mfu: float,
    validator: Validator,
    options: Optional[Dict[str, List[str]]] = None,
) -> List[Suggestion]:
    """Minimal sets of changes that fit with SUGGESTION_HEADROOM to spare, cheapest first: same method
    and GPUs before more GPUs before another method; fewer changes first; then GPU-hours. A set is dropped
    when a subset of it, with equal or milder values, already fits, and when validation refuses it."""
    from tuneforge.launch.compose import group_option

    options = options or {"backend": list(backends.BACKENDS), "method": list(methods.METHODS)}
    current = cfg.backend.name
    layouts = {
        name: backends.backend(option).layout(option)
        for name in options["backend"]
        if name != current
        for option in [group_option("backend", name)]
    }
    layouts[current] = job.layout
    backend_names = sorted(layouts, key=lambda name: layouts[name].sharding)
    method_names = [method.name] + [
        m for m in SMALLER_METHODS if m in options["method"] and m != method.name and (not method.peft or m == "qlora")
    ]
    dtypes = [job.dtype] + (["bf16"] if job.dtype == "fp32" else [])
    ckpts = [job.activation_checkpointing] + ([True] if not job.activation_checkpointing else [])
    c, t = cfg.cluster, cfg.train
    gpu_layouts = [(c.nodes, c.tasks_per_node)]
    if c.name == "slurm":
        per_node = sorted({c.tasks_per_node, max(c.tasks_per_node, NODE_SIZE)})
        gpu_layouts = [(c.nodes * 2**k, g) for g in per_node for k in range(6)]
    found = []
    for backend_name, dtype, ckpt, method_name, (nodes, per_node) in itertools.product(
        backend_names, dtypes, ckpts, method_names, gpu_layouts
    ):
        layout = layouts[backend_name]
        if layout.kind == "ddp" and (nodes, per_node) != gpu_layouts[0]:
            continue  # a DDP replica is no smaller on more GPUs
        spec = method if method_name == method.name else method_spec(methods.method(method_name).schema(), shape)
        world = nodes * per_node
        changes: Dict[str, object] = {}
        if backend_name != current:
            changes["backend"] = backend_name
        if method_name != method.name:
            changes["method"] = method_name
        if dtype != job.dtype:
            changes["train.dtype"] = dtype
        if ckpt != job.activation_checkpointing:
            changes["train.activation_checkpointing"] = ckpt
        if nodes != c.nodes:
            changes["cluster.nodes"] = nodes
        if per_node != c.tasks_per_node:
            changes.update({"cluster.gpus_per_node": per_node, "cluster.tasks_per_node": per_node})
        for micro, global_batch in _batch_shapes(t.micro_batch, t.global_batch, world):
            candidate = job.with_(
                layout=layout, dtype=dtype, activation_checkpointing=ckpt, world_size=world, micro_batch=micro
            )
            mem = memory(shape, spec, candidate)
            if mem.total <= gpu_memory * (1 - SUGGESTION_HEADROOM):
                extra = {} if micro == t.micro_batch else {"train.micro_batch": micro}
                if global_batch != t.global_batch:
                    extra["train.global_batch"] = global_batch
                flops = flops_per_step(shape, spec, job.seq_len, ckpt, global_batch)
                step = step_seconds(flops, world, peak, mfu)
                hours = step * t.max_steps * world / 3600 if step else None
                found.append(Suggestion({**changes, **extra}, mem, world, hours))
                break
    minimal = [s for s in found if not any(_dominates(o, s, layouts) for o in found if o is not s)]
    minimal.sort(
        key=lambda s: (
            _category(s, c),
            layouts[str(s.overrides.get("backend", current))].offload,
            len(_dimensions(s)),
            s.gpus,
            _nodes(s, c),
            s.gpu_hours or 0.0,
        )
    )
    picked: List[Suggestion] = []
    for s in minimal:  # a few of each kind, so that a cheaper kind never hides the others (e.g. QLoRA behind more GPUs)
        if sum(_category(o, c) == _category(s, c) for o in picked) >= PER_CATEGORY:
            continue
        if not validator(s.arguments()):  # shown only when the composed result passes validation
            picked.append(s)
        if len(picked) == MAX_SUGGESTIONS:
            break
    return picked


def _category(s: Suggestion, cluster) -> int:
    """0: same method on the same GPUs; 1: same method on more GPUs; 2: another method."""
    if "method" in s.overrides:
        return 2
    return int(s.gpus > cluster.nodes * cluster.tasks_per_node)


def _nodes(s: Suggestion, cluster) -> int:
    return int(s.overrides.get("cluster.nodes", cluster.nodes))


def _batch_shapes(micro: int, global_batch: int, world: int) -> List[Tuple[int, int]]:
    """(micro batch, global batch) to try, largest micro batch first, keeping the global batch when
    some micro batch divides it on `world` ranks, else the smallest global batch that works."""
    keep = [(m, global_batch) for m in range(micro, 0, -1) if global_batch % (m * world) == 0]
    return keep or [(m, math.ceil(global_batch / (m * world)) * m * world) for m in range(micro, 0, -1)]


def _dimensions(s: Suggestion) -> set:
    """What a suggestion changes, one entry per decision (a GPU layout is one decision)."""
    dims = {k for k in s.overrides if k != "train.global_batch"}
    if "cluster.gpus_per_node" in dims:
        dims -= {"cluster.tasks_per_node"}
    return dims


def _dominates(a: Suggestion, b: Suggestion, layouts: Dict[str, backends.Layout]) -> bool:
    """`b` is redundant: `a` changes less, or the same on as many GPUs spread over fewer nodes."""
    layout = ("cluster.nodes", "cluster.gpus_per_node", "cluster.tasks_per_node", "train.global_batch")
    same_but_layout = {k: v for k, v in a.overrides.items() if k not in layout} == {
        k: v for k, v in b.overrides.items() if k not in layout
    }
    fewer_nodes = a.overrides.get("cluster.nodes", 0) < b.overrides.get("cluster.nodes", 0)
    return _milder(a, b, layouts) or (same_but_layout and a.gpus <= b.gpus and fewer_nodes)


def _milder(a: Suggestion, b: Suggestion, layouts: Dict[str, backends.Layout]) -> bool:
    """Whether `a` changes a subset of what `b` changes, each by as much or less (so `b` is redundant)."""
    da, db = _dimensions(a), _dimensions(b)
    if not da <= db or a.overrides == b.overrides:
        return False
    for key in da:
        va, vb = a.overrides[key], b.overrides[key]
        if key in ("cluster.nodes", "cluster.gpus_per_node"):
            ok = va <= vb
        elif key == "train.micro_batch":
            ok = va >= vb
        elif key == "backend":
            ok = layouts[va].sharding <= layouts[vb].sharding
        else:
            ok = va == vb
        if not ok:
            return False
    return True


def _override_value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)
