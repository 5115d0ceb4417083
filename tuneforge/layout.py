"""The run directory's layout: where checkpoints live, which are complete, which one a run resumes
from. The one reader for the trainer (resume), `tuneforge export`, `tuneforge status` and the launcher;
trainers/checkpoint.py is the one writer.

    <run dir>/checkpoints/step_N/     one checkpoint; manifest.json, written last, lists every file with
                                      its size and hash: the checkpoint counts only when all match
    <run dir>/checkpoints/.tmp-step_N being written (never read)
    <run dir>/checkpoints/latest      "step_N", replaced after step_N is in place (informative: readers
                                      take the newest complete checkpoint, whatever it says)
    <run dir>/final/                  the Hugging Face model (or adapter) at the end of the run
    <run dir>/owner.json              the job that owns the run dir (slurm/owner.py)

Pure Python: no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer.json"  # in a step dir: step and tokens seen
MANIFEST = "manifest.json"  # in a step dir, written last: {"files": {relative path: {"size", "sha256"}}}
FINAL = "final"
ADAPTER = "adapter"  # in a step dir (PEFT methods): the adapter in peft's format
OWNER = "owner.json"  # in the run dir: the job that trains into it
#: files up to this size are hashed whole; larger ones by their size and the hash of their first and last
#: SAMPLE_BYTES (a truncated or replaced file is caught; a flipped bit inside a large tensor file is not,
#: which would cost reading every checkpoint back in full at each save)
HASH_WHOLE_BYTES = 64 * 2**20
SAMPLE_BYTES = 2**20


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step}"


def step_of(path: Path) -> int:
    return int(Path(path).name[len("step_") :])


# ------------------------------------------------------------------------------------------ manifest
def _digest(path: Path, size: int) -> Tuple[str, bool]:
    """(sha256 hex, sampled): of the whole file, or of its first and last SAMPLE_BYTES when large."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= HASH_WHOLE_BYTES:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
            return h.hexdigest(), False
        h.update(f.read(SAMPLE_BYTES))
        f.seek(size - SAMPLE_BYTES)
        h.update(f.read(SAMPLE_BYTES))
        return h.hexdigest(), True


def _files(directory: Path) -> List[Path]:
    return sorted(p for p in Path(directory).rglob("*") if p.name != MANIFEST and not p.is_dir())


def manifest_of(directory: Path, sync: bool = False) -> dict:
    """The manifest of a finished step directory: every file read back (size, hash). `sync`: also flush
    each file to the disk (the writer's last step before publishing). Raises OSError for a file that
    cannot be read, and ValueError for one that is not a regular file."""
    files: Dict[str, dict] = {}
    for path in _files(directory):
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file")
        digest, sampled = _digest(path, st.st_size)
        if sync:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        files[str(path.relative_to(directory))] = {
            "size": st.st_size,
            "sha256": digest,
            **({"sampled": True} if sampled else {}),
        }
    return {"version": 1, "files": files}


def verify(path: Path) -> Optional[str]:
    """None when the checkpoint at `path` is complete: its manifest is there and every file it lists
    has its size and hash; else why not, in a few words naming the file."""
    path = Path(path)
    if not path.is_dir():
        return "does not exist"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (interrupted while being written, or written before manifests existed)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    if TRAINER_STATE not in listed:
        return f"{MANIFEST} lists no {TRAINER_STATE}"
    for name, want in sorted(listed.items()):
        file = path / name
        try:
            st = file.lstat()
            if not stat.S_ISREG(st.st_mode):
                return f"{name} is not a regular file"
            if st.st_size != want["size"]:
                return f"{name} is {st.st_size} bytes, the manifest says {want['size']} (truncated or replaced)"
            if _digest(file, st.st_size)[0] != want["sha256"]:
                return f"{name} does not match its hash in the manifest (changed after it was written)"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
        except (KeyError, TypeError):
            return f"{MANIFEST} entry of {name} is malformed"
    return None


def is_complete(path: Path) -> bool:
    return verify(path) is None


# ------------------------------------------------------------------------------------------ checkpoints
@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    problem: Optional[str]  # None: complete

    @property
    def complete(self) -> bool:
        return self.problem is None


def checkpoints(run_dir: Path) -> List[Checkpoint]:
    """Every step_N directory of a run, newest first, each verified."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step_") and p.name[5:].isdigit() and p.is_dir()]
    return [Checkpoint(p, step_of(p), verify(p)) for p in sorted(found, key=step_of, reverse=True)]


@dataclass(frozen=True)
class ResumePoint:
    """What a run resumes from: the newest complete checkpoint (None: none), and why each newer one was skipped."""

    path: Optional[Path]
    skipped: Tuple[str, ...]  # "step_N: why", newest first
    damaged_only: bool  # step directories exist but none is complete: starting from step 0 would lose them

    def describe(self) -> str:
        skipped = "; ".join(f"skipped {s}" for s in self.skipped)
        if self.path is None:
            return "no complete checkpoint" + (f" ({skipped})" if skipped else "")
        return f"{self.path.name}" + (f" ({skipped})" if skipped else "")


def resume_point(run_dir: Path) -> ResumePoint:
    every = checkpoints(run_dir)
    pointer = _pointer(run_dir)
    skipped = []
    if pointer and not (checkpoints_dir(run_dir) / pointer).is_dir():
        skipped.append(f"{LATEST}: names {pointer[:40]!r}, which does not exist")
    for ckpt in every:
        if ckpt.complete:
            return ResumePoint(ckpt.path, tuple(skipped), False)
        skipped.append(f"{ckpt.path.name}: {ckpt.problem}")
    return ResumePoint(None, tuple(skipped), bool(every))


def _pointer(run_dir: Path) -> Optional[str]:
    try:
        return (checkpoints_dir(run_dir) / LATEST).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def latest(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint (whatever the `latest` pointer says), or None."""
    return resume_point(run_dir).path


def steps(run_dir: Path) -> List[Path]:
    """The complete checkpoints of a run, oldest first."""
    return [c.path for c in reversed(checkpoints(run_dir)) if c.complete]
