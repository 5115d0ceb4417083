"""Time limits and preemption, inside the task: signal handlers on every rank, then the requeue.

Slurm warns a job with SIGUSR2 `cluster.signal_delay_s` before its time limit (sbatch --signal;
up to ~30 s earlier than asked), and submitit's preemption test (`job._interrupt()`) sends SIGTERM
then SIGUSR2. submitit's own USR2 handler runs on rank 0 only: it calls checkpoint(), `scontrol
requeue` and exits on the spot, killing the other ranks before any collective save, and saving
inside a signal handler would hang on the collectives anyway. So every rank replaces submitit's
handlers with ones that only set the stop flag handed to the task; at the next step boundary the ranks agree
on it, save a checkpoint together and return; then rank 0 requeues through submitit's own pieces
(`_checkpoint` re-dumps the job's pickle from TrainJob.checkpoint with one requeue fewer left, and
the job environment's `_requeue` runs `scontrol requeue`, or exits 144 for the local executor),
and every rank exits without writing a result, so the job counts as unfinished.

SIGTERM alone (scancel, `scontrol requeue` from outside, the hard time limit) stops the same way but
does not requeue: Slurm decides whether the job comes back, and if it does, the task resumes from
the run dir's latest checkpoint by itself, as every start does. SIGINT (Ctrl-C on a local run: the
launcher forwards it, launch/follow.py) stops the same way too, with the reason "interrupt". A local
rank whose launcher is gone (killed without a chance to forward anything) stops like on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from tuneforge.compat import submitit as submitit_compat
from tuneforge.conf.schema import ClusterConfig
from tuneforge.slurm import events
from tuneforge.trainers.task import StopFlag

#: how long the other ranks wait for rank 0 to requeue before they exit anyway
WAIT_FOR_RANK0_S = 60.0
#: submitit's preemption sends SIGTERM, then USR2 with a second scancel: a USR2 this soon after the
#: SIGTERM stop still turns it into a requeue
WARNING_AFTER_TERM_S = 3.0
#: a local rank checks this often whether its launcher still lives
LAUNCHER_CHECK_S = 1.0


class Allocation:
    """This rank's view of the current allocation: who it is, when it started, which signals came."""

    def __init__(self, run_dir: Path, cluster_cfg: ClusterConfig, stop: StopFlag):
        import submitit

        self.run_dir, self.cluster, self.stop_flag = Path(run_dir), cluster_cfg, stop
        self.env = submitit.JobEnvironment()
        self.rank = self.env.global_rank
        self.started = time.time()
        self.usr_signal = submitit_compat.usr_signal(self.env)
        self.attempt = 0  # set by start()
        self.terminated = False  # a SIGTERM came: preemption (scancel --signal, `_interrupt`) or a kill
        self.warned = False  # the requeue warning (USR2) came
        self.cause = "SIGTERM"  # what a terminate/interrupt stop came from: SIGTERM | SIGINT | launcher gone

    def start(self) -> None:
        """Record the allocation and take over the warning signals (after submitit installed its own)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        job_id = self.env.job_id
        # which start of this job this is, counted per rank: the ranks start in any order, and a
        # local requeue has no restart count of its own
        self.attempt = sum(
            1
            for e in events.read(self.run_dir)
            if e["event"] == "task" and e.get("rank") == self.rank and e.get("job_id") == job_id
        )
        host = os.environ.get("SLURMD_NODENAME") or self.env.hostname  # emulated nodes share a hostname
        events.record(
            self.run_dir, "task", rank=self.rank, host=host, pid=os.getpid(), job_id=job_id, attempt=self.attempt
        )
        if self.rank == 0:
            events.record(
                self.run_dir,
                "allocation",
                job_id=job_id,
                attempt=self.attempt,
                cluster=self.env.cluster,
                restart=int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0),
                nodes=list(self.env.hostnames),
                num_tasks=self.env.num_tasks,
                environment=events.slurm_environment(),
            )
        for signum in (self.usr_signal, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
            # restart interrupted system calls: a signal must never break a collective in flight
            signal.siginterrupt(signum, False)
        launcher = os.environ.get("TUNEFORGE_LAUNCHER_PID", "")  # launch/submit.py sets it for local jobs
        if self.env.cluster == "local" and launcher.isdigit():
            threading.Thread(target=self._watch_launcher, args=(int(launcher),), daemon=True).start()

    def _on_signal(self, signum: int, frame=None) -> None:
        # Only a flag (and one appended line): collectives and saving happen at the step boundary.
        if signum == signal.SIGINT and self.stop_flag.reason == "interrupt":
            return  # Ctrl-C reaches a local rank twice (the terminal's and the launcher's): one stop
        self.terminated = self.terminated or signum == signal.SIGTERM
        self.warned = self.warned or signum == self.usr_signal
        reason = {self.usr_signal: "requeue", signal.SIGINT: "interrupt"}.get(signum, "terminate")
        if reason != "requeue":
            self.cause = signal.Signals(signum).name
        self.stop_flag.request(reason)
        events.record(self.run_dir, "signal", rank=self.rank, signal=signal.Signals(signum).name)

    def _watch_launcher(self, pid: int) -> None:
        """Stop (as on SIGTERM) once the local launcher that follows this job is gone."""
        while _alive(pid):
            time.sleep(LAUNCHER_CHECK_S)
        self.cause = "launcher gone"
        self.stop_flag.request("terminate")
        events.record(self.run_dir, "launcher_gone", rank=self.rank, pid=pid)

    # ------------------------------------------------------------------ after training returned
    def requeue(self, step: int) -> None:
        """Every rank, after the collective save of a requeue stop: rank 0 requeues, all exit."""
        if self.rank != 0:
            # exit 0 only once rank 0 has decided: srun runs with --kill-on-bad-exit, and an early
            # non-zero exit here would kill rank 0 before its `scontrol requeue`
            self._wait_for_rank0()
            sys.exit(0)
        from submitit.core.utils import UncompletedJobError

        kind = "timeout" if self.timed_out() else "preemption"
        pickle = self.env.paths.submitted_pickle
        delayed, countdown = submitit_compat.requeue_countdown(pickle)  # starts at max_requeues
        left = countdown - 1  # time-outs and preemptions both count
        refused = "" if left >= 0 else f"requeued {self.cluster.max_requeues} times already (cluster.max_requeues)"
        refused = refused or submitit_compat.write_requeue(delayed, pickle, left)  # TrainJob.checkpoint()'s submission
        if refused:
            events.record(self.run_dir, "requeue_refused", kind=kind, step=step, reason=refused, job_id=self.env.job_id)
            raise UncompletedJobError(
                f"{kind} at step {step}: not requeued because {refused}. The checkpoint of step {step} is in "
                f"{self.run_dir}; submit again with run.dir={self.run_dir} to continue"
            )
        events.record(self.run_dir, "requeue", kind=kind, step=step, requeues_left=left, job_id=self.env.job_id)
        print(
            f"tuneforge: {kind} at step {step}: checkpoint saved, job {self.env.job_id} requeued "
            f"({left} requeue(s) left)",
            file=sys.stderr,
            flush=True,
        )
        submitit_compat.requeue(self.env, left)  # Slurm: scontrol requeue; local: exit 144, the controller restarts us
        sys.exit(-1)

    def stop(self, step: int, reason: str = "terminate") -> None:
        """Every rank, after the collective save of a SIGTERM (or Ctrl-C) stop: exit without a result,
        unless the requeue warning follows a SIGTERM at once (submitit's preemption), in which case
        rank 0 requeues."""
        if self.rank != 0:
            self._wait_for_rank0()
            sys.exit(0)  # the checkpoint is complete; see requeue() for why 0
        interrupted = reason == "interrupt"
        if not interrupted and not self.warned and self._signalled_only():
            deadline = time.time() + WARNING_AFTER_TERM_S
            while not self.warned and time.time() < deadline:
                time.sleep(0.1)
        if self.warned and not interrupted:
            self.requeue(step)  # does not return
        cause = "SIGINT" if interrupted else self.cause
        signal_name = "SIGINT" if interrupted else "SIGTERM"
        events.record(self.run_dir, "stopped", step=step, signal=signal_name, cause=cause, job_id=self.env.job_id)
        print(f"tuneforge: {cause} at step {step}: checkpoint saved, exiting", file=sys.stderr, flush=True)
        sys.exit(128 + (signal.SIGINT if interrupted else signal.SIGTERM))

    def _signalled_only(self) -> bool:
        """Whether the job still runs as far as Slurm knows: a SIGTERM sent with `scancel --signal` (as
        submitit's preemption does), not a cancel or requeue, which end the job at once."""
        if self.env.cluster != "slurm":
            return False
        try:
            state = subprocess.run(
                ["squeue", "-h", "-j", self.env.job_id, "-o", "%T"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return False
        return state == "RUNNING"

    def timed_out(self) -> bool:
        """Time limit or preemption? A SIGTERM before the warning means preemption (a time limit sends
        only the warning, then SIGTERM at the limit itself); else Slurm's time left, or the local clock."""
        if self.terminated:
            return False
        if self.env.cluster == "slurm":
            margin = self.cluster.signal_delay_s + 60  # Slurm warns up to ~30 s early; then the step ends
            left = _slurm_time_left(self.env.job_id)
            if left is not None:
                return left <= margin
        else:
            margin = self.cluster.signal_delay_s + 15  # the local controller warns on time
        return time.time() - self.started >= self.cluster.timeout_min * 60 - margin

    def _wait_for_rank0(self) -> None:
        """Until rank 0 has recorded what becomes of this allocation (or WAIT_FOR_RANK0_S)."""
        deadline = time.time() + WAIT_FOR_RANK0_S
        while time.time() < deadline:
            if any(
                e["event"] in ("requeue", "requeue_refused", "stopped") and e["ts"] >= self.started
                for e in events.read(self.run_dir)
            ):
                return
            time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    try:  # a zombie (killed, not yet reaped) is gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _slurm_time_left(job_id: str) -> Optional[float]:
    """Seconds left before the job's time limit, from squeue; None when Slurm cannot say."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_duration(out)


def parse_duration(text: str) -> Optional[float]:
    """Slurm's [D-]HH:MM:SS / MM:SS durations in seconds; None for UNLIMITED, INVALID, empty."""
    text = text.strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        if not d.isdigit():
            return None
        days = int(d)
    parts = text.split(":")
    if not text or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return days * 86400 + seconds
