"""`tuneforge cancel <run or sweep dir>`: every rank saves a checkpoint first (SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import List

from tuneforge.commands import Parser, runinfo
from tuneforge.launch import sweep
from tuneforge.slurm import events


def main(args: List[str]) -> int:
    p = Parser(
        "cancel",
        "Cancel a run's job, or a sweep's whole array. Each rank saves a checkpoint first "
        "(SIGTERM); submit again with the same run.dir to continue.",
    )
    p.add_argument("path", type=Path)
    opts = p.parse_args(args)
    path = opts.path.expanduser().resolve()
    infos = runinfo.gather(runinfo.run_dirs(path))
    live = [i for i in infos if i.job and i.state not in runinfo.FINAL_STATES]
    if not live:
        print(f"nothing to cancel: {', '.join(sorted({i.state for i in infos}))}")
        return 0
    slurm_ids = {i.job.job_id for i in live if i.job.cluster == "slurm"}
    if sweep.is_sweep_dir(path) and sweep.read(path).get("array_job_id"):
        slurm_ids = {sweep.read(path)["array_job_id"]} if slurm_ids else set()  # the whole array at once
    for job_id in sorted(slurm_ids):
        subprocess.run(["scancel", job_id], check=True, timeout=60)
        print(f"cancelled Slurm job {job_id}")
    for info in live:
        events.record(info.run_dir, "cancel", job_id=info.job.job_id, by="tuneforge cancel")
        if info.job.cluster == "local":
            # the local controller forwards SIGTERM to its tasks: they save and exit like on Slurm
            os.kill(int(info.job.job_id), signal.SIGTERM)
            print(f"cancelled local job {info.job.job_id} ({info.run_dir})")
    return 0
