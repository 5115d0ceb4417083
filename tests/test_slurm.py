"""Real Slurm jobs through the CLI: 2 nodes of the test cluster (scripts/slurm-cluster.sh), one task each."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from conftest import QUICK, TINY, metrics, tuneforge

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def slurm(partition: str, nodes: int = 2):
    return [
        "cluster=slurm",
        f"cluster.partition={partition}",
        f"cluster.nodes={nodes}",
        "cluster.tasks_per_node=1",
        "cluster.cpus_per_task=1",
        "cluster.timeout_min=10",
        "cluster.mem_gb=2",
    ]


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


# One job per sharding backend and per kind of adapter training, on both nodes. They are submitted
# together (the test cluster runs two 2-node jobs at once) and each test waits for its own.
TWO_NODE_JOBS = {
    "full-zero3": ["backend=zero3"],
    "full-fsdp": ["backend=fsdp"],
    # adapters start at zero: a higher lr shows the loss falling within 10 steps
    "lora-zero3": ["method=lora", "backend=zero3", "backend.param_persistence_threshold=0", "train.lr=2e-2"],
    "qlora-fsdp": ["method=qlora", "backend=fsdp", "train.lr=2e-2"],
}


@pytest.fixture(scope="module")
def two_node_jobs(slurm_cluster, tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-node")
    runs = {}
    for name, args in TWO_NODE_JOBS.items():
        model = TINY if name.startswith("full") else ["model=hf", f"model.name_or_path={tiny_base}", "train.seq_len=32"]
        runs[name] = root / name
        tuneforge(*model, *QUICK, *slurm(slurm_cluster), *args, f"run.dir={runs[name]}")
    return runs


@pytest.mark.parametrize("name", list(TWO_NODE_JOBS))
def test_two_node_sharded_and_adapter_jobs_complete(two_node_jobs, name):
    run = two_node_jobs[name]
    job_id = json.loads((run / "submit.json").read_text())["jobs"][0]["job_id"]
    state = final_state(job_id, timeout_s=600)
    assert state == "COMPLETED", (state, sorted(p.name for p in (run / "slurm").glob("*")))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["num_nodes"] == 2
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3]), losses  # seeded data: deterministic
    if name.startswith("full"):
        assert (run / "final" / "model.safetensors").is_file()
        return
    from safetensors.torch import load_file

    adapter = load_file(run / "final" / "adapter_model.safetensors")  # gathered from both ranks, never empty
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert json.loads((run / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
