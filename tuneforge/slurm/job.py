"""The submitted callable: one object that runs the same way on this machine and on Slurm.

It builds what the task is handed (the distributed environment from submitit, a stop flag that the
signal handlers set) and calls the task; the task knows nothing of Slurm.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import submitit

from tuneforge.conf.schema import Config


class TrainJob(submitit.helpers.Checkpointable):
    """Run the training task on every rank; requeue itself on time-out or preemption.

    The config carries a fixed `run.dir`, so a requeued or restarted job finds the same run directory
    and resumes from its latest checkpoint: the task always resumes when one exists. How a stop
    becomes a requeue is in slurm/requeue.py; what happened is appended to <run dir>/events.jsonl.
    """

    def __call__(self, cfg: Config) -> Dict[str, Any]:
        from tuneforge.slurm import events, owner
        from tuneforge.slurm.env import dist_env
        from tuneforge.slurm.requeue import Allocation
        from tuneforge.trainers.task import StopFlag, run

        # A W&B service token inherited from the submitting process points at that process's wandb-core
        # (another machine, or long gone): wandb would connect to it and fail. Each task starts its own.
        os.environ.pop("WANDB_SERVICE", None)
        run_dir = cfg.run.dir
        stop = StopFlag()
        allocation = Allocation(run_dir, cfg.cluster, stop)
        allocation.start()

        def phase(name: str, detail: str = "") -> None:  # start-up phases, shown by the launcher
            if allocation.rank == 0:
                events.record(run_dir, "phase", phase=name, detail=detail, job_id=allocation.env.job_id)

        try:
            # one run, one directory: another live job owning it fails this one before it trains
            owner.take(run_dir, allocation.env.job_id, cfg.cluster.name, write=allocation.rank == 0)
            result = run(cfg, dist_env(cfg.cluster), stop, phase)
        except Exception as e:  # recorded for `tuneforge status`, then raised to submitit (result pickle)
            message = (str(e).strip().splitlines() or [""])[0][:300]
            events.record(
                run_dir,
                "failed",
                rank=allocation.rank,
                job_id=allocation.env.job_id,
                attempt=allocation.attempt,
                error=f"{type(e).__name__}: {message}",
            )
            raise
        if result["stopped"] in ("requeue", "terminate", "interrupt") and allocation.rank == 0:
            events.record(run_dir, "checkpoint", step=result["step"], reason=result["stopped"])
        if result["stopped"] == "requeue":
            allocation.requeue(result["step"])  # does not return
        if result["stopped"] in ("terminate", "interrupt"):
            allocation.stop(result["step"], result["stopped"])  # does not return
        if allocation.rank == 0:
            events.record(
                run_dir,
                "completed" if result["stopped"] is None else "stopped",
                step=result["step"],
                loss=result.get("loss"),
                reason=result["stopped"],
                job_id=allocation.env.job_id,
            )
        return result

    def checkpoint(self, cfg: Config) -> submitit.helpers.DelayedSubmission:
        # What a requeue runs next: the same task and config. Called by submitit's `_checkpoint` from
        # Allocation.requeue on rank 0, after every rank saved collectively (never in a signal handler).
        return submitit.helpers.DelayedSubmission(TrainJob(), cfg)
