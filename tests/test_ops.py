"""Cluster operations through the real CLI: requeue on time limit and preemption, sweeps as one job
array, status / logs / cancel / sync, W&B continuity across allocations, rank failure, no secrets.

The Slurm tests need the 2-node test cluster (scripts/slurm-cluster.sh start). Runs that must live
long enough to be signalled use debug.step_sleep_s, so their length hardly depends on the machine's
speed. Every loss curve is compared with ONE uninterrupted local run: the LR is constant, so an
N-step run's losses are the first N of any longer run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest
from conftest import TINY, losses, metrics, tuneforge

from tuneforge.commands import runinfo
from tuneforge.launch.cli import main as cli
from tuneforge.slurm import events
from tuneforge.slurm.requeue import parse_duration
from tuneforge.trainers import wandb_offline

TRAIN = [
    "train.schedule=constant",
    "train.warmup_steps=0",
    "train.micro_batch=2",
    "train.global_batch=8",
    "train.lr=3e-3",
    "train.checkpoint_every=50",
]
REFERENCE_STEPS = 500  # the longest run below: the time-limit test
WANDB = ["logger=wandb", "logger.mode=offline"]
FAKE_WANDB_KEY = "f" * 31 + "0123456789"  # a W&B key is 40 hex characters
FAKE_HF_TOKEN = "hf_FakeTokenForTheSecretTest0123456789"


def slurm(partition: str, nodes: int = 2, timeout_min: int = 10) -> List[str]:
    return [
        "cluster=slurm",
        f"cluster.partition={partition}",
        f"cluster.nodes={nodes}",
        "cluster.tasks_per_node=1",
        "cluster.cpus_per_task=1",
        f"cluster.timeout_min={timeout_min}",
        "cluster.mem_gb=2",
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> List[float]:
    """Losses of an uninterrupted 2-process local run of REFERENCE_STEPS steps."""
    run = tmp_path_factory.mktemp("reference") / "run"
    tuneforge(
        *TINY,
        *TRAIN,
        "cluster=local",
        "cluster.tasks_per_node=2",
        "logger=none",
        f"train.max_steps={REFERENCE_STEPS}",
        f"run.dir={run}",
    )
    return losses(run)


# ------------------------------------------------------------------------------------------ helpers
def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"{what}: not reached within {timeout_s:.0f} s")
        time.sleep(1)


def last_step(run: Path) -> int:
    try:
        return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    except (OSError, IndexError, ValueError, KeyError):
        return -1


def of_kind(run: Path, kind: str) -> List[dict]:
    return [e for e in events.read(run) if e["event"] == kind]


def task_pids(run: Path) -> Dict[int, int]:
    """rank -> pid of the latest allocation."""
    return {e["rank"]: e["pid"] for e in of_kind(run, "task")}


def rank0_output(run: Path) -> str:
    """stdout of rank 0 of the run's latest job."""
    path = runinfo.latest_job(run).paths(0).stdout
    return path.read_text() if path.is_file() else ""


def wait_final(run: Path, timeout_s: float) -> runinfo.RunInfo:
    """The run's info once its latest job has ended, as Slurm's accounting (or the local controller) says."""
    info = runinfo.gather([run])[0]
    deadline = time.time() + timeout_s
    while (
        info.state not in runinfo.FINAL_STATES
        or info.state == "COMPLETED"
        and info.job.cluster == "slurm"
        and runinfo.slurm_states([info.job]).get(info.job.job_id) != "COMPLETED"
    ):
        if time.time() > deadline:
            pytest.fail(f"{run}: still {info.state} after {timeout_s:.0f} s; events: {events.read(run)[-5:]}")
        time.sleep(2)
        info = runinfo.gather([run])[0]
    return info


def job_id(run: Path) -> str:
    return json.loads((run / "submit.json").read_text())["jobs"][-1]["job_id"]


def command_output(capsys, *args: str) -> str:
    capsys.readouterr()
    tuneforge(*args)
    return capsys.readouterr().out


def wandb_group(run: Path) -> set:
    return {
        r.run.run_group
        for f in wandb_offline.find_offline_runs(run)
        for r in wandb_offline.read_records(f)
        if r.WhichOneof("record_type") == "run"
    }


def assert_wandb_continues(run: Path, allocations: int) -> None:
    """One W&B run id over every allocation, whose history holds every step's loss of metrics.jsonl."""
    run_id = (run / "wandb_id").read_text().strip()
    assert wandb_offline.read_run_ids(run) == {run_id}
    assert len(wandb_offline.find_offline_runs(run)) == allocations
    history = {row["_step"]: row["loss"] for row in wandb_offline.read_history(run) if "loss" in row}
    steps = [m["step"] for m in metrics(run)]
    assert sorted(history) == steps
    assert [history[s] for s in steps] == pytest.approx(losses(run), abs=1e-9)


