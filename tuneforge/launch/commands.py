"""Commands on an existing run directory: `tuneforge <command> <run dir> ...`.

    tuneforge export <run dir> [--step N] [--out DIR]    # a Hugging Face model dir from a checkpoint
                                                        # (PEFT runs: the adapter merged into its base)

Each command is one function below taking its own arguments; `main` only dispatches. Exit codes:
0 done, 1 failed while working, 2 bad arguments (nothing written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List


def main(name: str, args: List[str]) -> int:
    command = COMMANDS.get(name)
    if command is None:
        print(f"tuneforge {name}: not implemented yet", file=sys.stderr)
        return 2
    return command(args)


class _Parser(argparse.ArgumentParser):
    """argparse that returns exit code 2 with one line instead of printing usage and exiting."""

    def error(self, message: str):
        raise _BadArguments(f"{self.prog}: {message}")


class _BadArguments(ValueError):
    pass


# ------------------------------------------------------------------------------------------ export
def export(args: List[str]) -> int:
    """Write a consolidated Hugging Face model directory (safetensors, config, tokenizer) from a
    run's checkpoint, whatever backend and world size wrote it. Runs in this process, on the CPU."""
    parser = _Parser(prog="tuneforge export", description=export.__doc__)
    parser.add_argument("run_dir", type=Path, help="the run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step; default: the latest")
    parser.add_argument("--out", type=Path, default=None, help="output directory; default: <run dir>/export/step_N")
    try:
        opts = parser.parse_args(args)
    except _BadArguments as e:
        print(str(e), file=sys.stderr)
        return 2
    from tuneforge.trainers.export import ExportError, export_adapter_run, is_adapter_run

    if is_adapter_run(opts.run_dir):
        try:
            print(export_adapter_run(opts.run_dir, opts.step, opts.out))
        except ExportError as e:
            print(f"tuneforge export: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        step_dir = _checkpoint_dir(opts.run_dir, opts.step)
    except _BadArguments as e:
        print(str(e), file=sys.stderr)
        return 2
    out = (opts.out or opts.run_dir / "export" / step_dir.name).resolve()
    from omegaconf import OmegaConf

    from tuneforge.trainers.export import export_checkpoint

    cfg = OmegaConf.load(opts.run_dir / "config.yaml")
    print(f"exporting {step_dir} ({cfg.backend.name}) to {out}", flush=True)
    export_checkpoint(cfg, step_dir, out)
    print(f"wrote {out}", flush=True)
    return 0


def _checkpoint_dir(run_dir: Path, step) -> Path:
    if not (run_dir / "config.yaml").is_file():
        raise _BadArguments(f"tuneforge export: {run_dir} is not a run directory (no config.yaml)")
    root = run_dir / "checkpoints"
    if step is None:
        pointer = root / "latest"
        if not pointer.is_file():
            raise _BadArguments(f"tuneforge export: {run_dir} has no checkpoint yet")
        path = root / pointer.read_text().strip()
    else:
        path = root / f"step_{step}"
    if not (path / "trainer.json").is_file():
        kept = sorted((p.name for p in root.glob("step_*") if (p / "trainer.json").is_file()),
                      key=lambda n: int(n[5:]))
        raise _BadArguments(f"--step: no checkpoint {path.name} in {root}; kept: {', '.join(kept) or 'none'}")
    return path


#: command name -> function(args) -> exit code. status, logs, cancel and sync come with their own section.
COMMANDS: Dict[str, Callable[[List[str]], int]] = {"export": export}
