"""Hand runs to submitit (one run, or a sweep's runs as one Slurm job array); `launch` does it for one
run from its validated config: run dir, submission, the user's index of runs, and following it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from pathlib import Path
from typing import List, Sequence

from tuneforge.conf.schema import Config
from tuneforge.launch import index, preflight, rundir

#: set in a local job's environment: its ranks stop when this process is gone (slurm/requeue.py)
LAUNCHER_PID = "TUNEFORGE_LAUNCHER_PID"


def launch(cfg: Config, report, argv: Sequence[str], wait: bool) -> int:
    """Create the run dir, submit, print where everything is; follow a local run (or `wait`)."""
    from tuneforge.launch.follow import follow

    try:
        run_dir = rundir.create(cfg, argv)
    except rundir.NotSubmitted as e:  # a busy, damaged, incompatible or finished run dir
        return e.report()
    preflight.save(report, run_dir)
    (job,) = submit([cfg], [run_dir], run_dir / "slurm")
    index.add(run_dir, "run", argv)
    print(f"job {job.job_id} ({cfg.cluster.name})\nrun dir {run_dir}\nlogs {job.paths.stdout}", flush=True)
    if cfg.cluster.name == "local" or wait:
        return follow(job, run_dir, cfg.train.max_steps, cfg.cluster.name)
    return 0


def submit(cfgs: Sequence[Config], run_dirs: Sequence[Path], folder: Path) -> List:
    """Submit one training task per config (all with the same cluster settings) through one executor
    writing under `folder`; several on Slurm become one job array. Each job id is recorded in its run
    dir. Returns the submitit jobs."""
    from tuneforge.slurm import owner
    from tuneforge.slurm.executors import make_executor
    from tuneforge.slurm.job import TrainJob

    cluster = cfgs[0].cluster
    executor = make_executor(cluster, folder)
    try:
        with _owned_by_this_process(cluster.name == "local"):
            if len(cfgs) == 1:
                jobs = [executor.submit(TrainJob(), cfgs[0])]
            else:
                with executor.batch():
                    jobs = [executor.submit(TrainJob(), cfg) for cfg in cfgs]
    except BaseException:
        for run_dir in run_dirs:  # no job: the run dirs' claims go with the submission
            owner.release(Path(run_dir))
        raise
    for job, run_dir in zip(jobs, run_dirs):
        rundir.record_job(Path(run_dir), str(job.job_id), cluster.name, Path(folder))
    return jobs


@contextlib.contextmanager
def _owned_by_this_process(local: bool):
    """A local job's controller starts with SIGINT ignored (the terminal's Ctrl-C reaches the whole
    process group, and submitit's controller would kill its tasks on it: launch/follow.py stops them
    instead), and its ranks learn this process's pid, to stop when it is gone."""
    if not local:
        yield
        return
    previous_pid = os.environ.get(LAUNCHER_PID)
    os.environ[LAUNCHER_PID] = str(os.getpid())
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
        if previous_pid is None:
            os.environ.pop(LAUNCHER_PID, None)
        else:
            os.environ[LAUNCHER_PID] = previous_pid


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
