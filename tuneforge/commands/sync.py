"""`tuneforge sync <run or sweep dir> [--print]`: upload the offline W&B runs with `wandb sync`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

from tuneforge.commands import Parser, runinfo


def main(args: List[str]) -> int:
    p = Parser(
        "sync",
        "Upload the offline W&B runs of a run or sweep dir with `wandb sync` (one call per run: "
        "the offline dirs of every allocation of a requeued run, oldest first).",
    )
    p.add_argument("path", type=Path)
    p.add_argument("--print", dest="print_only", action="store_true", help="list what would be synced; upload nothing")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before giving up")
    opts = p.parse_args(args)
    from tuneforge.trainers.wandb_offline import find_offline_runs

    plans = []
    for run_dir in runinfo.run_dirs(opts.path):
        offline = [f.parent for f in find_offline_runs(run_dir)]
        if offline:
            plans.append((run_dir, _wandb_command() + ["sync", *map(str, offline)]))
        else:
            print(f"{run_dir}: no offline W&B run")
    for run_dir, command in plans:
        print(" ".join(command))
    if opts.print_only or not plans:
        return 0
    failed = 0
    for run_dir, command in plans:
        failed += not _run_sync(run_dir, command, opts.timeout)
    return 1 if failed else 0


def _wandb_command() -> List[str]:
    exe = shutil.which("wandb")
    return [exe] if exe else [sys.executable, "-m", "wandb"]


def _run_sync(run_dir: Path, command: List[str], timeout: float) -> bool:
    """One `wandb sync`; never prompts (no terminal input). False, with the reason printed, when it failed."""
    from tuneforge.trainers.logging import _DEFAULT_BASE_URL, can_reach, have_api_key

    env = {**os.environ, "WANDB_SILENT": "false"}
    try:
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, cwd=run_dir, env=env
        )
        rc, output = done.returncode, (done.stdout + done.stderr).strip()
    except subprocess.TimeoutExpired as e:
        rc, output = None, f"no answer within {timeout:.0f} s: {(e.stderr or b'')[-300:]!r}"
    if rc == 0 and "error" not in output.lower():
        print(f"synced {run_dir}")
        return True
    base_url = os.environ.get("WANDB_BASE_URL") or _DEFAULT_BASE_URL
    hints = []
    if not have_api_key(base_url):
        hints.append("no W&B API key: set WANDB_API_KEY or run `wandb login`")
    if not can_reach(base_url):
        hints.append(f"{base_url} is unreachable from here: run `tuneforge sync` on a machine with internet access")
    tail = " | ".join(output.splitlines()[-3:])
    print(
        f"tuneforge sync: {run_dir} failed (wandb exit {rc}): {tail}" + "".join(f"\n  {h}" for h in hints),
        file=sys.stderr,
    )
    return False
