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
    export_checkpoint(cfg, step_dir, out, opts.max_shard_size)
    print(f"wrote {out}", flush=True)
    return 0


def checkpoint_dir(run_dir: Path, step) -> Path:
    if not (run_dir / "config.yaml").is_file():
        raise BadArguments(f"tuneforge export: {run_dir} is not a run directory (no config.yaml)")
    path = layout.latest(run_dir) if step is None else layout.step_dir(run_dir, step)
    if path is None:
        raise BadArguments(f"tuneforge export: {run_dir} has no checkpoint yet")
    if not layout.is_complete(path):
        kept = [p.name for p in layout.steps(run_dir)]
        raise BadArguments(
            f"--step: no checkpoint {path.name} in {layout.checkpoints_dir(run_dir)}; kept: {', '.join(kept) or 'none'}"
        )
    return path
