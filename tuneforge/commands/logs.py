"""`tuneforge logs <run dir> [--follow] [--rank N]`: output of one rank of a run's latest job."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List

from tuneforge.commands import Parser, runinfo
from tuneforge.launch import sweep


def main(args: List[str]) -> int:
    p = Parser("logs", "Output of one rank of a run's latest job (stdout, then stderr).")
    p.add_argument("path", type=Path, help="a run dir (for a sweep: one element's dir)")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    opts = p.parse_args(args)
    run_dir = _single_run(opts.path)
    job = runinfo.latest_job(run_dir)
    if job is None:
        print(f"tuneforge logs: {run_dir} has no submitted job", file=sys.stderr)
        return 2
    paths = job.paths(opts.rank)
    files = [paths.stdout, paths.stderr]
    if not opts.follow:
        for path in files:
            print(f"==> {path} <==")
            print(path.read_text(errors="replace") if path.is_file() else "(not written yet)")
        return 0
    return _follow(files, run_dir)


def _follow(files: List[Path], run_dir: Path) -> int:
    """Print what the files gain until the job is over (checked every few seconds) or Ctrl-C."""
    offsets = {path: 0 for path in files}
    last_check = 0.0
    try:
        while True:
            for path in files:
                if path.is_file():
                    with open(path, "rb") as f:
                        f.seek(offsets[path])
                        chunk = f.read()
                    offsets[path] += len(chunk)
                    sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
            if time.time() - last_check > 5:
                last_check = time.time()
                state = runinfo.gather([run_dir])[0].state
                if state in runinfo.FINAL_STATES:
                    print(f"==> job {state} <==")
                    return 0
            time.sleep(1)
    except KeyboardInterrupt:
        return 0


def _single_run(path: Path) -> Path:
    path = path.expanduser().resolve()
    if sweep.is_sweep_dir(path):
        raise FileNotFoundError(f"{path} is a sweep; give one of its run dirs, e.g. {path / '0'}")
    return runinfo.run_dirs(path)[0]
