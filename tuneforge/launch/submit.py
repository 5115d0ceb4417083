"""Hand runs to submitit (one run, or a sweep's runs as one Slurm job array), and follow a job to its end."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import List, Sequence

from tuneforge.conf.schema import Config
from tuneforge.launch import rundir


def submit(cfgs: Sequence[Config], run_dirs: Sequence[Path], folder: Path, job_class=None) -> List:
    """Submit one training task per config (all with the same cluster settings) through one executor
    writing under `folder`; several on Slurm become one job array. Each job id is recorded in its run
    dir. `job_class`: what the tasks run (slurm/job.py; TrainJob unless given, ProbeJob for the probe).
    Returns the submitit jobs."""
    from tuneforge.slurm.executors import make_executor
    from tuneforge.slurm.job import TrainJob

    job_class = job_class or TrainJob
    cluster = cfgs[0].cluster
    executor = make_executor(cluster, folder)
    if len(cfgs) == 1:
        jobs = [executor.submit(job_class(), cfgs[0])]
    else:
        with executor.batch():
            jobs = [executor.submit(job_class(), cfg) for cfg in cfgs]
    for job, run_dir in zip(jobs, run_dirs):
        rundir.record_job(Path(run_dir), str(job.job_id), cluster.name, Path(folder))
    return jobs


def follow(job, run_dir: Path, max_steps: int) -> int:
    """Wait for the job, showing progress from metrics.jsonl; 0 when every task succeeded."""
    metrics = run_dir / "metrics.jsonl"
    shown = -1
    while not job.done():
        time.sleep(1.0)
        step, loss = _last_step(metrics)
        if step != shown and step >= 0:
            shown = step
            width = 30
            filled = int(width * step / max(1, max_steps))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{max_steps} loss {loss:.4f}")
            sys.stderr.flush()
    sys.stderr.write("\n")
    try:
        results = job.results()
    except Exception as e:  # the task's traceback is in its log; show its last line
        print(f"job {job.job_id} failed: {task_error(str(e))}", file=sys.stderr)
        print(f"logs: {job.paths.stdout.parent}", file=sys.stderr)
        return 1
    main = results[0]
    print(
        f"done: step {main['step']}, loss {main['loss']:.4f}"
        + (f" (stopped: {main['stopped']})" if main["stopped"] else "")
    )
    if not main["stopped"]:
        _show_before_after(run_dir)
    return 0


def _show_before_after(run_dir: Path) -> None:
    """The run's answers and held-out loss before and after (what `tuneforge compare <run dir>` shows)."""
    from tuneforge.commands.compare import before_after

    text = before_after(run_dir)
    if text:
        print(text, flush=True)


def task_error(text: str) -> str:
    """The task's own exception ("DataError: <message>", which may span lines) from submitit's failure
    text (a header, the traceback between two dashed lines, then the log paths); else its last line."""
    parts = text.split("----------------------")
    body = (parts[1] if len(parts) >= 3 else text).rstrip()
    found = list(re.finditer(r"^(?:[\w]+\.)*(\w+(?:Error|Exception)): ", body, re.MULTILINE))
    if found:
        return found[-1].group(1) + ": " + body[found[-1].end() :]
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def _last_step(metrics: Path):
    try:
        lines = metrics.read_text().strip().splitlines()
        record = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return -1, 0.0
    if not record or "loss" not in record:  # step 0's evaluation: no training step yet
        return -1, 0.0
    return record["step"], record["loss"]
