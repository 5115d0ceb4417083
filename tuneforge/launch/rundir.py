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

from tuneforge import fsutil, layout
from tuneforge.conf.schema import Config, to_container, to_yaml
from tuneforge.slurm import owner


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


class NotSubmitted(Exception):
    """An existing run dir that does not take this submission: busy, incompatible, damaged (exit 2), or
    already finished (exit 0)."""

    def __init__(self, lines: Sequence[str], code: int = 2):
        super().__init__("; ".join(lines))
        self.lines, self.code = list(lines), code

    def report(self) -> int:
        if self.code == 0:
            print("\n".join(f"tuneforge: {line}" for line in self.lines), flush=True)
        else:
            print(f"tuneforge: {len(self.lines)} problem(s) with the run dir, nothing submitted:", file=sys.stderr)
            print("\n".join(f"  {line}" for line in self.lines), file=sys.stderr)
        return self.code


#: what a checkpoint is made of: resuming with another value would load it into another model
#: (the model's shape and files, the method and its adapter, the backend's checkpoint format)
RESUME_KEYS = ("model", "method", "backend.name", "backend.stage")
#: model keys that do not change what a checkpoint holds
RESUME_FREE = {"model.attn_implementation", "model.trust_remote_code", "model.params_b", "model.model_type"}


def check(cfg: Config) -> Optional[str]:
    """Whether the run dir (run.dir fixed) takes this submission. Raises NotSubmitted when it is owned
    by a live job, holds only damaged checkpoints, holds checkpoints of another model, method or
    backend (before config.yaml is touched), or is finished (exit 0: trained to train.max_steps and
    final/ written). Returns what the run resumes from, or None for a fresh start."""
    run_dir = Path(cfg.run.dir)
    if not run_dir.is_dir():
        return None
    why = owner.busy(run_dir)
    if why:
        raise NotSubmitted([f"run.dir: {why}"])
    point = layout.resume_point(run_dir)
    if point.damaged_only:
        raise NotSubmitted(
            [
                f"run.dir: {layout.checkpoints_dir(run_dir)} holds checkpoints but none is complete "
                f"({'; '.join(point.skipped)}); move the damaged ones away (or checkpoints/ to start over)"
            ]
        )
    if point.path is None:
        return None
    differences = _differences(cfg, run_dir)
    if differences:
        raise NotSubmitted(differences)
    step = _step_of(point.path)
    if (run_dir / layout.FINAL).is_dir() and step is not None and step >= cfg.train.max_steps:
        raise NotSubmitted(
            [
                f"{run_dir} is finished: trained to step {step} (train.max_steps={cfg.train.max_steps}), "
                f"the model is in {run_dir / layout.FINAL}; raise train.max_steps to train on"
            ],
            code=0,
        )
    return f"resuming from {point.describe()}" + (f" at step {step}" if step is not None else "")


def _differences(cfg: Config, run_dir: Path) -> list:
    """Problems for each value that made the existing checkpoints and differs in `cfg`."""
    from tuneforge.conf.schema import load

    try:
        before = to_container(load(run_dir / "config.yaml"))
    except Exception as e:  # noqa: BLE001 - a missing or foreign config.yaml: the checkpoints cannot be matched
        return [
            f"run.dir: {run_dir} holds checkpoints but its config.yaml cannot be read ({type(e).__name__}), so "
            "whether they fit this config is unknown; use another run.dir"
        ]
    now = to_container(cfg)
    out = []
    for key in RESUME_KEYS:
        old, new = _flat(_get(before, key), key), _flat(_get(now, key), key)
        for k in sorted(set(old) | set(new)):
            if k not in RESUME_FREE and old.get(k) != new.get(k):
                out.append(
                    f"{k}: the checkpoints in {run_dir} were written with {old.get(k)!r}, this config has "
                    f"{new.get(k)!r}; resume with the same value, or use another run.dir"
                )
    return out


def _get(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _flat(value, key: str) -> dict:
    if isinstance(value, dict):
        return {k: v for name, sub in value.items() for k, v in _flat(sub, f"{key}.{name}").items()}
    return {} if value is None and key == "backend.stage" else {key: value}


def _step_of(path: Path) -> Optional[int]:
    try:
        return int(json.loads((path / layout.TRAINER_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def create(cfg: Config, argv: Sequence[str]) -> Path:
    """Make the run dir, claim it for this submission, and write what reproduces the run: resolved
    config, command, versions, git state. Raises NotSubmitted (see `check`) before writing anything.

    Submitting again into an existing run dir (same run.dir: resume after a failure or a cancel)
    keeps the earlier jobs in submit.json, so `tuneforge status` sees the whole history.
    """
    run_dir = Path(cfg.run.dir)
    resuming = check(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        owner.claim(run_dir, cfg.cluster.name)
    except owner.Busy as e:
        raise NotSubmitted([f"run.dir: {e}"]) from None
    except OSError as e:
        raise NotSubmitted([f"run.dir: cannot create {run_dir}: {e.strerror or e}"]) from None
    if resuming:
        print(resuming, flush=True)
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
    """Append a submitted job, which now owns the run dir; `folder` is submitit's (logs, pickles, sbatch
    script), run_dir/slurm by default."""
    owner.record(run_dir, job_id, cluster, folder or run_dir / "slurm")
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
