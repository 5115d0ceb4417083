"""Cluster config -> submitit executor. Pure functions: the only side effect is submitit's folder.

`cluster=local` runs the tasks as processes on this machine (submitit's LocalExecutor);
`cluster=slurm` writes an sbatch script and submits it (submitit's SlurmExecutor). Both start one
process per task and give each its rank through submitit's JobEnvironment.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path
from typing import Any, Dict, Optional

from tuneforge.compat import submitit as submitit_compat
from tuneforge.conf.schema import ClusterConfig, SlurmClusterConfig

#: what submitit runs inside the allocation; its folder argument is quoted by submitit itself
SUBMIT_MODULE = "submitit.core._submit"

# What reaches the sbatch script, and how (submitit's slurm.py `_make_sbatch_string`):
#   #SBATCH --<key>=<value>   key verbatim, value shlex-quoted; sbatch reads these lines only up to the
#                             first line that is not a comment, so a line break inside a value ends the
#                             directives there and runs the rest as a command
#   setup lines               verbatim, one shell line each (the user's own commands)
#   the srun line             the log paths and submitit's folder shlex-quoted; the interpreter verbatim
# So: no value may hold a line break or another control character (quoting does not help in a
# comment line), sbatch values are plain words, option names plain names, and paths are quoted.
#: an sbatch option value written by tuneforge (partition, account, qos, constraint, job name, extra lines)
SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:@%+=/|&\[\]-]+")
#: an option name of an extra #SBATCH line (written unquoted by submitit)
SBATCH_OPTION = re.compile(r"[a-z][a-z0-9-]*")
#: sbatch options tuneforge sets itself -> the key that sets it (an extra line would override it while
#: the preflight, the signal timing and the requeue logic still use tuneforge's value)
TUNEFORGE_SBATCH = {
    "time": "cluster.timeout_min",
    "nodes": "cluster.nodes",
    "ntasks": "cluster.nodes x cluster.tasks_per_node",
    "ntasks-per-node": "cluster.tasks_per_node",
    "cpus-per-task": "cluster.cpus_per_task",
    "gpus-per-node": "cluster.gpus_per_node",
    "gpus": "cluster.gpus_per_node",
    "gpus-per-task": "cluster.gpus_per_node",
    "gres": "cluster.gpus_per_node",
    "mem": "cluster.mem_gb",
    "mem-per-cpu": "cluster.mem_gb",
    "mem-per-gpu": "cluster.mem_gb",
    "partition": "cluster.partition",
    "account": "cluster.account",
    "qos": "cluster.qos",
    "constraint": "cluster.constraint",
    "job-name": "cluster.job_name",
    "signal": "cluster.signal_delay_s",
    "output": "run.dir (the logs go to <run dir>/slurm)",
    "error": "run.dir (the logs go to <run dir>/slurm)",
    "open-mode": "nothing: tuneforge appends to the logs across requeues",
    "array": "a sweep (tuneforge -m): it writes the array",
    "wckey": "nothing: submitit sets it",
    "requeue": "cluster.max_requeues",
    "no-requeue": "cluster.max_requeues",
    "wrap": "nothing: tuneforge writes the script",
    "chdir": "nothing: the run dir is absolute",
}


def unsafe_character(value: str) -> Optional[str]:
    """How to name the first character of `value` that no shell or sbatch line may carry (a line
    break, a NUL, an escape, any other control character), or None."""
    for i, ch in enumerate(str(value)):
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            name = {"\n": "a line break", "\r": "a carriage return", "\t": "a tab", "\x00": "a NUL byte"}.get(
                ch, f"control character U+{ord(ch):04X}"
            )
            return f"{name} at character {i + 1}"
    return None


def reserved_option(option: str) -> Optional[str]:
    """The tuneforge key that sets sbatch option `option` (or an abbreviation of it, which sbatch's
    getopt accepts), or None when tuneforge leaves it alone."""
    if option in TUNEFORGE_SBATCH:
        return TUNEFORGE_SBATCH[option]
    if len(option) >= 2:  # --ti, --nod, ... : getopt_long expands unambiguous abbreviations
        for name, key in TUNEFORGE_SBATCH.items():
            if name.startswith(option):
                return key
    return None


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


def check_script_values(params: Dict[str, Any], folder: Path) -> None:
    """The last guard before submitit writes a script (validation refuses all of this first, naming
    the key): raise ValueError for a value that would end an #SBATCH line or run as a command."""
    for key, value in params.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, str) and unsafe_character(item):
                raise ValueError(f"sbatch parameter {key}: {unsafe_character(item)}; refusing to write the script")
    for key in ("job_name", "partition", "account", "qos", "constraint"):
        if key in params and not SBATCH_VALUE.fullmatch(str(params[key])):
            raise ValueError(f"sbatch parameter {key}: {params[key]!r} is not a plain sbatch value")
    for key, value in params.get("additional_parameters", {}).items():
        if not SBATCH_OPTION.fullmatch(key.replace("_", "-")) or (
            value is not True and not SBATCH_VALUE.fullmatch(str(value))
        ):
            raise ValueError(f"extra sbatch line --{key}: not of the form --key=<plain value>")
    for text in (str(folder), sys.executable):
        if unsafe_character(text):
            raise ValueError(f"{text!r}: {unsafe_character(text)}; refusing to write the script")


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
    params = slurm_parameters(cluster)
    check_script_values(params, Path(folder))
    slurm_executor = submitit_compat.script_only_slurm_executor() if script_only else submitit.SlurmExecutor
    executor = slurm_executor(folder=folder, max_num_timeout=cluster.max_requeues)
    executor.update_parameters(**params)
    return executor


def sbatch_script(cluster: SlurmClusterConfig, folder: Path, array_size: Optional[int] = None) -> str:
    """The exact sbatch script that `make_executor(cluster, folder)` would submit (job id left as %j);
    with `array_size`, the script of a job array of that many elements (what a sweep submits)."""
    executor = make_executor(cluster, folder, script_only=True)
    if array_size is not None:
        executor.parameters["map_count"] = array_size  # what submitit sets for the copy it submits
    return submitit_compat.sbatch_text(executor)
