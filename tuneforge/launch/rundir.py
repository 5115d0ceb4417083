"""The run directory: chosen once at submission, recorded, and reused by every restart and requeue."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from tuneforge import fsutil
from tuneforge.conf.schema import Config, to_yaml


def with_run_dir(cfg: Config, now: Optional[float] = None) -> Config:
    """`cfg` with run.dir fixed to an absolute path: the given one, or <root>/<name>/<timestamp>."""
    run = cfg.run
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    path = Path(run.dir) if run.dir else Path(run.root) / run.name / stamp
    return dataclasses.replace(cfg, run=dataclasses.replace(run, dir=str(path.expanduser().resolve())))


#: packages whose versions decide what a run computes (read from metadata: nothing is imported)
KEY_PACKAGES = (
    "tuneforge",
    "torch",
    "transformers",
    "peft",
    "deepspeed",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "tokenizers",
    "submitit",
    "wandb",
    "hydra-core",
    "omegaconf",
)


def create(cfg: Config, argv: Sequence[str]) -> Path:
    """Make the run dir and write what reproduces the run: resolved config, command, versions, git state.

    Submitting again into an existing run dir (same run.dir: resume after a failure or a cancel)
    keeps the earlier jobs in submit.json, so `tuneforge status` sees the whole history.
    """
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fsutil.write_text(run_dir / "config.yaml", to_yaml(cfg))
    previous = read_record(run_dir)
    record = {
        "command": "tuneforge " + " ".join(shlex.quote(a) for a in argv),
        "python": sys.executable,
        "cwd": str(Path.cwd()),
        "versions": package_versions(),
        "git": git_state(cfg.run.record_diff),
        "jobs": previous.get("jobs", []),
    }
    fsutil.write_json(run_dir / "submit.json", record)
    return run_dir


def read_record(run_dir: Path) -> dict:
    """The run dir's submit.json, or {} when there is none (yet)."""
    try:
        return json.loads((Path(run_dir) / "submit.json").read_text())
    except (OSError, ValueError):
        return {}


def record_job(run_dir: Path, job_id: str, cluster: str, folder: Optional[Path] = None) -> None:
    """Append a submitted job; `folder` is submitit's (logs, pickles, sbatch script), run_dir/slurm by default."""
    path = run_dir / "submit.json"
    record = json.loads(path.read_text())
    record["jobs"].append(
        {
            "job_id": job_id,
            "cluster": cluster,
            "folder": str(folder or run_dir / "slurm"),
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    fsutil.write_json(path, record)


def package_versions() -> dict:
    """Installed versions of KEY_PACKAGES (None: not installed)."""
    from importlib import metadata

    versions = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


#: what `run.record_diff=true` records of a dirty tree: code and config files, nothing else
CODE_FILES = ("*.py", "*.pyi", "*.yaml", "*.yml", "*.toml", "*.cfg", "*.sh", "*.c", "*.cc", "*.cpp", "*.h", "*.cu")


def git_state(full_diff: bool = False) -> Optional[dict]:
    """The user's working directory, when it is a git repository: the commit, whether the tree differs
    from it, a diff stat (names and line counts) and the sha256 of the whole diff, which tell a rerun
    whether it has the same tree without copying file contents (a key in an edited .env) into
    submit.json. `full_diff`: the diff of code files too, credentials masked."""
    import hashlib

    from tuneforge.launch import secrets

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], capture_output=True, timeout=10)

    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode:
            return None
        diff = git("diff", "HEAD", "--no-color", "--no-ext-diff").stdout
        stat = git("diff", "HEAD", "--stat", "--no-color").stdout.decode(errors="replace")
        state = {
            "commit": sha.stdout.decode().strip(),
            "dirty": bool(diff),
            "diff_stat": secrets.redact(stat.strip(), escape=False),
            "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
        }
        if full_diff and diff:
            code = git("diff", "HEAD", "--no-color", "--no-ext-diff", "--", *CODE_FILES).stdout
            state["diff"] = secrets.redact(code.decode(errors="replace"), escape=False)
        return state
    except (OSError, subprocess.TimeoutExpired):
        return None
