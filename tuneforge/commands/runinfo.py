"""What a run dir says about its run, plus what Slurm says about its job: the data behind `status`.

Nothing here runs in the background: each call reads the run dir's records (submit.json: job ids
and submitit's folder; config.yaml; metrics.jsonl; events.jsonl; wandb_id) and asks the scheduler
once through submitit (sacct for Slurm jobs; the controller process and result pickles for local ones).
"""

from __future__ import annotations

import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from tuneforge import layout
from tuneforge.compat import submitit as submitit_compat
from tuneforge.launch import rundir, sweep
from tuneforge.slurm import events

#: states after which a job does nothing more (Slurm's words; local jobs are mapped onto them)
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "STOPPED",
    "INTERRUPTED",
    "NOT SUBMITTED",
}


@dataclass
class Job:
    """One submitted job of a run dir (the latest one unless asked otherwise)."""

    job_id: str
    cluster: str  # "local" | "slurm"
    folder: Path  # submitit's folder: logs, pickles, the sbatch script

    def paths(self, rank: int = 0):
        return submitit_compat.job_paths(self.folder, self.job_id, rank)


@dataclass
class RunInfo:
    run_dir: Path
    job: Optional[Job]
    state: str = "UNKNOWN"
    step: Optional[int] = None
    max_steps: Optional[int] = None
    loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    elapsed_s: Optional[float] = None
    requeues: int = 0
    wandb: str = "-"
    errors: List[str] = field(default_factory=list)
    checkpoint: str = "-"  # what a resume would take, and why newer ones are skipped (layout.resume_point)
    stop_reason: Optional[str] = None  # STOPPED: debug.stop_after, Ctrl-C, SIGTERM, launcher gone

    @property
    def shown_state(self) -> str:
        return f"{self.state} ({self.stop_reason})" if self.state == "STOPPED" and self.stop_reason else self.state


def run_dirs(path: Path) -> List[Path]:
    """The run dirs behind a path: itself, or every element of a sweep dir."""
    path = Path(path).expanduser().resolve()
    if sweep.is_sweep_dir(path):
        return [Path(e["run_dir"]) for e in sweep.read(path)["elements"]]
    if (path / "submit.json").is_file():
        return [path]
    raise FileNotFoundError(f"{path} is neither a run dir (no submit.json) nor a sweep dir (no sweep.json)")


def newest(root: Optional[Path] = None) -> Path:
    """The most recently submitted run or sweep: from the user's index of runs (launch/index.py), else
    under `root` (default ./runs), as runs/<name>/<stamp> (sweep elements excluded)."""
    if root is None:
        from tuneforge.launch import index

        found = index.newest()
        if found is not None:
            return found
        root = Path("runs")
    candidates = [p.parent for p in Path(root).glob("*/*/submit.json")] + [
        p.parent for p in Path(root).glob("*/*/sweep.json")
    ]
    if not candidates:
        raise FileNotFoundError(f"no runs under {Path(root).resolve()}; give a run or sweep dir")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def latest_job(run_dir: Path) -> Optional[Job]:
    jobs = rundir.read_record(run_dir).get("jobs") or []
    if not jobs:
        return None
    last = jobs[-1]
    return Job(str(last["job_id"]), last["cluster"], Path(last.get("folder") or Path(run_dir) / "slurm"))


def gather(dirs: List[Path]) -> List[RunInfo]:
    """RunInfo of each run dir; the Slurm states of all their jobs come from one sacct call."""
    infos = [RunInfo(d, latest_job(d)) for d in dirs]
    states = slurm_states([i.job for i in infos if i.job and i.job.cluster == "slurm"])
    for info in infos:
        _fill(info, states)
    return infos


def slurm_states(jobs: List[Job]) -> dict:
    """job id -> Slurm state (first word: "CANCELLED by 0" -> CANCELLED), through submitit's sacct watcher."""
    if not jobs:
        return {}
    return submitit_compat.slurm_states([(j.folder, j.job_id) for j in jobs])


