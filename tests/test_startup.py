"""Time to first step: the start-up phases a run prints and writes to summary.json (trainers/startup.py)."""

from __future__ import annotations

import json
import time

import pytest
from conftest import TINY, tuneforge

from tuneforge.slurm import events
from tuneforge.trainers.startup import StartUp, describe, process_start_time

DEFAULT_JOB = ["process group", "tokenizer", "data", "model", "backend", "logger", "GEMM ceiling", "first step"]


def check_phases(values: dict, names: list) -> None:
    """In order, from the process start, each starting where the last ended; the durations add up to no
    more than the time to the first step."""
    phases = values["startup_phases"]
    assert [p["phase"] for p in phases] == ["imports", *names]
    assert phases[0]["start_s"] == 0.0
    for before, after in zip(phases, phases[1:]):
        assert after["start_s"] >= before["start_s"]
        assert after["start_s"] == pytest.approx(before["start_s"] + before["seconds"], abs=1e-9)
    assert all(p["seconds"] >= 0 for p in phases)
    assert values["first_step_start_s"] == phases[-1]["start_s"]
    assert sum(p["seconds"] for p in phases) <= values["time_to_first_step_s"] + 1e-9
    assert values["time_to_first_step_s"] == pytest.approx(phases[-1]["start_s"] + phases[-1]["seconds"], abs=1e-9)


def test_phases_are_timed_from_the_process_start_and_add_up():
    told = []
    startup = StartUp(lambda name, detail="": told.append((name, detail)))
    assert abs(startup.started - process_start_time()) < 0.05 and startup.started <= time.time()
    import psutil

    assert abs(startup.started - psutil.Process().create_time()) < 1.5  # psutil's: to the boot's whole second
    startup("tokenizer")
    startup("data", "demo_corpus")
    startup.note("cache hit")
    startup("first step")
    values = startup.first_step_done()
    assert told == [("tokenizer", ""), ("data", "demo_corpus"), ("first step", "")]  # passed on as they came
    check_phases(values, ["tokenizer", "data", "first step"])
    assert values["startup_phases"][2]["detail"] == "demo_corpus; cache hit"
    assert startup.first_step_done() == {}  # once per process
    line = describe(values)
    assert line.startswith("start-up: first step done") and "data " in line and "(demo_corpus; cache hit)" in line


@pytest.mark.slow
def test_a_run_prints_and_records_its_start_up_phases(tmp_path):
    args = [*TINY, "logger=none", "train.max_steps=2", "train.micro_batch=2", "train.global_batch=4"]
    args += ["cluster.tasks_per_node=1", "train.checkpoint_every=0"]
    for name in ("first", "second"):  # the second finds the first's token cache
        tuneforge(*args, f"run.dir={tmp_path / name}")
    run = tmp_path / "second"
    values = json.loads((run / "summary.json").read_text())
    check_phases(values, DEFAULT_JOB)
    data = next(p for p in values["startup_phases"] if p["phase"] == "data")
    assert data["detail"] == "demo_corpus; cache hit"
    # the same phases as the events the launcher shows (one announcement, two readers)
    announced = [e["phase"] for e in events.read(run) if e["event"] == "phase"]
    assert announced == DEFAULT_JOB
    log = "".join(p.read_text() for p in (run / "slurm").glob("*_log.out"))
    assert "start-up: first step done" in log and "data " in log
