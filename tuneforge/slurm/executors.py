"""Cluster config -> submitit executor. Pure functions: the only side effect is submitit's folder.

`cluster=local` runs the tasks as processes on this machine (submitit's LocalExecutor);
`cluster=slurm` writes an sbatch script and submits it (submitit's SlurmExecutor). Both start one
process per task and give each its rank through submitit's JobEnvironment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from tuneforge.compat import submitit as submitit_compat
from tuneforge.conf.schema import ClusterConfig, SlurmClusterConfig

#: what submitit runs inside the allocation; its folder argument is quoted by submitit itself
SUBMIT_MODULE = "submitit.core._submit"


def slurm_parameters(cluster: SlurmClusterConfig) -> Dict[str, Any]:
    """SlurmExecutor parameters for a `SlurmClusterConfig` (names as in submitit's sbatch writer)."""
    params: Dict[str, Any] = {
        "job_name": cluster.job_name,
        "partition": cluster.partition,
        "account": cluster.account,
        "qos": cluster.qos,
        "constraint": cluster.constraint,
        "nodes": cluster.nodes,
        "ntasks_per_node": cluster.tasks_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "gpus_per_node": cluster.gpus_per_node or None,
        "mem": f"{cluster.mem_gb}GB" if cluster.mem_gb else None,
        "time": cluster.timeout_min,
        "signal_delay_s": cluster.signal_delay_s,
        "setup": list(cluster.setup),
        "additional_parameters": _extra_sbatch(cluster.extra_sbatch),
        # a rank that fails ends the step: the others would otherwise wait for it until the time limit
        # (those blocked in a collective fail after cluster.collective_timeout_s; a hung one never does)
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    return {k: v for k, v in params.items() if v is not None and v != {} and v != []}


def _extra_sbatch(lines) -> Dict[str, Any]:
    """["--reservation=x", "--exclusive"] -> {"reservation": "x", "exclusive": True} (a bare flag);
    validate.py has checked the form."""
    extra: Dict[str, Any] = {}
    for line in lines:
        key, sep, value = line[2:].partition("=")
        extra[key.replace("-", "_")] = value if sep else True
    return extra


def make_executor(cluster: ClusterConfig, folder: Path, script_only: bool = False):
    """The submitit executor for `cluster` (local or slurm), writing its files under `folder`
    (`script_only`: one that only writes sbatch text, also where Slurm is not installed)."""
    import submitit

    if cluster.name == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=cluster.max_requeues)
        executor.update_parameters(
            timeout_min=cluster.timeout_min,
            tasks_per_node=cluster.tasks_per_node,
            gpus_per_node=cluster.gpus_per_node,
            signal_delay_s=cluster.signal_delay_s,
            nodes=1,
        )
        return executor
    slurm_executor = submitit_compat.script_only_slurm_executor() if script_only else submitit.SlurmExecutor
    executor = slurm_executor(folder=folder, max_num_timeout=cluster.max_requeues)
    executor.update_parameters(**slurm_parameters(cluster))
    return executor


def sbatch_script(cluster: SlurmClusterConfig, folder: Path, array_size: Optional[int] = None) -> str:
    """The exact sbatch script that `make_executor(cluster, folder)` would submit (job id left as %j);
    with `array_size`, the script of a job array of that many elements (what a sweep submits)."""
    executor = make_executor(cluster, folder, script_only=True)
    if array_size is not None:
        executor.parameters["map_count"] = array_size  # what submitit sets for the copy it submits
    return submitit_compat.sbatch_text(executor)
