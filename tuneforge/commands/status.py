"""`tuneforge status [run or sweep dir]`: job, state, step/max, loss, tokens/s, elapsed, requeues, W&B."""

from __future__ import annotations

from pathlib import Path
from typing import List

from tuneforge import units
from tuneforge.commands import Parser, runinfo, source_losses
from tuneforge.launch import sweep


def main(args: List[str]) -> int:
    p = Parser("status", "State of a run, or of every run of a sweep (default: the newest you submitted).")
    p.add_argument("path", nargs="?", type=Path)
    p.add_argument(
        "--root", type=Path, default=None, help="the newest run under this dir instead (runs/<name>/<stamp>)"
    )
    opts = p.parse_args(args)
    path = (opts.path or runinfo.newest(opts.root)).expanduser().resolve()
    infos = runinfo.gather(runinfo.run_dirs(path))
    is_sweep = sweep.is_sweep_dir(path)
    values = {}
    if is_sweep:
        record = sweep.read(path)
        print(
            f"sweep {path}: {len(infos)} element(s), array job {record.get('array_job_id') or '-'}, "
            f"W&B group {record['group']}"
        )
        values = {Path(e["run_dir"]).name: e.get("label") or "-" for e in record["elements"]}
    rows = [
        (
            "RUN",
            *(("VALUES",) if is_sweep else ()),
            "JOB",
            "STATE",
            "STEP",
            "LOSS",
            "TOK/S",
            "ELAPSED",
            "REQUEUES",
            "W&B",
        )
    ]
    for info in infos:
        name = info.run_dir.name if is_sweep else str(info.run_dir)
        rows.append(
            (
                name,
                *((values.get(name, "-"),) if is_sweep else ()),
                info.job.job_id if info.job else "-",
                info.shown_state,
                f"{_or(info.step)}/{_or(info.max_steps)}",
                _or(info.loss, "{:.4f}"),
                _or(info.tokens_per_s, "{:.0f}"),
                units.duration(info.elapsed_s, clock=True),
                str(info.requeues),
                info.wandb,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for info in infos:  # a mixture's sources: share of tokens and validation loss of each
        sources = source_losses.line(info.run_dir, info.run_dir.name)
        if sources:
            print(sources)
    for info in infos:
        print(f"checkpoint {info.run_dir.name}: {info.checkpoint}")
        for error in info.errors:
            print(f"error {info.run_dir.name}: {error}")
    return 0


def _or(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)
