"""Checkpoints, written so that only a complete one ever counts (the reader is tuneforge/layout.py):

    <run dir>/checkpoints/step_N/        engine/ (the backend's state), trainer.json, rng/rank_R.pt,
                                         rank/rank_R.json (per-rank trainer state: the data sampler's position),
                                         plus what the method adds (e.g. adapter/ for PEFT methods),
                                         manifest.json (every file's size and hash), written last
    <run dir>/checkpoints/latest         "step_N", replaced after step_N is in place

Every rank writes into checkpoints/.tmp-step_N; the ranks agree that every write succeeded; rank 0
reads every file back into the manifest (and flushes them to the disk), writes the manifest, renames
the directory to step_N and only then points `latest` at it. A job killed at any moment, or a write
that fails (a full disk), leaves the previous complete checkpoint as it was: the failure ends the job
on every rank with one line saying what happened and which checkpoint is kept. A complete checkpoint is
never overwritten, and pruning keeps the newest `keep` complete ones.

Resume takes the newest complete checkpoint (rank 0 decides for all), says which, and why it skipped
any newer one; when step directories exist but none is complete it refuses to start from step 0.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from tuneforge import fsutil, layout

#: below this much free space after a failed write, the failure is reported as a full disk
DISK_FULL_BYTES = 16 * 2**20


class CheckpointError(RuntimeError):
    """No checkpoint could be written, or none can be resumed: one line saying why and what is kept."""


class Checkpoints:
    def __init__(self, run_dir: Path, rank: int, keep: int):
        self.run_dir = Path(run_dir)
        self.root = layout.checkpoints_dir(run_dir)
        self.rank, self.keep = rank, keep

    def latest(self) -> Optional[Path]:
        """Collective: the checkpoint to resume from (rank 0 verifies and decides for every rank)."""
        point = layout.resume_point(self.run_dir) if self.rank == 0 else None
        point = _broadcast(point)
        if point.damaged_only:
            raise CheckpointError(
                f"{self.root} holds checkpoints but none is complete ({'; '.join(point.skipped)}); not starting "
                "from step 0 over them: move the damaged ones away (or checkpoints/ for a fresh start) and submit again"
            )
        if self.rank == 0 and point.skipped:
            print(f"resuming from {point.describe()}", flush=True)
        return point.path

    def save(
        self,
        step: int,
        engine,
        trainer_state: dict,
        rank_state: Optional[dict] = None,
        write_extra: Optional[Callable[[Path], None]] = None,
    ) -> Path:
        """Collective. `rank_state`: this rank's own trainer state (the data position); `write_extra(dir)`,
        called on every rank, adds files (a method's adapter) to the checkpoint before it is published."""
        final, tmp = layout.step_dir(self.run_dir, step), self.root / f".tmp-step_{step}"
        # A failure is kept as its one-line description only: the exception's traceback would keep the
        # half-written file open, and on a full disk its space, which the error report itself needs.
        failure = None
        if self.rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                for sub in ("engine", "rng", "rank"):
                    (tmp / sub).mkdir(parents=True)
            except OSError as e:
                failure = self._describe(step, e)
        self._agree(tmp, failure)
        try:
            engine.save(tmp / "engine")
            torch.save(_rng_state(), tmp / "rng" / f"rank_{self.rank}.pt")
            if rank_state is not None:
                (tmp / "rank" / f"rank_{self.rank}.json").write_text(json.dumps(rank_state))
            if write_extra is not None:
                write_extra(tmp)
            if self.rank == 0:
                (tmp / layout.TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
            failure = self._describe(step, e)
        self._agree(tmp, failure)
        if self.rank == 0:
            try:
                self._publish(tmp, final)
            except Exception as e:  # noqa: BLE001
                failure = self._describe(step, e)
        self._agree(tmp, failure)
        if self.rank == 0:
            self._prune()
        dist.barrier()
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rank 0: manifest last, rename, then the pointer. A complete step_N is kept as it is."""
        manifest = layout.manifest_of(tmp, sync=True)  # every file read back and flushed
        fsutil.write_json(tmp / layout.MANIFEST, manifest)
        if final.exists() and layout.is_complete(final):
            shutil.rmtree(tmp, ignore_errors=True)  # the same step, already complete: never overwritten
        else:
            fsutil.replace_dir(tmp, final)  # a damaged step_N of an earlier attempt is replaced
        _sync_dir(self.root)
        fsutil.write_text(self.root / layout.LATEST, final.name)

    def _agree(self, tmp: Path, failure: Optional[str]) -> None:
        """Collective: raise CheckpointError on every rank when any rank failed (its own words, once)."""
        every: List[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(every, failure)
        failed = [(r, m) for r, m in enumerate(every) if m is not None]
        if not failed:
            return
        gc.collect()  # close what the failed write left open (its space is needed for the error report)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial checkpoint took
        rank, message = failed[0]
        kept = layout.latest(self.run_dir)
        raise CheckpointError(
            f"{message} (rank {rank}); the last complete checkpoint, "
            + (f"{kept.name}, is kept" if kept else "none yet, is unchanged")
            + f"; submit again with run.dir={self.run_dir} to resume once fixed"
        )

    def _describe(self, step: int, failure: BaseException) -> str:
        if _disk_full(failure, self.root, writing=True):
            try:
                free = shutil.disk_usage(self.root).free
            except OSError:
                free = 0
            return f"checkpoint of step {step} not written: no space left on the disk of {self.root} ({free // 2**20} MiB free)"
        text = (str(failure).strip().splitlines() or [""])[0][:200]
        return f"checkpoint of step {step} not written: {type(failure).__name__}: {text}"

    def load(self, path: Path, engine) -> dict:
        engine.load(path / "engine")
        rng = path / "rng" / f"rank_{self.rank}.pt"
        if rng.is_file():  # absent when the world size changed: the data order does not depend on it
            _set_rng_state(torch.load(rng, weights_only=False))
        state = json.loads((path / layout.TRAINER_STATE).read_text())
        mine = path / "rank" / f"rank_{self.rank}.json"
        if mine.is_file():  # absent for a rank that did not exist when it was written
            state.update(json.loads(mine.read_text()))
        return state

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints (damaged ones are left for the user to look at)."""
        for old in layout.steps(self.run_dir)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def disk_full(error: BaseException, run_dir: Path) -> Optional[CheckpointError]:
    """For a write that failed for want of space anywhere in the task (metrics, logs, the final model):
    the one-line error to end the job with, saying which checkpoint is kept; None for other errors."""
    if not _disk_full(error, Path(run_dir)) or isinstance(error, CheckpointError):
        return None
    kept = layout.latest(run_dir)
    return CheckpointError(
        f"no space left on the disk of {run_dir} ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}); "
        + (f"the last complete checkpoint, {kept.name}, is kept" if kept else "no checkpoint was written yet")
        + f"; free space and submit again with run.dir={run_dir} to resume"
    )


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _disk_full(failure: BaseException, where: Path, writing: bool = False) -> bool:
    """A write failed for want of space: ENOSPC/EDQUOT anywhere in the chain, or (torch.save's errors
    carry no errno: "file write failed", "unexpected pos ...") hardly any space left where it was
    writing; `writing`: the failure is known to come from a write."""
    e: Optional[BaseException] = failure
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    if not (writing or isinstance(failure, OSError) or "write" in str(failure).lower()):
        return False  # not a write that failed
    try:
        return shutil.disk_usage(where).free < DISK_FULL_BYTES
    except OSError:
        return False


def _sync_dir(path: Path) -> None:
    """Flush a directory's entries (the rename) to the disk; best effort where the filesystem refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