def _fill(info: RunInfo, slurm: dict) -> None:
    run_dir, job = info.run_dir, info.job
    info.max_steps = _max_steps(run_dir)
    last = _last_metrics(run_dir / "metrics.jsonl")
    if last:
        info.step, info.loss, info.tokens_per_s = last.get("step"), last.get("loss"), last.get("tokens_per_s")
    info.wandb = _wandb(run_dir)
    info.checkpoint = layout.resume_point(run_dir).describe()
    if job is None:
        info.state = "NOT SUBMITTED"
        return
    if job.cluster == "slurm":
        # sacct lags a few seconds behind a job that just finished; its result file does not
        info.state = slurm.get(job.job_id, "UNKNOWN")
        if info.state not in FINAL_STATES:
            info.state = _result_state(job) or info.state
    else:
        info.state = local_state(job, run_dir)
    history = [e for e in events.read(run_dir) if e.get("job_id", job.job_id) == job.job_id]
    # how the job's latest allocation ended (a requeued Slurm job keeps its id: an earlier stop does not count)
    ends = [e for e in history if e["event"] in ("stopped", "completed")]
    if ends and ends[-1]["event"] == "stopped" and info.state in ("COMPLETED", "STOPPED"):
        info.state, info.stop_reason = "STOPPED", _stop_reason(ends[-1])  # a result, but not the end of the run
    starts = [e for e in history if e["event"] == "allocation" and e.get("job_id") == job.job_id]
    info.requeues = max(0, len(starts) - 1)
    if starts:
        info.elapsed_s = (
            time.time() if info.state not in FINAL_STATES else _last_activity(run_dir, job, history)
        ) - starts[0]["ts"]
    if info.state not in ("COMPLETED", "RUNNING", "PENDING", "REQUEUED"):
        info.errors = errors(run_dir, job, history, starts[-1] if starts else None)


def _stop_reason(stop: dict) -> str:
    """What stopped a run before max_steps, in the words a user set or did."""
    if stop.get("reason") == "stop_after":
        return "debug.stop_after"
    cause = stop.get("cause") or stop.get("signal") or stop.get("reason") or "?"
    return {"SIGINT": "Ctrl-C"}.get(cause, cause)


def local_state(job: Job, run_dir: Path) -> str:
    """A local job's state: its result, else whether its controller process lives, else its last event."""
    finished = _result_state(job)
    if finished:
        return finished
    if _process_alive(int(job.job_id)):
        return "RUNNING"
    kinds = [e["event"] for e in events.read(run_dir) if e.get("job_id") == job.job_id]
    if "cancel" in kinds:
        return "CANCELLED"
    for kind in reversed(kinds):
        if kind in ("failed", "requeue_refused"):
            return "FAILED"
        if kind == "stopped":
            return "STOPPED"
    return "INTERRUPTED"


def _result_state(job: Job) -> Optional[str]:
    """COMPLETED / FAILED from rank 0's result file (written only when the task function ended), else None."""
    result = job.paths(0).result_pickle
    if not result.is_file():
        return None
    try:
        with open(result, "rb") as f:
            outcome = pickle.load(f)[0]
    except Exception:  # noqa: BLE001 - half-written or unreadable: no verdict yet
        return None
    return {"success": "COMPLETED", "error": "FAILED"}.get(outcome)


def errors(run_dir: Path, job: Job, history: List[dict], start: Optional[dict]) -> List[str]:
    """Why the latest allocation ended badly: recorded exceptions per rank, ranks that vanished, srun's word."""
    attempt = start.get("attempt") if start else None
    mine = [e for e in history if e.get("job_id") == job.job_id and e.get("attempt") == attempt]
    out = [f"rank {e['rank']}: {e['error']}" for e in mine if e["event"] == "failed"]
    out += [
        f"requeue refused: {e['reason']}"
        for e in history
        if e["event"] == "requeue_refused" and start and e["ts"] >= start["ts"]
    ]
    failed = {e["rank"] for e in mine if e["event"] == "failed"}
    if failed:
        for task in (e for e in mine if e["event"] == "task" and e["rank"] not in failed):
            out.append(
                f"rank {task['rank']} (pid {task['pid']} on {task['host']}): ended without an error "
                "record: killed by a signal or crashed outside Python?"
            )
    log = job.paths(0).stderr
    if log.is_file():
        srun = [line.strip() for line in _tail(log).splitlines() if line.startswith("srun: error:")]
        out += srun[-3:]
    return out


def _last_activity(run_dir: Path, job: Job, history: List[dict]) -> float:
    """When a finished job last did anything: its last event, metric line or log line."""
    times = [e["ts"] for e in history]
    for path in (run_dir / "metrics.jsonl", job.paths(0).stderr, job.paths(0).stdout):
        if path.is_file():
            times.append(path.stat().st_mtime)
    return max(times)


def _tail(path: Path, size: int = 64 * 1024) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _max_steps(run_dir: Path) -> Optional[int]:
    from omegaconf import OmegaConf

    try:
        return int(OmegaConf.load(run_dir / "config.yaml").train.max_steps)
    except Exception:  # noqa: BLE001 - a missing or foreign config only blanks the column
        return None


def _last_metrics(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    for line in reversed(_tail(path, 16 * 1024).splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            return record
    return None


def _wandb(run_dir: Path) -> str:
    id_file = run_dir / "wandb_id"
    if not id_file.is_file():
        return "-"
    run_id = id_file.read_text().strip()
    if any((run_dir / "wandb").glob("offline-run-*")):
        return f"{run_id} (offline)"
    return run_id
