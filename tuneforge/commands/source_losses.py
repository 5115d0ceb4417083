"""The line `tuneforge status` adds under a mixture run (data.sources): per source, its share of the
target tokens seen so far and its validation loss, the latest beside the first, so that the domain
loss falling and the general loss holding (or rising: forgetting) read at a glance:

    sources <run>: demo_corpus 75.0% of tokens, eval 3.912 (first 6.231) | general_corpus 25.0%, eval 4.407 (first 6.229)

Read from metrics.jsonl (tokens_seen/<name>, eval_loss/<name>): its first lines up to the first
evaluation and its tail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

HEAD_LINES = 1000  # the first evaluation is looked for this far into the file
TAIL_BYTES = 64 * 1024


def line(run_dir: Path, label: str) -> Optional[str]:
    """The sources line of a run, or None (not a mixture, or nothing logged yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    tail = _records(_tail(path))
    tokens = next((r for r in reversed(tail) if any(k.startswith("tokens_seen/") for k in r)), None)
    if tokens is None:
        return None
    last_eval = next((r for r in reversed(tail) if any(k.startswith("eval_loss/") for k in r)), {})
    first_eval = _first_eval(path)
    seen = {k.split("/", 1)[1]: v for k, v in tokens.items() if k.startswith("tokens_seen/")}
    total = sum(seen.values()) or 1
    parts = []
    for i, (name, n) in enumerate(seen.items()):
        text = f"{name} {100 * n / total:.1f}%" + (" of tokens" if i == 0 else "")
        now, then = last_eval.get(f"eval_loss/{name}"), first_eval.get(f"eval_loss/{name}")
        if now is not None:
            text += f", eval {now:.3f}" + (f" (first {then:.3f})" if then is not None else "")
        parts.append(text)
    return f"sources {label}: " + " | ".join(parts)


def _first_eval(path: Path) -> Dict[str, float]:
    with open(path, encoding="utf-8") as f:
        for i, text in enumerate(f):
            if i >= HEAD_LINES:
                break
            if '"eval_loss/' in text:
                records = _records(text)
                return records[0] if records else {}
    return {}


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - TAIL_BYTES))
        return f.read().decode(errors="replace")


def _records(text: str) -> List[dict]:
    out = []
    for raw in text.splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue  # the first line of a tail may be cut
        if isinstance(record, dict):
            out.append(record)
    return out