# ------------------------------------------------------------------------------------------ fast
def test_parse_slurm_durations():
    assert parse_duration("0:58") == 58 and parse_duration("1:02:03") == 3723
    assert parse_duration("2-01:00:00") == 2 * 86400 + 3600
    assert parse_duration("UNLIMITED") is None and parse_duration("") is None


def test_sweep_dry_run_lists_every_element_and_the_array_script(tmp_path, capsys):
    root = tmp_path / "runs"
    code = cli(
        [
            "-m",
            "cluster=slurm",
            "cluster.check_site=false",
            "train.lr=1e-3,3e-3",
            "model.hidden_size=32,64",
            f"run.root={root}",
            "run.name=sw",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    elements = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]  # "   i  <dir>  <label>"
    sweep_dir = Path(elements[0][1]).parent
    assert sweep_dir.parent == root / "sw"
    assert [e[:2] for e in elements] == [[str(i), str(sweep_dir / str(i))] for i in range(4)]
    assert {" ".join(e[2:]) for e in elements} == {
        f"train.lr={lr} model.hidden_size={h}" for lr in ("0.001", "0.003") for h in (32, 64)
    }
    assert "#SBATCH --array=0-3%4" in out and out.count("#!/bin/bash") == 1
    assert out.count("# preflight:") == 4  # every element's estimate
    assert not root.exists()


def test_sweep_refuses_every_bad_element_before_writing(tmp_path, capsys):
    root = tmp_path / "runs"
    code = cli(["-m", "train.lr=1e-3,-1", "train.max_steps=5,0", "train.warmup_steps=0", f"run.root={root}"])
    err = capsys.readouterr().err
    assert code == 2 and not root.exists()
    assert "element 1 (train.lr=0.001 train.max_steps=0): train.max_steps" in err
    assert "element 2 (train.lr=-1 train.max_steps=5): train.lr" in err and "element 3" in err
    assert "element 0" not in err
    assert cli(["-m", "cluster=slurm", "cluster.nodes=1,2", f"run.root={root}"]) == 2
    assert "same cluster settings" in capsys.readouterr().err and not root.exists()


def test_a_secret_written_into_the_sbatch_script_is_refused(capsys):
    assert cli(["cluster=slurm", "cluster.setup=['export WANDB_API_KEY=abc123']", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "cluster.setup[0]: looks like a credential" in err and "abc123" not in err
    reference = ["cluster=slurm", "cluster.check_site=false", "cluster.setup=['export HF_TOKEN=$HF_TOKEN']"]
    assert cli([*reference, "--dry-run"]) == 0  # a reference


# ------------------------------------------------------------------------------------------ local, slow
@pytest.mark.slow
def test_local_warning_signal_saves_requeues_and_resumes(reference, tmp_path, capsys, monkeypatch):
    """SIGUSR2 to the local tasks (what Slurm sends before the time limit): every rank saves at the step
    boundary, the job requeues itself, resumes, and ends with the uninterrupted loss curve."""
    steps, root = 40, tmp_path / "runs"
    run = root / "local" / "run"
    # a W&B service token of the submitting process (a notebook, a script using wandb) must not leak into
    # the tasks: they would connect to that process's wandb-core, or to nothing
    monkeypatch.setenv("WANDB_SERVICE", "3-1-unix-/nonexistent/wandb-service.sock")
    code = []
    thread = threading.Thread(
        target=lambda: code.append(
            cli(
                [
                    *TINY,
                    *TRAIN,
                    *WANDB,
                    "cluster=local",
                    "cluster.tasks_per_node=2",
                    f"train.max_steps={steps}",
                    "debug.step_sleep_s=0.2",
                    f"run.dir={run}",
                ]
            )
        )
    )
    thread.start()
    wait_until(lambda: last_step(run) >= 8, 120, "step 8")
    for pid in task_pids(run).values():
        os.kill(pid, signal.SIGUSR2)
    thread.join(timeout=240)
    assert code == [0]
    [requeue] = of_kind(run, "requeue")
    assert requeue["kind"] == "preemption"  # long before the local time limit
    assert [e["signal"] for e in of_kind(run, "signal")] == ["SIGUSR2", "SIGUSR2"]
    assert [e["step"] for e in of_kind(run, "checkpoint")] == [requeue["step"]]
    assert len(of_kind(run, "allocation")) == 2 and of_kind(run, "completed")[0]["step"] == steps
    assert [m["step"] for m in metrics(run)] == list(range(1, steps + 1))
    assert losses(run) == pytest.approx(reference[:steps], rel=1e-6)
    assert_wandb_continues(run, allocations=2)

    monkeypatch.chdir(tmp_path)  # `tuneforge status` without a path: the newest run under ./runs
    out = command_output(capsys, "status")
    assert str(run) in out and "COMPLETED" in out and f"{steps}/{steps}" in out
    row = out.splitlines()[1].split()
    assert row[7] == "1" and row[8] == (run / "wandb_id").read_text().strip()  # requeues, W&B run
    out = command_output(capsys, "sync", str(run), "--print")
    offline = [str(f.parent) for f in wandb_offline.find_offline_runs(run)]
    assert " ".join(offline) in out and "wandb sync" in out.splitlines()[-1]
    # the real upload: no key and no network here, so it must fail, clearly, and not hang or prompt
    capsys.readouterr()
    assert cli(["sync", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"tuneforge sync: {run} failed" in err and "no W&B API key" in err


@pytest.mark.slow
def test_local_requeue_limit_then_resume_then_cancel(tmp_path, capsys):
    """cluster.max_requeues=0: the warning saves but the job fails, saying why; the same command resumes
    from that checkpoint; `tuneforge cancel` stops it (SIGTERM: every rank saves first)."""
    run = tmp_path / "run"
    common = [
        *TINY,
        *TRAIN,
        "logger=none",
        "cluster=local",
        "cluster.tasks_per_node=2",
        "train.max_steps=60",
        "debug.step_sleep_s=0.2",
        f"run.dir={run}",
    ]

    def start(*extra: str) -> threading.Thread:
        thread = threading.Thread(target=cli, args=([*common, *extra],))
        thread.start()
        return thread

    thread = start("cluster.max_requeues=0")
    wait_until(lambda: last_step(run) >= 5, 120, "step 5")
    for pid in task_pids(run).values():
        os.kill(pid, signal.SIGUSR2)
    thread.join(timeout=120)
    [refused] = of_kind(run, "requeue_refused")
    assert "cluster.max_requeues" in refused["reason"]
    assert (run / "checkpoints" / "latest").read_text() == f"step_{refused['step']}"
    out = command_output(capsys, "status", str(run))
    assert "FAILED" in out and "requeue refused: requeued 0 times already" in out

    thread = start()
    wait_until(
        lambda: "resumed from" in rank0_output(run) and last_step(run) >= refused["step"] + 5,
        120,
        "resumed and 5 steps on",
    )
    assert "RUNNING" in command_output(capsys, "status", str(run))
    assert "cancelled local job" in command_output(capsys, "cancel", str(run))
    thread.join(timeout=120)
    [stopped] = of_kind(run, "stopped")
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stopped['step']}"
    assert last_step(run) == stopped["step"] < 60
    assert "CANCELLED" in command_output(capsys, "status", str(run))


@pytest.mark.slow
def test_local_sweep_runs_elements_in_turn_in_one_wandb_group(tmp_path, capsys):
    root = tmp_path / "runs"
    tuneforge(
        "-m",
        *TINY,
        *TRAIN,
        *WANDB,
        "cluster=local",
        "cluster.tasks_per_node=1",
        "train.max_steps=3",
        f"run.root={root}",
        "run.name=sw",
        "train.lr=1e-3,3e-3",
    )
    [sweep_dir] = list((root / "sw").iterdir())
    record = json.loads((sweep_dir / "sweep.json").read_text())
    runs = [sweep_dir / "0", sweep_dir / "1"]
    assert [Path(e["run_dir"]) for e in record["elements"]] == runs
    assert [last_step(r) for r in runs] == [3, 3]
    assert wandb_group(runs[0]) == wandb_group(runs[1]) == {record["group"]}
    out = command_output(capsys, "status", str(sweep_dir))
    assert out.count("COMPLETED") == 2 and f"W&B group {record['group']}" in out
    rows = out.splitlines()[2:4]  # after the sweep line and the header: each element with its swept values
    assert [row.split()[:2] for row in rows] == [["0", "train.lr=0.001"], ["1", "train.lr=0.003"]]


# ------------------------------------------------------------------------------------------ Slurm
@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_requeues_until_done_with_one_curve_one_wandb_run_and_no_secret(
    slurm_cluster, reference, tmp_path, capsys, monkeypatch
):
    """A 2-minute limit and ~75 s of training: USR2 comes 50-80 s before the limit, every rank saves,
    the job requeues itself (as often as needed) and ends with the uninterrupted loss curve."""
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)  # secrets in the submitting shell:
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)  # the job inherits them, no file may keep them
    steps, run = REFERENCE_STEPS, tmp_path / "run"
    tuneforge(
        *TINY,
        *TRAIN,
        *WANDB,
        *slurm(slurm_cluster, timeout_min=2),
        "cluster.signal_delay_s=50",
        "cluster.max_requeues=8",
        f"train.max_steps={steps}",
        "debug.step_sleep_s=0.12",
        f"run.dir={run}",
    )
    info = wait_final(run, 900)
    assert info.state == "COMPLETED", info.errors
    requeues = of_kind(run, "requeue")
    assert requeues and {e["kind"] for e in requeues} == {"timeout"}
    allocations = of_kind(run, "allocation")
    assert len(allocations) == len(requeues) + 1 == info.requeues + 1
    warnings = [e for e in of_kind(run, "signal") if e["signal"] == "SIGUSR2"]
    assert len(warnings) == 2 * len(requeues)  # both ranks, each time (then Slurm's SIGTERM of the requeue)
    assert [(e["step"], e["reason"]) for e in of_kind(run, "checkpoint")] == [(e["step"], "requeue") for e in requeues]
    assert [m["step"] for m in metrics(run)] == list(range(1, steps + 1))
    assert losses(run) == pytest.approx(reference[:steps], rel=1e-6)
    assert_wandb_continues(run, allocations=len(allocations))
    # the reproducibility record: config, command, versions, git, sbatch script, every allocation's Slurm env
    record = json.loads((run / "submit.json").read_text())
    assert record["command"].startswith("tuneforge ") and "git" in record
    assert all(record["versions"][p] for p in ("tuneforge", "torch", "transformers", "peft", "submitit", "wandb"))
    assert (run / "config.yaml").is_file() and (run / "slurm" / f"{info.job.job_id}_submission.sh").is_file()
    assert [int(a["environment"]["SLURM_RESTART_COUNT"]) for a in allocations[1:]] == list(range(1, len(allocations)))
    assert all(a["environment"]["SLURM_JOB_ID"] == info.job.job_id for a in allocations)
    for path in (p for p in run.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        assert FAKE_WANDB_KEY.encode() not in data and FAKE_HF_TOKEN.encode() not in data, path
    out = command_output(capsys, "status", str(run))
    assert "COMPLETED" in out and f"{steps}/{steps}" in out


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_and_requeued_job_resumes_and_completes(slurm_cluster, reference, tmp_path, capsys):
    """submitit's preemption (SIGTERM + USR2), then a plain `scontrol requeue` (SIGTERM): both resume
    from the run dir; status and logs are read while it runs and after it ended."""
    import submitit

    steps, run = 150, tmp_path / "run"
    tuneforge(
        *TINY,
        *TRAIN,
        *WANDB,
        *slurm(slurm_cluster),
        f"train.max_steps={steps}",
        "debug.step_sleep_s=0.1",
        f"run.dir={run}",
    )
    wait_until(lambda: last_step(run) >= 30, 300, "step 30")
    out = command_output(capsys, "status", str(run))
    assert "RUNNING" in out and job_id(run) in out
    out = command_output(capsys, "logs", str(run), "--rank", "1")
    assert f"{job_id(run)}_1_log.err" in out and "global_rank=1(2)" in out

    submitit.SlurmJob(folder=run / "slurm", job_id=job_id(run))._interrupt()
    wait_until(lambda: len(of_kind(run, "allocation")) == 2, 300, "second allocation")
    [requeue] = of_kind(run, "requeue")
    wait_until(lambda: last_step(run) >= requeue["step"] + 30, 300, "30 steps after the requeue")
    subprocess.run(["scontrol", "requeue", job_id(run)], check=True, timeout=30)
    info = wait_final(run, 600)

    assert info.state == "COMPLETED", info.errors
    assert requeue["kind"] == "preemption"
    [stopped] = of_kind(run, "stopped")  # scontrol requeue: saved on SIGTERM; Slurm requeued it
    assert [e["step"] for e in of_kind(run, "checkpoint")] == [requeue["step"], stopped["step"]]
    assert len(of_kind(run, "allocation")) == 3 and info.requeues == 2
    assert [m["step"] for m in metrics(run)] == list(range(1, steps + 1))
    assert losses(run) == pytest.approx(reference[:steps], rel=1e-6)
    # SIGTERM kills wandb-core on the spot; the next allocation gives W&B the steps it lost
    assert_wandb_continues(run, allocations=3)
    out = command_output(capsys, "status", str(run))
    assert "COMPLETED" in out and f"{steps}/{steps}" in out
    out = command_output(capsys, "logs", str(run), "--follow")  # a finished job: prints all, then returns
    assert f"resumed from {run / 'checkpoints' / ('step_%d' % stopped['step'])}" in out
    assert out.rstrip().endswith("==> job COMPLETED <==")


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_is_one_job_array_with_four_run_dirs_and_one_wandb_group(slurm_cluster, tmp_path, capsys):
    root = tmp_path / "runs"
    out = command_output(
        capsys,
        "-m",
        *TINY,
        *TRAIN,
        *WANDB,
        *slurm(slurm_cluster, nodes=1),
        "train.max_steps=4",
        f"run.root={root}",
        "run.name=sw",
        "train.lr=1e-3,3e-3",
        "model.hidden_size=32,64",
    )
    [sweep_dir] = list((root / "sw").iterdir())
    record = json.loads((sweep_dir / "sweep.json").read_text())
    array = record["array_job_id"]
    assert f"array job {array} (4 elements)" in out
    runs = [Path(e["run_dir"]) for e in record["elements"]]
    assert runs == [sweep_dir / str(i) for i in range(4)]
    assert [job_id(r) for r in runs] == [f"{array}_{i}" for i in range(4)]
    infos = [wait_final(r, 300) for r in runs]
    assert [i.state for i in infos] == ["COMPLETED"] * 4, [i.errors for i in infos]
    accounting = subprocess.run(
        ["sacct", "-j", array, "-X", "-n", "-P", "-o", "JobID,State"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(accounting) == [f"{array}_{i}|COMPLETED" for i in range(4)]
    assert [p.name for p in (sweep_dir / "slurm").glob("*_submission.sh")] == [f"{array}_submission.sh"]
    assert "#SBATCH --array=0-3%4" in (sweep_dir / "slurm" / f"{array}_submission.sh").read_text()
    assert all(last_step(r) == 4 for r in runs)
    assert set().union(*(wandb_group(r) for r in runs)) == {record["group"]}
    out = command_output(capsys, "status", str(sweep_dir))
    assert out.count("COMPLETED") == 4 and f"array job {array}" in out


@pytest.mark.slurm
@pytest.mark.slow
def test_killed_rank_fails_the_job_in_bounded_time_then_cancel_and_resume(slurm_cluster, reference, tmp_path, capsys):
    """kill -9 of one rank: the job fails within the collective timeout, status names the ranks;
    the next submission resumes from the last checkpoint; cancel saves and a further one completes."""
    steps, run = 100, tmp_path / "run"
    common = [
        *TINY,
        *TRAIN,
        "logger=none",
        *slurm(slurm_cluster),
        "cluster.collective_timeout_s=30",
        "train.checkpoint_every=20",
        f"train.max_steps={steps}",
        f"run.dir={run}",
    ]
    tuneforge(*common, "debug.step_sleep_s=0.1")
    wait_until(lambda: last_step(run) >= 25, 300, "step 25")
    victim = task_pids(run)[1]
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    info = wait_final(run, 120)
    assert info.state == "FAILED" and time.time() - killed < 30 + 30  # collective timeout + Slurm's KillWait
    out = command_output(capsys, "status", str(run))
    assert "FAILED" in out and "rank 0: RuntimeError" in out and f"rank 1 (pid {victim}" in out
    assert (run / "checkpoints" / "latest").read_text() == "step_20"

    first_job = job_id(run)
    tuneforge(*common, "debug.step_sleep_s=0.1")  # the same run again: resumes from step 20
    wait_until(
        lambda: job_id(run) != first_job and "resumed from" in rank0_output(run) and last_step(run) >= 30,
        300,
        "resumed and past step 30",
    )
    assert "RUNNING" in command_output(capsys, "status", str(run))
    assert "cancelled Slurm job" in command_output(capsys, "cancel", str(run))
    info = wait_final(run, 120)
    assert info.state == "CANCELLED"
    # Slurm records CANCELLED at once; the ranks save in the KillWait that follows SIGTERM
    wait_until(lambda: of_kind(run, "stopped"), 60, "the cancel's checkpoint")
    [stopped] = of_kind(run, "stopped")
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stopped['step']}"
    assert "CANCELLED" in command_output(capsys, "status", str(run))
    assert "nothing to cancel" in command_output(capsys, "cancel", str(run))

    tuneforge(*common)  # and again: resumes from the cancel's checkpoint and completes
    info = wait_final(run, 300)
    assert info.state == "COMPLETED", info.errors
    assert len(json.loads((run / "submit.json").read_text())["jobs"]) == 3
    assert [m["step"] for m in metrics(run)] == list(range(1, steps + 1))
    assert losses(run) == pytest.approx(reference[:steps], rel=1e-6)
