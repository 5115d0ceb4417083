"""Checkpoint layout, written atomically:

    <run dir>/checkpoints/step_N/        engine/ (the backend's state), trainer.json, rng/rank_R.pt,
                                         rank/rank_R.json (per-rank trainer state: the data sampler's position),
                                         plus what the method adds what the method adds (e.g. adapter/ for PEFT methods)
    <run dir>/checkpoints/latest         "step_N", replaced last

Every rank writes into checkpoints/.tmp-step_N; after a barrier rank 0 renames it to step_N and only
then points `latest` at it, so a job killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from tuneforge import fsutil, layout


class Checkpoints:
    def __init__(self, run_dir: Path, rank: int, keep: int):
        self.run_dir = Path(run_dir)
        self.root = layout.checkpoints_dir(run_dir)
        self.rank, self.keep = rank, keep

    def latest(self) -> Optional[Path]:
        return layout.latest(self.run_dir)

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
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "engine").mkdir(parents=True)
            (tmp / "rng").mkdir()
            (tmp / "rank").mkdir()
        dist.barrier()
        engine.save(tmp / "engine")
        torch.save(_rng_state(), tmp / "rng" / f"rank_{self.rank}.pt")
        if rank_state is not None:
            (tmp / "rank" / f"rank_{self.rank}.json").write_text(json.dumps(rank_state))
        if write_extra is not None:
            write_extra(tmp)
        if self.rank == 0:
            (tmp / layout.TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsutil.write_text(self.root / layout.LATEST, final.name)
            self._prune()
        dist.barrier()
        return final

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
        for old in layout.steps(self.run_dir)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


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
