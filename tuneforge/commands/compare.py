"""`tuneforge compare <run dir> [<run dir> ...]`: what the model answered before and after training.

One run: per prompt, the reference, the answer before any training (step 0) and at the end, with the
loss of the reference answer at both (lower: the model finds the reference more likely; no judge
needed), and the held-out loss before and after. Several runs (a sweep dir counts as its elements):
the same prompts side by side, one "after" per run. From samples.jsonl and metrics.jsonl
(trainers/samples.py); `--json` prints the tables as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import List, Optional

from tuneforge.commands import BadArguments, Parser


def main(args: List[str]) -> int:
    """Show the answers and losses before and after training of one run, or several side by side."""
    parser = Parser("compare", main.__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (or sweep directories)")
    parser.add_argument("--json", action="store_true", help="print the tables as JSON")
    opts = parser.parse_args(args)
    from tuneforge.trainers import samples

    dirs = _run_dirs(opts.runs)
    tables = [samples.paired(d) for d in dirs]
    if opts.json:
        print(json.dumps([{**dataclasses.asdict(t), "run_dir": str(t.run_dir)} for t in tables], indent=1))
        return 0
    width = min(120, shutil.get_terminal_size((100, 20)).columns)
    if len(tables) == 1:
        print(samples.render(tables[0], width))
    else:
        print(samples.render_side_by_side(tables, width))
    return 0


def _run_dirs(paths: List[Path]) -> List[Path]:
    from tuneforge.launch import sweep

    dirs = []
    for path in paths:
        path = path.expanduser().resolve()
        if sweep.is_sweep_dir(path):
            dirs += [Path(e["run_dir"]) for e in sweep.read(path)["elements"]]
        elif (path / "config.yaml").is_file():
            dirs.append(path)
        else:
            raise BadArguments(f"tuneforge compare: {path} is not a run directory (no config.yaml)")
    return dirs


def before_after(run_dir: Path) -> Optional[str]:
    """The before/after table of a finished run, or None when it has neither samples nor a held-out loss."""
    from tuneforge.trainers import samples

    table = samples.paired(run_dir)
    if not table.rows and table.eval_loss_before is None:
        return None
    return "before and after training:\n" + samples.render(table, min(120, shutil.get_terminal_size((100, 20)).columns))
