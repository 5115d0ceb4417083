"""Commands on existing runs: `tuneforge <command> <run dir> ...`.

    tuneforge export <run dir> [--step N] [--out DIR]   # PEFT run: adapter merged into the base -> HF model dir
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List


def main(name: str, args: List[str]) -> int:
    if name == "export":
        return export(args)
    print(f"tuneforge {name}: not available in this version", file=sys.stderr)
    return 2


def export(args: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="tuneforge export", description="Write a Hugging Face model directory "
                                     "from a run: a PEFT adapter is merged into its base model.")
    parser.add_argument("run_dir", type=Path, help="the run directory (runs/<name>/<timestamp>)")
    parser.add_argument("--step", type=int, default=None, help="export checkpoint step N instead of final/")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <run dir>/export/final or /step_N)")
    try:
        opts = parser.parse_args(args)
    except SystemExit as e:  # argparse has printed the usage line
        return int(e.code or 0)
    if not opts.run_dir.is_dir():
        print(f"tuneforge export: {opts.run_dir} is not a directory", file=sys.stderr)
        return 2
    from tuneforge.trainers.export import ExportError, export_adapter_run, is_adapter_run

    if is_adapter_run(opts.run_dir):
        try:
            print(export_adapter_run(opts.run_dir, opts.step, opts.out))
        except ExportError as e:
            print(f"tuneforge export: {e}", file=sys.stderr)
            return 2
        return 0
    final = opts.run_dir / "final"
    if (final / "config.json").is_file():
        print(f"{opts.run_dir} trained every weight: {final} already is a Hugging Face model directory")
        return 0
    print(f"tuneforge export: {opts.run_dir} has no final/ model and no adapter checkpoint", file=sys.stderr)
    return 2
