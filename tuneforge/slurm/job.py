"""The submitted callable: one object that runs the same way on this machine and on Slurm."""
from __future__ import annotations

from typing import Any, Dict

import submitit


class TrainJob(submitit.helpers.Checkpointable):
    """Run the training task on every rank; requeue itself on time-out or preemption.

    The config carries a fixed `run.dir`, so a requeued or restarted job finds the same run directory
    and resumes from its latest checkpoint: the task always resumes when one exists.
    """

    def __call__(self, cfg: Dict[str, Any]) -> Dict[str, Any]:
        from tuneforge.trainers.task import run

        return run(cfg)

    def checkpoint(self, cfg: Dict[str, Any]) -> submitit.helpers.DelayedSubmission:
        # Called from submitit's USR2 handler on rank 0 just before `scontrol requeue`. Nothing is saved
        # here (a collective save inside a signal handler would hang): the requeued job resumes from
        # the run dir's latest checkpoint.
        return submitit.helpers.DelayedSubmission(TrainJob(), cfg)
