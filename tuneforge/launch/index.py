"""The user's index of runs: one JSON line per submission, so `tuneforge status` finds a run wherever it
was written (run.dir=/scratch/..., another working directory, a sweep).

    $TUNEFORGE_HOME/runs.jsonl     (TUNEFORGE_HOME defaults to ~/.cache/tuneforge)

Each line: time, path (a run dir or a sweep dir), kind ("run" | "sweep"), command. Appended at
submission; a run dir that no longer exists is skipped when reading.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import List, Optional, Sequence

HOME_VARIABLE = "TUNEFORGE_HOME"
FILE = "runs.jsonl"


def home() -> Path:
    return Path(os.environ.get(HOME_VARIABLE) or "~/.cache/tuneforge").expanduser()


def add(path: Path, kind: str, argv: Sequence[str]) -> None:
    """Append a submission. Never raises: the index must not be what stops a submission."""
    line = json.dumps(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "ts": round(time.time(), 3),
            "path": str(Path(path).resolve()),
            "kind": kind,
            "command": "tuneforge " + " ".join(shlex.quote(a) for a in argv),
        }
    )
    try:
        home().mkdir(parents=True, exist_ok=True)
        with open(home() / FILE, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass


def entries() -> List[dict]:
    """Every indexed submission whose directory still exists, newest last (a path once, at its newest)."""
    try:
        lines = (home() / FILE).read_text().splitlines()
    except OSError:
        return []
    newest = {}
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "path" in entry:
            newest.pop(entry["path"], None)
            newest[entry["path"]] = entry
    return [e for e in newest.values() if _exists(Path(e["path"]), e.get("kind"))]


def newest() -> Optional[Path]:
    found = entries()
    return Path(found[-1]["path"]) if found else None


def _exists(path: Path, kind: Optional[str]) -> bool:
    return (path / ("sweep.json" if kind == "sweep" else "submit.json")).is_file()
