"""`tuneforge export <run dir> [--step N] [--out DIR]`: a Hugging Face model directory from a run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from tuneforge import layout
from tuneforge.commands import BadArguments, Parser
from tuneforge.conf.fields import valid_size


def main(args: List[str]) -> int:
    """Write a consolidated Hugging Face model directory (safetensors, config, tokenizer) from a
    run's checkpoint, whatever backend and world size wrote it. Runs in this process, on the CPU."""
    parser = Parser("export", main.__doc__)
    parser.add_argument("run_dir", type=Path, help="the run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step; default: the latest")
    parser.add_argument("--out", type=Path, default=None, help="output directory; default: <run dir>/export/step_N")
    parser.add_argument(
        "--max-shard-size",
        default=None,
        help="size cap of one safetensors file, as save_pretrained's (5GB, 500MB); default: the run's run.max_shard_size",
    )
    opts = parser.parse_args(args)
    if opts.max_shard_size is not None and not valid_size(opts.max_shard_size):
        raise BadArguments(f"--max-shard-size: {opts.max_shard_size!r} is not a size like 5GB, 500MB or 200KB")
    from tuneforge.trainers.export import ExportError, export_adapter_run, is_adapter_run

    if is_adapter_run(opts.run_dir):
        try:
            print(export_adapter_run(opts.run_dir, opts.step, opts.out, opts.max_shard_size or "5GB"))
        except ExportError as e:
            print(f"tuneforge export: {e}", file=sys.stderr)
            return 2
        return 0
    step_dir = checkpoint_dir(opts.run_dir, opts.step)
    out = (opts.out or opts.run_dir / "export" / step_dir.name).resolve()
    from tuneforge.conf.schema import load
    from tuneforge.trainers.export import export_checkpoint

    cfg = load(opts.run_dir / "config.yaml")
    print(f"exporting {step_dir} ({cfg.backend.name}) to {out}", flush=True)
    try:
        export_checkpoint(cfg, step_dir, out, opts.max_shard_size)
    except (ExportError, OSError, RuntimeError, ValueError, KeyError) as e:  # one line, not a traceback
        text = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"tuneforge export: cannot export {step_dir}: {type(e).__name__}: {text}", file=sys.stderr)
        return 2
    print(f"wrote {out}", flush=True)
    return 0


def checkpoint_dir(run_dir: Path, step) -> Path:
    """The complete checkpoint to export: step N's, or the newest complete one (what a resume would
    take: layout.resume_point), saying on stderr which newer ones were skipped and why."""
    if not (run_dir / "config.yaml").is_file():
        raise BadArguments(f"tuneforge export: {run_dir} is not a run directory (no config.yaml)")
    kept = ", ".join(p.name for p in layout.steps(run_dir)) or "none"
    if step is not None:
        path = layout.step_dir(run_dir, step)
        problem = layout.verify(path)
        if problem:
            raise BadArguments(
                f"--step: checkpoint {path.name} in {layout.checkpoints_dir(run_dir)} {problem}; complete: {kept}"
            )
        return path
    point = layout.resume_point(run_dir)
    if point.path is None:
        raise BadArguments(f"tuneforge export: {run_dir} has {point.describe()}")
    for skipped in point.skipped:
        print(f"tuneforge export: skipped {skipped}", file=sys.stderr)
    return point.path
