"""Datasets written for this project and shipped with it (see the README's data section)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

HERE = Path(__file__).parent
EXTENSIONS = (".txt", ".jsonl", ".json")


def bundled(name: str) -> Optional[Path]:
    """The shipped file called `name` (demo_corpus, demo_instruct, ...), or None."""
    for ext in EXTENSIONS:
        path = HERE / f"{name}{ext}"
        if path.is_file():
            return path
    return None


def resolve_path(path: str) -> Path:
    """A path as given (expanded, absolute); a bare name that is no such path but a bundled file's
    name (general_validation) is that file."""
    given = Path(path).expanduser()
    if not given.exists() and "/" not in path and bundled(path) is not None:
        return bundled(path)
    return given.resolve()


def resolve(path: Optional[str], name: str) -> Optional[Path]:
    """The data a config points at: its explicit path, else the bundled file of that name."""
    if path:
        return Path(path).expanduser().resolve()
    return bundled(name)
