"""What the site says before anything is queued: the Slurm partition's limits, asked of the scheduler,
and the run directory's disk. The preflight (launch/preflight.py) adds both to its report."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tuneforge import units
from tuneforge.conf.schema import ClusterConfig
from tuneforge.launch.estimate import GIB


def partition_problems(cluster: ClusterConfig) -> Tuple[List[str], List[str]]:
    """(problems, warnings): what the Slurm partition offers (nodes, CPUs, memory and GPUs per node, time
    limit), asked of the scheduler (scontrol, sinfo), against what the job asks; a request no node or
    limit can ever satisfy would pend forever. Skipped, with a warning, where Slurm cannot be asked."""
    if cluster.name != "slurm":
        return [], []
    try:
        info = slurm_partitions()
    except SlurmUnavailable as e:
        return [], [f"partition check skipped: {e}"]
    name = cluster.partition or next((n for n, p in info.items() if p.get("Default") == "YES"), None)
    if name is None:
        return ["cluster.partition: the cluster has no default partition; set one of " + ", ".join(info)], []
    if name not in info:
        return [
            f"cluster.partition: no partition '{name}' on this cluster; partitions: {', '.join(info) or 'none'}"
        ], []
    part = info[name]
    try:
        nodes = slurm_nodes(name)
    except SlurmUnavailable as e:
        return [], [f"partition check skipped: {e}"]
    problems: List[str] = []
    warnings: List[str] = []
    if part.get("State", "UP") != "UP":
        warnings.append(f"partition {name} is {part.get('State')}: jobs wait until it is up")
    cpus = cluster.tasks_per_node * cluster.cpus_per_task
    mem_mb = cluster.mem_gb * 1024 if cluster.mem_gb else 0
    max_cpus = _slurm_limit(part.get("MaxCPUsPerNode"))
    max_mem = _slurm_limit(part.get("MaxMemPerNode"))
    fits_cpu = [n for n in nodes if n["cpus"] >= cpus and (max_cpus is None or cpus <= max_cpus)]
    fits_mem = [n for n in nodes if n["mem_mb"] >= mem_mb and (max_mem is None or mem_mb <= max_mem)]
    fits_gpu = [n for n in nodes if n["gpus"] >= cluster.gpus_per_node]
    fits_all = [n for n in fits_cpu if n in fits_mem and n in fits_gpu]
    most = max((n["cpus"] for n in nodes), default=0)
    wanted = min(cluster.nodes, len(nodes))  # (too few nodes altogether is said below)
    if len(fits_cpu) < wanted:
        per_task = min(most, max_cpus or most) // max(1, cluster.tasks_per_node)
        fix = f"set cluster.cpus_per_task={per_task}" if per_task >= 1 else "lower cluster.tasks_per_node"
        problems.append(
            f"cluster.cpus_per_task: {cluster.tasks_per_node} task(s) x {cluster.cpus_per_task} CPUs = {cpus} CPUs per "
            f"node asked, and {_count(len(fits_cpu))} of partition {name}'s {len(nodes)} node(s) have that many "
            f"(at most {min(most, max_cpus or most)}); {fix}"
        )
    if mem_mb and len(fits_mem) < wanted:
        top = max((n["mem_mb"] for n in nodes), default=0)
        top = min(top, max_mem or top)
        problems.append(
            f"cluster.mem_gb: {cluster.mem_gb} GB per node asked, partition {name}'s nodes have at most "
            f"{top // 1024} GB ({top} MB); set cluster.mem_gb={max(1, top // 1024)} or less"
        )
    if cluster.gpus_per_node and len(fits_gpu) < wanted:
        top = max((n["gpus"] for n in nodes), default=0)
        problems.append(
            f"cluster.gpus_per_node: {cluster.gpus_per_node} GPU(s) per node asked, {_count(len(fits_gpu))} of "
            f"partition {name}'s nodes have that many (at most {top}, gres {_gres(nodes)})"
        )
    max_nodes = _slurm_limit(part.get("MaxNodes"))
    if len(nodes) < cluster.nodes or (max_nodes is not None and cluster.nodes > max_nodes):
        problems.append(
            f"cluster.nodes: {cluster.nodes} node(s) asked, partition {name} has {len(nodes)}"
            + (f" and allows {max_nodes} per job" if max_nodes is not None else "")
        )
    elif not problems and len(fits_all) < cluster.nodes:
        problems.append(
            f"cluster.nodes: {cluster.nodes} node(s) asked, {len(fits_all)} of partition {name}'s nodes have the CPUs, "
            "memory and GPUs asked per node all at once"
        )
    from tuneforge.slurm.requeue import parse_duration

    max_time = parse_duration(part.get("MaxTime", "UNLIMITED"))
    if max_time is not None and cluster.timeout_min * 60 > max_time:
        problems.append(
            f"cluster.timeout_min: {cluster.timeout_min} min asked, partition {name} allows at most "
            f"{part['MaxTime']} ({int(max_time // 60)} min); set cluster.timeout_min={int(max_time // 60)} "
            "(the job requeues itself to go on)"
        )
    return problems, warnings


class SlurmUnavailable(RuntimeError):
    """The scheduler cannot be asked from here (no Slurm commands, or no answer)."""


def _slurm(*args: str) -> str:
    import shutil
    import subprocess

    if shutil.which(args[0]) is None:
        raise SlurmUnavailable(f"{args[0]} not found (not on a Slurm login node?)")
    try:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmUnavailable(f"{' '.join(args[:2])}: {e}") from None
    if out.returncode:
        raise SlurmUnavailable(f"{' '.join(args[:2])}: {(out.stderr or out.stdout).strip()[:200]}")
    return out.stdout


def slurm_partitions() -> Dict[str, Dict[str, str]]:
    """name -> scontrol's fields (MaxTime, MaxNodes, Default, State, ...) of every partition."""
    parts = {}
    for line in _slurm("scontrol", "show", "partition", "-o").splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "PartitionName" in fields:
            parts[fields["PartitionName"]] = fields
    return parts


