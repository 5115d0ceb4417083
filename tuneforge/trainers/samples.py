"""<run dir>/samples.jsonl: what the model answered, and the before/after table made from it.

One line per prompt per evaluation: {"step", "index", "prompt", "reference", "answer", "reference_loss"}
(step 0: before any training, with train.eval_on_start; then every evaluation and the end). Written by
rank 0 through trainers/logging.py (truncated on resume like metrics.jsonl); read here by the run's
end, `tuneforge compare` and the launcher. The held-out loss before and after comes from metrics.jsonl
(`eval_loss` at step 0 and at the last evaluation).

Pure Python: the CLI reads it without torch.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

SAMPLES = "samples.jsonl"
COLUMNS = ("prompt", "reference", "answer_before", "answer_after", "reference_loss_before", "reference_loss_after")


def read(run_dir: Path) -> List[dict]:
    """Every complete line of samples.jsonl (a line torn by a killed job is skipped)."""
    path = Path(run_dir) / SAMPLES
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


@dataclass
class Paired:
    """A run's answers before (its first step sampled) and after (its last)."""

    run_dir: Path
    before_step: Optional[int] = None
    after_step: Optional[int] = None
    rows: List[dict] = field(default_factory=list)  # COLUMNS
    eval_loss_before: Optional[float] = None
    eval_loss_after: Optional[float] = None


def paired(run_dir: Path) -> Paired:
    """The before/after table of a run from its samples.jsonl and metrics.jsonl."""
    run_dir = Path(run_dir)
    out = Paired(run_dir)
    samples = read(run_dir)
    by_step: Dict[int, Dict[int, dict]] = {}
    for row in samples:
        by_step.setdefault(int(row["step"]), {})[int(row["index"])] = row
    if by_step:
        out.before_step, out.after_step = min(by_step), max(by_step)
        before, after = by_step[out.before_step], by_step[out.after_step]
        for index in sorted(set(before) | set(after)):
            b, a = before.get(index, {}), after.get(index, {})
            first = b or a
            out.rows.append(
                {
                    "prompt": first.get("prompt"),
                    "reference": first.get("reference"),
                    "answer_before": b.get("answer"),
                    "answer_after": a.get("answer"),
                    "reference_loss_before": b.get("reference_loss"),
                    "reference_loss_after": a.get("reference_loss"),
                }
            )
    losses = _eval_losses(run_dir / "metrics.jsonl")
    if losses:
        out.eval_loss_before, out.eval_loss_after = losses[min(losses)], losses[max(losses)]
    return out


def _eval_losses(path: Path) -> Dict[int, float]:
    if not path.is_file():
        return {}
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("eval_loss"), (int, float)):
            found[int(record["step"])] = float(record["eval_loss"])
    return found


def _loss(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _wrap(label: str, text: Optional[str], width: int) -> List[str]:
    body = "(none)" if text is None else (text or "(empty)")
    lines = textwrap.wrap(body, width=max(20, width - len(label)), break_long_words=True) or [""]
    pad = " " * len(label)
    return [label + lines[0]] + [pad + line for line in lines[1:]]


def render(p: Paired, width: int = 100) -> str:
    """The before/after table as text: per prompt, the reference and both answers with their losses."""
    if not p.rows and p.eval_loss_before is None:
        return f"{p.run_dir}: no samples.jsonl and no validation loss (nothing to compare)"
    lines = []
    if p.eval_loss_before is not None:
        lines.append(
            f"held-out loss: {_loss(p.eval_loss_before)} before -> {_loss(p.eval_loss_after)} after"
            + (
                ""
                if p.eval_loss_before is None or p.eval_loss_after is None
                else f" ({p.eval_loss_after - p.eval_loss_before:+.3f})"
            )
        )
    for i, row in enumerate(p.rows, 1):
        lines += _wrap(f"[{i}] ", row["prompt"], width)
        if row["reference"] is not None:
            lines += _wrap("    reference:  ", row["reference"], width)
        lines += _wrap(
            f"    before (step {p.before_step}, reference loss {_loss(row['reference_loss_before'])}): ",
            row["answer_before"],
            width,
        )
        if p.after_step != p.before_step:
            lines += _wrap(
                f"    after (step {p.after_step}, reference loss {_loss(row['reference_loss_after'])}): ",
                row["answer_after"],
                width,
            )
    return "\n".join(lines)


def render_side_by_side(runs: List[Paired], width: int = 100) -> str:
    """Several runs: per prompt (matched by its text), the first run's answer before, then each run's after."""
    lines = []
    for p in runs:
        lines.append(
            f"{p.run_dir}: held-out loss {_loss(p.eval_loss_before)} -> {_loss(p.eval_loss_after)}, "
            f"samples at step {p.before_step} and {p.after_step}"
        )
    prompts: List[str] = []
    for p in runs:
        prompts += [r["prompt"] for r in p.rows if r["prompt"] not in prompts]
    for i, prompt in enumerate(prompts, 1):
        lines += _wrap(f"[{i}] ", prompt, width)
        rows = [next((r for r in p.rows if r["prompt"] == prompt), None) for p in runs]
        first = next(r for r in rows if r is not None)
        if first["reference"] is not None:
            lines += _wrap("    reference:  ", first["reference"], width)
        before = next(((p, r) for p, r in zip(runs, rows) if r is not None), None)
        if before is not None:
            p, r = before
            lines += _wrap(f"    before (loss {_loss(r['reference_loss_before'])}): ", r["answer_before"], width)
        for n, (p, r) in enumerate(zip(runs, rows), 1):
            if r is None:
                lines.append(f"    run {n}: (not asked)")
                continue
            lines += _wrap(f"    run {n} after (loss {_loss(r['reference_loss_after'])}): ", r["answer_after"], width)
    return "\n".join(lines)
