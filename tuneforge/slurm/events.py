"""<run dir>/events.jsonl: what happened to a job, one JSON line per event, appended by every rank.

The record that `tuneforge status` and `tuneforge logs` read, next to metrics.jsonl:

    allocation   rank 0, at every start: job id, restart count, nodes and the Slurm environment
    task         every rank, at every start: rank, host, pid (so a rank can be found and signalled)
    phase        rank 0, as each start-up step begins: process group, tokenizer, data, model, backend,
                 first step (what the launcher shows while it follows a run)
    signal       a rank received SIGUSR2 (time limit / preemption warning), SIGTERM or SIGINT (Ctrl-C)
    launcher_gone  a local rank's launcher died: it stops as on SIGTERM
    checkpoint   rank 0: the checkpoint written because of a stop request (step, reason)
    requeue      rank 0: the job requeued itself (kind: timeout | preemption, requeues left)
    requeue_refused   rank 0: max_requeues reached or the checkpoint function declined
    stopped      rank 0: stopped after saving: on SIGTERM (scancel, `scontrol requeue`, hard time limit,
                 `tuneforge cancel`), Ctrl-C (cause SIGINT), a vanished launcher, or debug.stop_after (reason)
    completed    rank 0: training reached max_steps
    failed       any rank: the exception that ended it (type and message)

Lines are short and written with one append each, so ranks writing at once do not interleave.
Only SLURM_* and SUBMITIT_* variables are recorded, and never one whose name says it is a credential.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Dict, List

FILE = "events.jsonl"
_CREDENTIAL = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def record(run_dir, event: str, **fields) -> None:
    """Append one event. Never raises: the record must not be what stops a training run."""
    line = json.dumps(
        {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "ts": round(time.time(), 3), "event": event, **fields}, default=str
    )
    try:
        fd = os.open(Path(run_dir) / FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def read(run_dir) -> List[dict]:
    """Every event of the run dir, oldest first; torn lines (a killed writer) are skipped."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out


def slurm_environment() -> Dict[str, str]:
    """The scheduler's view of this allocation: SLURM_* and SUBMITIT_* variables, credentials left out."""
    return {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith(("SLURM_", "SUBMITIT_")) and not _CREDENTIAL.search(k)
    }
