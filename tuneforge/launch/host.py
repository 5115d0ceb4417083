"""The preflight's host-memory check: ranks per node x each rank's host peak against `cluster.mem_gb`.

Each rank's host peak is launch/estimate.py `host_memory`: the process itself, then the larger of what
loading holds (the whole model on every rank, or its share plus one block when the run loads sharded:
conf/methods.py `loads_sharded`) and what training keeps in host memory (offloaded states; everything
on a CPU run). A node holds `cluster.tasks_per_node` of them. A Slurm profile declaring `cluster.mem_gb`
(the `--mem` the job is submitted with) is checked against it; without it nothing is checked (the
partition's default memory is not known here). A misfit is refused like a GPU misfit (unless --force),
with the changes that make it fit: more memory per node, fewer ranks per node on more nodes, a backend
that loads sharded. Pure arithmetic: no torch.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

from tuneforge import units
from tuneforge.conf import backends, methods
from tuneforge.conf.schema import Config
from tuneforge.launch.estimate import GIB, HostMemory, Job, Memory, MethodSpec, ModelShape, host_memory, memory

#: a suggested cluster.mem_gb leaves this share of it free (estimation error, the page cache, the OS)
MEM_HEADROOM = 0.05
#: the sharded backends a whole-model load may switch to
SHARDED_BACKENDS = ("fsdp", "zero3")


def host_of(
    cfg: Config, shape: ModelShape, method: MethodSpec, job: Job, device_memory: Memory, on_gpu: bool
) -> Tuple[HostMemory, Optional[float]]:
    """(host memory of the job, the node's memory in bytes or None) for a composed config."""
    host = _host(cfg.backend, cfg, shape, method, job, device_memory, on_gpu)
    mem_gb = getattr(cfg.cluster, "mem_gb", None)
    return host, (mem_gb * GIB if mem_gb else None)


def _host(backend_cfg, cfg: Config, shape, method, job, device_memory, on_gpu, ranks: Optional[int] = None):
    load_dtype = backends.model_dtype(backend_cfg, cfg.train.dtype, method.peft)
    sharded = methods.loads_sharded(cfg.method.name, backend_cfg)
    ranks = ranks or cfg.cluster.tasks_per_node
    return host_memory(shape, method, job, device_memory, ranks, load_dtype, sharded, on_gpu)


def host_fixes(
    cfg: Config, shape: ModelShape, method: MethodSpec, job: Job, host: HostMemory, limit: float, on_gpu: bool
) -> List[str]:
    """Overrides that make the node's memory hold the job, each as `key=value ...`."""
    c = cfg.cluster
    fixes = []
    need = math.ceil(host.per_node * (1 + MEM_HEADROOM) / GIB)
    if need <= 2**20:  # cluster.mem_gb's upper bound
        fixes.append(f"cluster.mem_gb={need}")
    for k in range(c.tasks_per_node - 1, 0, -1):  # the same world size on more nodes
        if c.tasks_per_node % k == 0 and host.per_rank * k <= limit:
            nodes = c.nodes * c.tasks_per_node // k
            gpus = f" cluster.gpus_per_node={k}" if c.gpus_per_node == c.tasks_per_node else ""
            fixes.append(f"cluster.nodes={nodes} cluster.tasks_per_node={k}{gpus}")
            break
    if not host.sharded_load:
        from tuneforge.launch.compose import group_option

        for name in SHARDED_BACKENDS:
            if name == cfg.backend.name:
                continue
            option = group_option("backend", name)
            other = job.with_(layout=backends.backend(option).layout(option))
            there = _host(option, cfg, shape, method, other, memory(shape, method, other, on_gpu), on_gpu)
            if there.sharded_load and there.per_node <= limit:
                fixes.append(f"backend={name}")
    return fixes


def describe(host: HostMemory, limit: Optional[float], mem_gb: Optional[int]) -> str:
    """One line of the preflight table: the node's host memory and its verdict."""
    load = "its share + one block (sharded load)" if host.sharded_load else "the whole model"
    text = (
        f"host memory per node: {units.gib(host.per_node)} GiB = {host.ranks_per_node} rank(s) x "
        f"({units.gib(host.runtime)} process + max(load {units.gib(host.load)}: {load}, "
        f"train {units.gib(host.train)}))"
    )
    if limit is None:
        return text + "; not checked (set cluster.mem_gb to check it)"
    verdict = "fits" if host.per_node <= limit else "DOES NOT FIT"
    return f"{text}; cluster.mem_gb={mem_gb}: {verdict}"


def refusal(host: HostMemory, mem_gb: Optional[int], fixes: List[str]) -> str:
    """The one line said when the node's memory cannot hold the job."""
    fix = "; ".join(fixes) if fixes else "none found (fewer ranks per node, a smaller model or method)"
    return (
        f"tuneforge: the job does not fit in host memory: cluster.mem_gb={mem_gb} GB per node, "
        f"{units.gib(host.per_node)} GiB estimated ({host.ranks_per_node} rank(s) x {units.gib(host.per_rank)} GiB); "
        f"nothing submitted. Changes that fit: {fix}; or pass --force to submit anyway."
    )


def to_dict(host: Optional[HostMemory]) -> Optional[dict]:
    if host is None:
        return None
    return {
        "load": int(host.load),
        "train": int(host.train),
        "runtime": int(host.runtime),
        "per_rank": int(host.per_rank),
        "per_node": int(host.per_node),
        "ranks_per_node": host.ranks_per_node,
        "sharded_load": host.sharded_load,
    }
