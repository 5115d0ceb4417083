"""submitit's internals that tuneforge needs (submitit has no public API for these).

- the sbatch text an executor would submit (for --dry-run and the golden-file test);
- the requeue pieces its own USR2 handler uses (the submission pickle's countdown, `_checkpoint`,
  the environment's `_requeue` and signal), which tuneforge calls after a collective save instead of
  inside the signal handler;
- the paths of a job's files, and the cached sacct states of many jobs in one call.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Dict, List, Tuple


def sbatch_text(executor) -> str:
    """The sbatch script `executor` would submit next, with the job id left as %j."""
    return executor._make_submission_file_text(executor._submitit_command_str, uid="%j")


def script_only_slurm_executor():
    """submitit's SlurmExecutor class, less its check that `srun` is on this machine: for writing the
    sbatch text (--dry-run) anywhere, never for submitting."""
    import submitit

    class ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1

    return ScriptOnlySlurmExecutor


def usr_signal(job_env) -> signal.Signals:
    """The warning signal submitit asked Slurm for (sbatch --signal), USR2 by default."""
    return job_env._usr_sig()


def requeue_countdown(submission_pickle: Path):
    """(the pickled DelayedSubmission submitit will run, the requeues it still allows)."""
    from submitit.core.utils import DelayedSubmission

    delayed = DelayedSubmission.load(submission_pickle)
    return delayed, delayed._timeout_countdown


def write_requeue(delayed, submission_pickle: Path, countdown: int) -> str:
    """Re-dump the submission for the requeue from the job's `checkpoint()` (submitit's own step);
    returns "" when done, else why not."""
    from submitit.core.job_environment import _checkpoint

    return _checkpoint(delayed, submission_pickle, countdown) or ""


def requeue(job_env, countdown: int) -> None:
    """Slurm: `scontrol requeue` this job; local executor: exit 144, which its controller restarts."""
    job_env._requeue(countdown)


def job_paths(folder: Path, job_id: str, rank: int = 0):
    from submitit.core.utils import JobPaths

    return JobPaths(Path(folder), job_id=job_id, task_id=rank)


def slurm_states(jobs: List[Tuple[Path, str]]) -> Dict[str, str]:
    """job id -> Slurm state (first word: "CANCELLED by 0" -> CANCELLED) of (folder, job id) pairs,
    from one sacct call through submitit's watcher."""
    import submitit

    handles = [submitit.SlurmJob(folder=folder, job_id=job_id) for folder, job_id in jobs]  # registers each id
    # Forget cached final states: job ids restart at 1 when a (test) cluster is recreated.
    submitit.SlurmJob.watcher.clear()
    submitit.SlurmJob.watcher.update()
    return {h.job_id: (h.watcher.get_state(h.job_id, mode="cache").split() or ["UNKNOWN"])[0] for h in handles}
