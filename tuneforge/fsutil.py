"""Writing files so that a reader (or a killed writer's successor) sees the old version or the new one,
never half of one. Every file tuneforge rewrites in place goes through here."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (a temporary sibling, flushed, then renamed over it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, value: Any, indent: int = 1) -> None:
    write_text(path, json.dumps(value, indent=indent, default=str) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory `tmp` in place of `final` (which may exist: it is removed first)."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(f".old-{final.name}.{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
