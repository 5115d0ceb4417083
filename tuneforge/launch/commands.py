"""Commands on existing run directories: `tuneforge <command> <run dir> ...`. No daemon: each command
reads the run dir's records (launch/runinfo.py), asks the scheduler through submitit, and exits.

    tuneforge export <run dir> [--step N] [--out DIR]    # a Hugging Face model dir from a checkpoint
                                                        # (PEFT runs: the adapter merged into its base)
    tuneforge status [run or sweep dir]                  # job, state, step/max, loss, tokens/s, elapsed, requeues, W&B
    tuneforge logs <run dir> [--follow] [--rank N]
    tuneforge cancel <run or sweep dir>
    tuneforge sync <run or sweep dir> [--print] [--timeout S]

Each command is one function below taking its own arguments; `main` only dispatches. Exit codes:
0 done, 1 failed while working, 2 bad arguments (nothing written).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from tuneforge.launch import runinfo, sweep
from tuneforge.slurm import events


def main(name: str, args: List[str]) -> int:
    command = COMMANDS.get(name)
    if command is None:
        print(f"tuneforge: unknown command '{name}'; one of {', '.join(sorted(COMMANDS))}", file=sys.stderr)
        return 2
    try:
        return command(args)
    except _BadArguments as e:
        print(str(e), file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # not a run dir, no runs yet
        print(f"tuneforge {name}: {e}", file=sys.stderr)
        return 2


def _parser(name: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=f"tuneforge {name}", description=description)


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
        kept = sorted((p.name for p in root.glob("step_*") if (p / "trainer.json").is_file()), key=lambda n: int(n[5:]))
        raise _BadArguments(f"--step: no checkpoint {path.name} in {root}; kept: {', '.join(kept) or 'none'}")
    return path


# ------------------------------------------------------------------------------------------ status
def status(args: List[str]) -> int:
    p = _parser("status", "State of a run, or of every run of a sweep (default: the newest under runs/).")
    p.add_argument("path", nargs="?", type=Path)
    p.add_argument("--root", type=Path, default=Path("runs"), help="where to look for the newest run")
    opts = p.parse_args(args)
    path = (opts.path or runinfo.newest(opts.root)).expanduser().resolve()
    infos = runinfo.gather(runinfo.run_dirs(path))
    if sweep.is_sweep_dir(path):
        record = sweep.read(path)
        print(
            f"sweep {path}: {len(infos)} element(s), array job {record.get('array_job_id') or '-'}, "
            f"W&B group {record['group']}"
        )
    rows = [("RUN", "JOB", "STATE", "STEP", "LOSS", "TOK/S", "ELAPSED", "REQUEUES", "W&B")]
    for info in infos:
        name = info.run_dir.name if sweep.is_sweep_dir(path) else str(info.run_dir)
        rows.append(
            (
                name,
                info.job.job_id if info.job else "-",
                info.state,
                f"{_or(info.step)}/{_or(info.max_steps)}",
                _or(info.loss, "{:.4f}"),
                _or(info.tokens_per_s, "{:.0f}"),
                _duration(info.elapsed_s),
                str(info.requeues),
                info.wandb,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for info in infos:
        for error in info.errors:
            print(f"error {info.run_dir.name}: {error}")
    return 0


def _or(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------------ logs
def logs(args: List[str]) -> int:
    p = _parser("logs", "Output of one rank of a run's latest job (stdout, then stderr).")
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


# ------------------------------------------------------------------------------------------ cancel
def cancel(args: List[str]) -> int:
    p = _parser(
        "cancel",
        "Cancel a run's job, or a sweep's whole array. Each rank saves a checkpoint first "
        "(SIGTERM); submit again with the same run.dir to continue.",
    )
    p.add_argument("path", type=Path)
    opts = p.parse_args(args)
    path = opts.path.expanduser().resolve()
    infos = runinfo.gather(runinfo.run_dirs(path))
    live = [i for i in infos if i.job and i.state not in runinfo.FINAL_STATES]
    if not live:
        print(f"nothing to cancel: {', '.join(sorted({i.state for i in infos}))}")
        return 0
    slurm_ids = {i.job.job_id for i in live if i.job.cluster == "slurm"}
    if sweep.is_sweep_dir(path) and sweep.read(path).get("array_job_id"):
        slurm_ids = {sweep.read(path)["array_job_id"]} if slurm_ids else set()  # the whole array at once
    for job_id in sorted(slurm_ids):
        subprocess.run(["scancel", job_id], check=True, timeout=60)
        print(f"cancelled Slurm job {job_id}")
    for info in live:
        events.record(info.run_dir, "cancel", job_id=info.job.job_id, by="tuneforge cancel")
        if info.job.cluster == "local":
            # the local controller forwards SIGTERM to its tasks: they save and exit like on Slurm
            os.kill(int(info.job.job_id), signal.SIGTERM)
            print(f"cancelled local job {info.job.job_id} ({info.run_dir})")
    return 0


# ------------------------------------------------------------------------------------------ sync
def sync(args: List[str]) -> int:
    p = _parser(
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


#: command name -> function(args) -> exit code
COMMANDS: Dict[str, Callable[[List[str]], int]] = {
    "export": export,
    "status": status,
    "logs": logs,
    "cancel": cancel,
    "sync": sync,
}
