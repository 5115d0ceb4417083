"""Shared fixtures: a tiny pretrained base model on disk, and helpers to run the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List

import pytest

os.environ.setdefault("WANDB_MODE", "offline")  # never reach for the network from tests
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nor for the hub: a model not on disk or in its cache is not there
# Token caches of test runs go to a temporary directory, not the user's ~/.cache.
os.environ.setdefault("TUNEFORGE_DATA_CACHE", tempfile.mkdtemp(prefix="tuneforge-test-cache-"))
# The index of runs (launch/index.py) and the user's config dir (~/.config/tuneforge) are the tests' own.
os.environ["TUNEFORGE_HOME"] = tempfile.mkdtemp(prefix="tuneforge-test-home-")
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="tuneforge-test-config-")
os.environ.pop("TUNEFORGE_CONFIG_PATH", None)

# The smallest model that still shows the behaviour (2 layers, hidden 32, seq 32).
TINY = [
    "model=tiny",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.vocab_size=512",
    "train.seq_len=32",
]
QUICK = [
    "logger=none",
    "train.max_steps=10",
    "train.warmup_steps=2",
    "train.checkpoint_every=5",
    "train.micro_batch=2",
    "train.global_batch=8",
    "train.lr=3e-3",
]


def tuneforge(*args: str, check: bool = True) -> int:
    """Run the CLI in this process (its tasks still run in their own processes)."""
    from tuneforge.launch.cli import main

    code = main(list(args))
    if check:
        assert code == 0, f"tuneforge {' '.join(args)} exited {code}"
    return code


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous the test starts itself)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def saved_model(out: Path, config: dict) -> Path:
    """`config` (a config.json's dict) built at random and written with save_pretrained into `out`:
    a model directory as a user's would be, for the dry runs that check weights are there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(out)
    return Path(out)


def metrics(run_dir: Path) -> List[dict]:
    """The records of the optimizer steps (step 0's evaluation, train.eval_on_start, left out)."""
    return [r for r in all_metrics(run_dir) if r["step"] > 0]


def all_metrics(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> List[float]:
    return [m["loss"] for m in metrics(run_dir)]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Llama and its tokenizer saved with save_pretrained, loaded by path like a user's model.

    Trained for a few steps on the bundled corpus so that finetuning starts from real weights."""
    out = tmp_path_factory.mktemp("base")
    run = out / "pretrain"
    # widths of 64: bitsandbytes' CPU 4-bit kernel needs in_features a multiple of its block size (64)
    wide = [a for a in TINY if not a.startswith(("model.hidden_size=", "model.intermediate_size="))]
    tuneforge(
        *wide,
        "model.hidden_size=64",
        "model.intermediate_size=128",
        *QUICK,
        "cluster.tasks_per_node=1",
        f"run.dir={run}",
        "train.max_steps=20",
    )
    return run / "final"


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real Slurm test cluster started by scripts/slurm-cluster.sh (CI starts it)."""
    # CI sets TUNEFORGE_REQUIRE_SLURM=1: there a missing cluster is a failure, not a skip.
    unavailable = pytest.fail if os.environ.get("TUNEFORGE_REQUIRE_SLURM") == "1" else pytest.skip
    if shutil.which("sinfo") is None:
        unavailable("Slurm is not installed: run scripts/slurm-cluster.sh install start")
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    if probe.returncode or not {"idle", "mixed", "allocated"} & set(probe.stdout.split()):
        unavailable(f"the Slurm test cluster is not running: scripts/slurm-cluster.sh start ({probe.stderr.strip()})")
    return "debug"


@pytest.fixture(scope="module", autouse=True)
def no_job_outlives_its_module(tmp_path_factory):
    """Cancel the Slurm jobs this module's tests submitted and left queued or running (a test that failed
    before its job ended): they would hold the test cluster's two nodes, and every later job would wait
    behind them. Only jobs whose script lies under this session's temporary directory are touched."""
    yield
    if shutil.which("squeue") is None:
        return
    ours = str(tmp_path_factory.getbasetemp())
    try:
        listed = subprocess.run(["squeue", "-h", "-o", "%i|%o"], capture_output=True, text=True, timeout=20).stdout
        ids = [job for job, _, script in (line.partition("|") for line in listed.splitlines()) if ours in script]
        if ids:
            subprocess.run(["scancel", "--signal=KILL", "--full", *ids], timeout=20, check=False)
            subprocess.run(["scancel", *ids], timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        pass  # no cluster answering: nothing of ours can be running on it


def pytest_terminal_summary(terminalreporter):
    """Say loudly when tests that submit to the real Slurm cluster were skipped: "N passed" must not
    read as "Slurm works" when the cluster was never asked."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "slurm" in getattr(r, "keywords", {})]
    if skipped:
        terminalreporter.write_sep(
            "!", f"{len(skipped)} Slurm test(s) SKIPPED: Slurm was NOT tested", red=True, bold=True
        )
        terminalreporter.write_line("start the test cluster first: scripts/slurm-cluster.sh install start")
