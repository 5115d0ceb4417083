"""A real Slurm job through the CLI: 2 nodes of the test cluster (scripts/slurm-cluster.sh), one task each."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import QUICK, TINY, metrics, tuneforge

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def slurm(partition: str, nodes: int = 2):
    return ["cluster=slurm", f"cluster.partition={partition}", f"cluster.nodes={nodes}", "cluster.tasks_per_node=1",
            "cluster.cpus_per_task=1", "cluster.timeout_min=10", "cluster.mem_gb=2"]


def test_two_node_job_completes_with_both_ranks(slurm_cluster, tmp_path, capsys):
    run = tmp_path / "run"
    tuneforge(*TINY, *QUICK, *slurm(slurm_cluster), f"run.dir={run}", "--wait")
    out = capsys.readouterr().out
    job_id = json.loads((run / "submit.json").read_text())["jobs"][0]["job_id"]
    assert f"job {job_id} (slurm)" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["num_nodes"] == 2
    assert [m["step"] for m in metrics(run)] == list(range(1, 11))
    assert (run / "final" / "config.json").is_file()
    assert final_state(job_id) == "COMPLETED"


def final_state(job_id: str, timeout_s: float = 60) -> str:
    """The job's state in Slurm's accounting once it has ended (the result file is written just before)."""
    deadline = time.time() + timeout_s
    while True:
        out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-o", "State"], capture_output=True, text=True)
        state = (out.stdout.split() or ["UNKNOWN"])[0]
        if state not in {"RUNNING", "PENDING", "COMPLETING", "CONFIGURING", "UNKNOWN"} or time.time() > deadline:
            return state
        time.sleep(1)


def test_submission_returns_at_once_with_the_job_id(slurm_cluster, tmp_path, capsys):
    run = tmp_path / "run"
    tuneforge(*TINY, *QUICK, *slurm(slurm_cluster, nodes=1), f"run.dir={run}", "train.max_steps=3")
    out = capsys.readouterr().out
    job_id = json.loads((run / "submit.json").read_text())["jobs"][0]["job_id"]
    assert f"job {job_id} (slurm)" in out and str(run) in out
    queue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    assert queue.strip() in {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", ""}  # submitted, not awaited
    subprocess.run(["scancel", job_id], check=False)
