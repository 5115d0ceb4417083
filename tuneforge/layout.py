"""The run directory's layout: where checkpoints live and which one is the latest. One reader for
the trainer (resume), `tuneforge export` and `tuneforge status`.

    <run dir>/checkpoints/step_N/     one checkpoint (trainer.json written last of its files)
    <run dir>/checkpoints/latest      "step_N", replaced after step_N is in place
    <run dir>/final/                  the Hugging Face model (or adapter) at the end of the run

Pure Python: no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer.json"  # in a step dir: step and tokens seen; its presence marks the checkpoint complete
FINAL = "final"
ADAPTER = "adapter"  # in a step dir (PEFT methods): the adapter in peft's format


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step}"


def step_of(path: Path) -> int:
    return int(Path(path).name[len("step_") :])


def is_complete(path: Path) -> bool:
    return (Path(path) / TRAINER_STATE).is_file()


def steps(run_dir: Path) -> List[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit() and is_complete(p)]
    return sorted(found, key=step_of)


def latest(run_dir: Path) -> Optional[Path]:
    """The checkpoint the `latest` pointer names, when it is complete; else None."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    return path if is_complete(path) else None
