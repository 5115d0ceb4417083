"""One run, one directory: <run dir>/owner.json names the job that trains into it.

    {"job_id": "1234" | "1234_5" | null, "cluster": "slurm" | "local", "host": ..., "pid": ..., "pid_start": ...,
     "state": "submitting" | "submitted", "claimed": <epoch s>, "folder": submitit's folder of the job}

The launcher claims the directory before it submits (state "submitting", its own pid) and records the
job id once the scheduler has one; every rank of a job checks at its start that no other live job owns
it (a second job submitted some other way fails at once instead of training over the first). A claim
counts only while its job lives, asked where the job runs:

- a Slurm job: `squeue` (pending, running, requeued, suspended... count; a finished or unknown job
  does not), then `sacct` through submitit when squeue cannot answer;
- a local job (submitit's LocalExecutor: the job id is its controller's pid) and a claim still being
  submitted: that process on that host, with the start time it had when claimed (a reused pid is not it).

A job that is done with the run dir no longer holds it, although Slurm may still be ending it (srun
tearing the ranks down, the KillWait after a cancel): its rank 0 wrote its result (submitit's result
file: it completed or failed), or the job's last event in events.jsonl says it completed, stopped,
failed or may not requeue. (Should Slurm requeue a stopped job, its ranks find the new owner and
refuse to train.) So a dead job never holds a directory, and when the owner cannot be asked (Slurm unreachable, a local
job of another host) the refusal says so and names the file to remove. Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from tuneforge import fsutil, layout

#: Slurm states of a job that still runs, or will (squeue's long names)
LIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "SUSPENDED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "RESV_DEL_HOLD",
}


class Busy(RuntimeError):
    """The run dir is owned by a job that is still alive (or cannot be asked)."""


@dataclass
class Holder:
    job_id: Optional[str]
    cluster: str
    host: str
    pid: Optional[int]
    pid_start: Optional[float]
    state: str
    claimed: float
    folder: Optional[str] = None

    def describe(self) -> str:
        if self.job_id is None:
            return f"a submission in progress (tuneforge pid {self.pid} on {self.host})"
        return f"{self.cluster} job {self.job_id}" + (f" on {self.host}" if self.cluster == "local" else "")


def path(run_dir: Path) -> Path:
    return Path(run_dir) / layout.OWNER


def read(run_dir: Path) -> Optional[Holder]:
    try:
        d = json.loads(path(run_dir).read_text())
        return Holder(
            None if d.get("job_id") is None else str(d["job_id"]),
            str(d.get("cluster", "slurm")),
            str(d.get("host", "")),
            d.get("pid"),
            d.get("pid_start"),
            str(d.get("state", "submitted")),
            float(d.get("claimed", 0)),
            d.get("folder"),
        )
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # none, or torn by a killed writer: no claim


def liveness(holder: Holder, run_dir: Optional[Path] = None) -> Optional[str]:
    """None when the holder is gone; else why it still counts ("running", "cannot ask Slurm: ...")."""
    if holder.job_id is not None and _ended(holder, run_dir):
        return None
    if holder.job_id is None or holder.cluster == "local":
        if holder.host != socket.gethostname():
            return f"on another host ({holder.host}): cannot be checked from here"
        pid = holder.pid if holder.job_id is None else _int(holder.job_id)
        start = process_start(pid) if pid else None
        if start is None:
            return None
        if holder.pid_start is not None and abs(start - holder.pid_start) > 2:
            return None  # the pid now belongs to another process
        return "running"
    return _slurm_liveness(holder.job_id)


#: a job's last event in events.jsonl after which it does nothing more to the run dir
FINAL_EVENTS = {"completed", "stopped", "failed", "requeue_refused"}


def _ended(holder: Holder, run_dir: Optional[Path]) -> bool:
    """The job is done with the run dir: rank 0 wrote its result, or its last event says so."""
    from tuneforge.compat import submitit as submitit_compat
    from tuneforge.slurm import events

    try:
        if holder.folder and submitit_compat.job_paths(Path(holder.folder), holder.job_id, 0).result_pickle.is_file():
            return True
    except (OSError, ValueError):
        pass
    if run_dir is None:
        return False
    mine = [e["event"] for e in events.read(run_dir) if str(e.get("job_id")) == holder.job_id]
    return bool(mine) and mine[-1] in FINAL_EVENTS


def _slurm_liveness(job_id: str) -> Optional[str]:
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        out = None
        why = f"squeue: {e}"
    if out is not None:
        states = set(out.stdout.split())
        if out.returncode == 0:
            live = states & LIVE_STATES
            return f"{sorted(live)[0].lower()} (squeue)" if live else None
        if "Invalid job id" in out.stderr:
            return None  # finished long enough ago that slurmctld forgot it
        why = f"squeue: {out.stderr.strip()[:200]}"
    try:
        from tuneforge.compat import submitit as submitit_compat

        state = submitit_compat.slurm_states([(Path("."), job_id)]).get(job_id, "UNKNOWN")
    except Exception as e:  # noqa: BLE001 - sacct missing or unreachable: say so below
        state, why = "UNKNOWN", f"{why}; sacct: {e}"
    if state in LIVE_STATES:
        return f"{state.lower()} (sacct)"
    if state != "UNKNOWN":
        return None
    return f"cannot ask Slurm ({why})"


def process_start(pid: int) -> Optional[float]:
    """When process `pid` started (epoch seconds), None when there is none or it is a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return None
        btime = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        try:  # no /proc (macOS): existence only
            os.kill(pid, 0)
            return 0.0
        except (OSError, ValueError):
            return None


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Serialise claims on one run dir between processes (a short flock on a sibling file)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / f".{layout.OWNER}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def busy(run_dir: Path, job_id: Optional[str] = None) -> Optional[str]:
    """Why the run dir may not be trained into now (its owner, alive), or None. `job_id`: the asking
    job's own id, which never counts against itself."""
    holder = read(run_dir)
    if holder is None or (job_id is not None and holder.job_id in (job_id, None)):
        return None  # a job is never busy against itself, nor against the submission that started it
    alive = liveness(holder, Path(run_dir))
    if alive is None:
        return None
    fix = f"wait for it, `tuneforge cancel {run_dir}`, or use another run.dir"
    if alive.startswith(("cannot", "on another host")):
        fix = f"if it is not running, remove {path(run_dir)}"
    return f"{run_dir} is owned by {holder.describe()}, {alive}; {fix}"