def slurm_nodes(partition: str) -> List[Dict[str, object]]:
    """The partition's nodes: CPUs, memory (MB) and GPUs (from their gres) of each."""
    nodes: Dict[str, Dict[str, object]] = {}
    for line in _slurm("sinfo", "-h", "-N", "-p", partition, "-o", "%N|%c|%m|%G").splitlines():
        name, cpus, mem, gres = (line.split("|") + ["", "", ""])[:4]
        nodes[name] = {
            "name": name,
            "cpus": int(cpus) if cpus.isdigit() else 0,
            "mem_mb": int(mem) if mem.isdigit() else 0,
            "gpus": _gres_gpus(gres),
            "gres": gres,
        }
    return list(nodes.values())


def _gres_gpus(gres: str) -> int:
    """GPUs in a gres string: "gpu:a100:4(S:0-1),gpu:2" -> 6; "(null)" -> 0."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def _gres(nodes) -> str:
    return ", ".join(sorted({str(n["gres"]) for n in nodes})) or "none"


def _slurm_limit(value: Optional[str]) -> Optional[int]:
    return int(value) if value and value.isdigit() else None  # UNLIMITED, None: no limit


def _count(n: int) -> str:
    return "none" if n == 0 else f"only {n}"


#: room kept on top of a checkpoint's estimate: metrics, logs, the tokenizer, estimation error
DISK_MARGIN = 0.1


def disk_problems(run_dir: Optional[str], needed: Optional[float]) -> Tuple[List[str], List[str]]:
    """(problems, warnings) of the run dir's disk: it must be writable and have room for one more
    checkpoint (`needed` bytes, plus DISK_MARGIN) before anything is submitted."""
    import os

    if not run_dir:
        return [], []
    existing = Path(run_dir)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"run.dir: {existing} is not a directory"], []
    try:
        fs = os.statvfs(existing)
    except OSError as e:
        return [], [f"disk check skipped: {existing}: {e.strerror or e}"]
    if fs.f_flag & os.ST_RDONLY:
        return [f"run.dir: {existing} is on a read-only file system; choose a run.dir (or run.root) you can write"], []
    if not os.access(existing, os.W_OK | os.X_OK):
        return [
            f"run.dir: cannot write into {existing} (permission denied); choose a run.dir (or run.root) you can write"
        ], []
    free = fs.f_bavail * fs.f_frsize
    if needed is None:
        return [], [f"disk: {units.gib(free)} GiB free under {existing}; the checkpoint size is unknown (no estimate)"]
    if free < needed * (1 + DISK_MARGIN):
        return [
            f"run.dir: {existing} has {_size(free)} free, and one checkpoint of this run takes about {_size(needed)} "
            "(model and optimizer state); free some space or choose another run.dir"
        ], []
    return [], []


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"
