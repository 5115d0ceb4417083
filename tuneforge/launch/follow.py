"""Following a submitted job in the foreground (cluster=local always, Slurm with --wait): progress,
Ctrl-C, and the outcome as an exit code.

Ctrl-C on a local run stops it the way a SIGTERM stops a Slurm job: the launcher prints one line and
sends SIGINT to every rank (their handler only sets the stop flag, reason "interrupt"); at the step
boundary the ranks save a checkpoint together and exit; the launcher exits 130 and the same command
resumes. A second Ctrl-C kills the ranks at once (the last complete checkpoint stays). The terminal's
own SIGINT never reaches submitit's controller: it is started with SIGINT ignored (launch/submit.py),
since it would kill its tasks a second later. A SIGTERM or SIGHUP to the launcher is forwarded to the
controller (every rank saves, as `tuneforge cancel` does), and ranks whose launcher vanished without a
word (SIGKILL) stop by themselves (slurm/requeue.py watches it): no orphan outlives its launcher.

With --wait on Slurm, Ctrl-C only stops the waiting: the job keeps its allocation.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

from tuneforge import layout
from tuneforge.launch.progress import Progress, last_step
from tuneforge.slurm import events

POLL_S = 0.5
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's code for Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM


class _Signals:
    """Counts SIGINT and notes SIGTERM/SIGHUP while following (main thread only: elsewhere, nothing)."""

    CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.interrupts, self.terminated, self.previous = 0, False, {}

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.CAUGHT:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
        else:
            self.terminated = True


def follow(job, run_dir: Path, max_steps: int, cluster: str) -> int:
    """Wait for the job, showing its progress; its outcome as an exit code (0: every task succeeded)."""
    run_dir = Path(run_dir)
    progress = Progress(run_dir, max_steps, str(job.job_id))
    local = cluster == "local"
    announced = forwarded_term = False
    with _Signals() as signals:
        while not job.done():
            progress.poll()
            if signals.interrupts and not local:
                progress.close()
                print(f"stopped waiting; job {job.job_id} keeps running: tuneforge cancel {run_dir}", file=sys.stderr)
                return EXIT_INTERRUPTED
            if signals.interrupts >= 2:
                _kill(int(job.job_id), run_dir)
                progress.close()
                latest = layout.latest(run_dir)
                kept = f"checkpoint {latest.name} stays" if latest is not None else "no checkpoint yet"
                print(f"stopped at once: {kept}; to resume: tuneforge --config {run_dir}", file=sys.stderr)
                return EXIT_INTERRUPTED
            if signals.interrupts == 1:
                if not announced:
                    announced = True
                    progress.say("stopping: saving a checkpoint (Ctrl-C again to stop at once)")
                for pid in ranks_of(int(job.job_id), run_dir):  # again each poll: a rank still starting ignores it
                    _send(pid, signal.SIGINT)
            if signals.terminated and local and not forwarded_term:
                forwarded_term = True
                progress.say("terminated: the ranks save a checkpoint, then stop")
                _send(int(job.job_id), signal.SIGTERM)  # submitit's controller forwards it to every rank
            time.sleep(POLL_S)
        progress.poll()
        progress.close()
        return outcome(job, run_dir)


def outcome(job, run_dir: Path) -> int:
    """Print how the job ended and return its exit code: 0 done (or stopped by debug.stop_after),
    130 stopped by Ctrl-C, 143 by SIGTERM or `tuneforge cancel`, 1 failed."""
    from tuneforge.launch.submit import task_error

    result = _result(job)
    if result is not None and result[0] == "success":
        main = result[1]
        stopped = f" (stopped: {main['stopped']})" if main.get("stopped") else ""
        if main.get("probe"):  # a probe candidate (trainers/probe.py): batches scored, not steps trained
            print(f"done: {main['step']} batch(es) per rank scored{stopped}{_bits_per_byte(main)}", flush=True)
            return 0
        print(f"done: step {main['step']}, loss {main['loss']:.4f}{stopped}", flush=True)
        if not stopped:
            _show_before_after(run_dir)
        return 0
    mine = [e for e in events.read(run_dir) if e.get("job_id") == str(job.job_id)]
    stop = next((e for e in reversed(mine) if e["event"] == "stopped"), None)
    if stop is not None:
        cause = stop.get("cause") or stop.get("signal", "SIGTERM")
        latest = layout.latest(run_dir)
        saved = f"checkpoint {latest.name} saved" if latest is not None else "no checkpoint"
        print(
            f"stopped at step {stop.get('step')} ({cause}): {saved}; to resume: tuneforge --config {run_dir}",
            flush=True,
        )
        return EXIT_INTERRUPTED if cause == "SIGINT" else EXIT_TERMINATED
    try:
        job.results()
    except Exception as e:  # noqa: BLE001 - the task's traceback is in its log; show its last line
        print(f"job {job.job_id} failed: {task_error(str(e))}", file=sys.stderr)
        print(f"logs: {job.paths.stdout.parent}", file=sys.stderr)
        return 1
    step, loss = last_step(run_dir / "metrics.jsonl")
    print(f"done: step {step}" + (f", loss {loss:.4f}" if loss is not None else ""), flush=True)
    return 0


def _bits_per_byte(result: dict) -> str:
    sets = [(name, (result.get(name) or {}).get("bits_per_byte")) for name in ("domain", "general")]
    return "".join(f", {name} {bpb:.3f} bits/byte" for name, bpb in sets if bpb is not None)


def _show_before_after(run_dir: Path) -> None:
    """The run's answers and held-out loss before and after (what `tuneforge compare <run dir>` shows)."""
    from tuneforge.commands.compare import before_after

    text = before_after(run_dir)
    if text:
        print(text, flush=True)


def _result(job):
    """(outcome, value) of rank 0's result pickle, or None when it wrote none."""
    path = job.paths.result_pickle
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception:  # noqa: BLE001 - absent or half-written
        return None


def ranks_of(controller: int, run_dir: Path) -> List[int]:
    """The pids of a local job's ranks: the controller's children (Linux /proc), else the pids its
    ranks recorded (events.jsonl)."""
    children = _children(controller)
    if children is not None:
        return children
    return [e["pid"] for e in events.read(run_dir) if e["event"] == "task" and e.get("job_id") == str(controller)]


def _children(pid: int) -> Optional[List[int]]:
    proc = Path("/proc")
    if not (proc / str(os.getpid()) / "stat").is_file():
        return None
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry.name))
    return out


def _kill(controller: int, run_dir: Path) -> None:
    """SIGKILL a local job's ranks, then its controller."""
    for pid in ranks_of(controller, run_dir):
        _send(pid, signal.SIGKILL)
    _send(controller, signal.SIGKILL)


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (OSError, ValueError):
        pass