def claim(run_dir: Path, cluster: str) -> None:
    """Launcher, before submitting: take the run dir, or raise Busy naming its live owner."""
    with _locked(run_dir):
        why = busy(run_dir)
        if why:
            raise Busy(why)
        pid = os.getpid()
        _write(run_dir, None, cluster, pid, "submitting")


def record(run_dir: Path, job_id: str, cluster: str, folder: Optional[Path] = None) -> None:
    """Launcher, once the scheduler gave the job its id (a local job: its controller's pid); `folder`:
    submitit's, where the job's result will be."""
    pid = _int(job_id) if cluster == "local" else None
    with _locked(run_dir):
        _write(run_dir, job_id, cluster, pid, "submitted", folder)


def release(run_dir: Path) -> None:
    """Launcher, when the submission failed: the claim goes with it."""
    holder = read(run_dir)
    if holder is not None and holder.job_id is None and holder.pid == os.getpid():
        path(run_dir).unlink(missing_ok=True)


def take(run_dir: Path, job_id: str, cluster: str, write: bool) -> None:
    """Every rank at job start: raise Busy when another live job owns the run dir; `write` (rank 0):
    then record this job as the owner (a job submitted without the launcher's claim, or a requeue)."""
    with _locked(run_dir):
        why = busy(run_dir, job_id)
        if why:
            raise Busy(f"not training: {why}")
        holder = read(run_dir)
        if write and (holder is None or holder.job_id != job_id):
            folder = os.environ.get("SUBMITIT_FOLDER")  # (submitit's; None outside a submitit job)
            _write(run_dir, job_id, cluster, _int(job_id) if cluster == "local" else None, "submitted", folder)


def _write(run_dir: Path, job_id: Optional[str], cluster: str, pid: Optional[int], state: str, folder=None) -> None:
    fsutil.write_json(
        path(run_dir),
        {
            "job_id": job_id,
            "cluster": cluster,
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": process_start(pid) if pid else None,
            "state": state,
            "claimed": round(time.time(), 3),
            "folder": None if folder is None else str(folder),
        },
    )


def _int(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
