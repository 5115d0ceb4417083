"""The sbatch text for a 2-node profile, against a golden file (regenerate: TUNEFORGE_GOLDEN=update)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tuneforge.launch.compose import compose
from tuneforge.slurm.executors import sbatch_script

GOLDEN = Path(__file__).parent / "golden" / "sbatch_2node.txt"
OVERRIDES = [
    "cluster=slurm",
    "cluster.nodes=2",
    "cluster.tasks_per_node=4",
    "cluster.gpus_per_node=4",
    "cluster.partition=gpu",
    "cluster.account=proj42",
    "cluster.qos=normal",
    "cluster.mem_gb=256",
    "cluster.cpus_per_task=8",
    "cluster.timeout_min=240",
    "cluster.constraint=h100",
    "cluster.extra_sbatch=['--reservation=tuning','--exclusive']",
    "cluster.setup=['module load cuda/12.4','source /opt/venvs/train/bin/activate']",
]


def render(folder: Path) -> str:
    cfg = compose(OVERRIDES)
    text = sbatch_script(cfg.cluster, folder)
    return text.replace(sys.executable, "PYTHON")


def test_sbatch_matches_golden_file():
    text = render(Path("/runs/demo/20260101-000000/slurm"))
    if os.environ.get("TUNEFORGE_GOLDEN") == "update":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_sbatch_quotes_paths_with_spaces_and_quotes():
    text = render(Path("/runs/it's a run/slurm"))
    command = [line for line in text.splitlines() if "submitit.core._submit" in line][0]
    assert "'/runs/it'\"'\"'s a run/slurm'" in command
