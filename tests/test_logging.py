"""RunLogger and the offline-run reader against the real wandb (offline, no network, no key).

W&B inits cost about a second each, so one requeued run (attempt 1 here, attempt 2 in a fresh
process, like a Slurm requeue) is built once per module and checked by several tests.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tuneforge.conf.schema import LoggerConfig
from tuneforge.trainers import wandb_offline
from tuneforge.trainers.logging import RunLogger, can_reach, have_api_key, resolve_mode

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = {"train": {"lr": 0.001, "max_steps": 7}, "model": {"kind": "tiny"}}
FIRST = {step: 5.0 - step for step in range(5)}  # attempt 1 logs steps 0..4, checkpoints at 2
SECOND = {step: 10.0 + step for step in range(3, 7)}  # attempt 2 resumes from 2 and replays 3, 4

SECOND_ATTEMPT = f"""
import pathlib, sys
from tuneforge.conf.schema import LoggerConfig
from tuneforge.trainers.logging import RunLogger
log = RunLogger(LoggerConfig(name="wandb", mode="offline"), pathlib.Path(sys.argv[1]), {CONFIG!r}, enabled=True)
assert log.mode == "offline", log.mode
log.truncate_after(2)
for step, loss in {SECOND!r}.items():
    log.log({{"loss": loss}}, step=step)
log.summary({{"final_loss": {SECOND[6]!r}}})
log.close()
print("ID", log.wandb_url_or_id)
"""


def _isolate(mp: pytest.MonkeyPatch, home: pathlib.Path) -> None:
    """No key, no netrc, no W&B settings from the machine running the tests.

    WANDB_SERVICE is wandb's own bookkeeping (how child processes find this process's wandb-core):
    restoring an old value after a test would hand later tests, and their children, a dead socket.
    """
    for name in list(os.environ):
        if (name.startswith("WANDB_") and name != "WANDB_SERVICE") or name in ("NETRC", "HTTPS_PROXY", "https_proxy"):
            mp.delenv(name)
    mp.setenv("HOME", str(home))
    mp.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    _isolate(monkeypatch, tmp_path / "home")


@pytest.fixture(autouse=True, scope="module")
def no_wandb_left_running():
    """Leave no wandb-core (nor its WANDB_SERVICE token) behind for the test modules after this one."""
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    assert "WANDB_SERVICE" not in os.environ


def _run_script(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def requeued(tmp_path_factory):
    """A run dir with two attempts of one run: this process (mode auto, no key), then a subprocess."""
    run_dir = tmp_path_factory.mktemp("requeued") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp_path_factory.mktemp("home"))
        cfg = LoggerConfig(name="wandb", mode="auto", tags=["test"])
        first = RunLogger(cfg, run_dir, CONFIG, enabled=True)
        for step, loss in FIRST.items():
            first.log({"loss": loss}, step=step)
        first.close()  # no SIGKILL: the attempt ends cleanly, as after a USR2 checkpoint
        after_first = wandb_offline.read_history(run_dir)
        # The requeued task inherits a token for a wandb-core that is gone (its launcher used wandb).
        stale = f"3-{os.getpid()}-unix-{tmp_path_factory.mktemp('gone')}/socket"
        second = _run_script(SECOND_ATTEMPT, str(run_dir), WANDB_SERVICE=stale)
    return {"dir": run_dir, "first": first, "after_first": after_first, "second_out": second.stdout}


def test_offline_history_round_trip(requeued):
    rows = requeued["after_first"]
    assert [(row["_step"], row["loss"]) for row in rows] == list(FIRST.items())


def test_auto_without_key_goes_offline(requeued):
    first = requeued["first"]
    assert first.mode == "offline" and "no W&B API key" in first.mode_reason
    assert first.wandb_url_or_id == (requeued["dir"] / "wandb_id").read_text().strip()
    assert resolve_mode("auto")[0] == "offline"
    assert resolve_mode("online")[0] == "offline"  # no key: never let wandb prompt for one


def test_auto_defers_to_wandb_mode_env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == ("disabled", "requested")
    assert resolve_mode("offline") == ("offline", "requested")  # an explicit config value wins over it


def test_requeue_continues_the_same_wandb_run(requeued):
    run_dir = requeued["dir"]
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert f"ID {run_id}" in requeued["second_out"]
    assert wandb_offline.read_run_ids(run_dir) == {run_id}
    assert len(wandb_offline.find_offline_runs(run_dir)) == 2
    history = [(row["_step"], row["loss"]) for row in wandb_offline.read_history(run_dir)]
    assert history == list(FIRST.items()) + list(SECOND.items())  # W&B keeps both attempts' rows
    assert wandb_offline.read_config(run_dir) == CONFIG
    assert wandb_offline.read_summary(run_dir)["final_loss"] == SECOND[6]


def test_metrics_jsonl_has_no_replayed_duplicates(requeued):
    run_dir = requeued["dir"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = {**{s: v for s, v in FIRST.items() if s <= 2}, **SECOND}
    assert [(row["step"], row["loss"]) for row in rows] == list(expected.items())
    assert json.loads((run_dir / "summary.json").read_text()) == {"final_loss": SECOND[6]}


def test_disabled_rank_writes_nothing_and_never_imports_wandb(tmp_path):
    script = """
import pathlib, sys
from tuneforge.conf.schema import LoggerConfig
from tuneforge.trainers.logging import RunLogger
run_dir = pathlib.Path(sys.argv[1])
log = RunLogger(LoggerConfig(name="wandb", mode="offline"), run_dir / "rank1", {}, enabled=False)
log.truncate_after(0); log.log({"loss": 1.0}, step=1); log.summary({"a": 1}); log.close()
assert not (run_dir / "rank1").exists() and log.wandb_url_or_id is None
log = RunLogger(LoggerConfig(name="none"), run_dir / "plain", {}, enabled=True)
log.log({"loss": 1.0}, step=1); log.close()
assert (run_dir / "plain" / "metrics.jsonl").exists() and not (run_dir / "plain" / "wandb").exists()
assert "wandb" not in sys.modules
"""
    _run_script(script, str(tmp_path))


def test_truncate_after(tmp_path):
    log = RunLogger(LoggerConfig(name="none"), tmp_path, {}, enabled=True)
    for step in range(10):
        log.log({"loss": float(step)}, step=step)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "lo')  # the torn last line of a killed job
    log.truncate_after(4)
    for step in range(5, 8):  # the resumed run logs on through the same (reopened) file
        log.log({"loss": -float(step)}, step=step)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(8))
    assert rows[4]["loss"] == 4.0 and rows[5]["loss"] == -5.0
    assert not list(tmp_path.glob(".*.tmp"))


def test_invalid_mode_disables_wandb_not_training(tmp_path, capsys):
    log = RunLogger(LoggerConfig(name="wandb", mode="bogus"), tmp_path, {}, enabled=True)  # wandb.init raises
    for step in range(3):
        log.log({"loss": float(step)}, step=step)
    log.summary({"done": True})
    log.close()
    assert log.wandb_url_or_id is None
    assert "W&B init failed" in capsys.readouterr().err
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_wandb_log_failure_mid_run(tmp_path, monkeypatch, capsys):
    import wandb

    log = RunLogger(LoggerConfig(name="wandb", mode="offline"), tmp_path, {}, enabled=True)
    log.log({"loss": 0.0}, step=0)

    def broken(*args, **kwargs):
        raise RuntimeError("wandb-core went away")

    monkeypatch.setattr(wandb.Run, "log", broken)  # inject a failure; the happy path stays real
    for step in range(1, 4):
        log.log({"loss": float(step)}, step=step)
    log.summary({"done": True})
    log.close()
    err = capsys.readouterr().err
    assert err.count("W&B log failed") == 1  # said once, then W&B is off
    assert "WANDB_SERVICE" not in os.environ  # wandb-core was stopped, no token left for children
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    assert wandb_offline.read_run_ids(tmp_path) == {log.wandb_url_or_id}


def test_key_and_route_detection(tmp_path, monkeypatch):
    assert not have_api_key("https://api.wandb.ai")
    netrc_file = tmp_path / "home" / ".netrc"
    netrc_file.parent.mkdir(parents=True, exist_ok=True)
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert have_api_key("https://api.wandb.ai")
    assert not have_api_key("https://wandb.example.org")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert have_api_key("https://wandb.example.org")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a key, but no route: offline
    assert not can_reach("http://127.0.0.1:9", timeout_s=0.5)
    assert resolve_mode("auto") == ("offline", "127.0.0.1 unreachable")
    assert resolve_mode("online") == ("online", "requested")  # asked for, with a key: honoured


def test_reader_handles_multi_block_files_and_torn_tails(tmp_path):
    """Rows spanning 32 KiB blocks reassemble; a file cut mid-chunk (SIGKILL) reads up to the cut."""
    log = RunLogger(LoggerConfig(name="wandb", mode="offline"), tmp_path, {}, enabled=True)
    for step in range(40):  # records across block ends, and one longer than a block (a middle chunk)
        log.log({"loss": float(step), "blob": "x" * (70_000 if step == 20 else 3000)}, step=step)
    log.close()
    (path,) = wandb_offline.find_offline_runs(tmp_path)
    rows = wandb_offline.read_history(tmp_path)
    assert [row["_step"] for row in rows] == list(range(40))
    assert len(rows[20]["blob"]) == 70_000 and rows[-1]["blob"] == "x" * 3000
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    partial = wandb_offline.read_history(tmp_path)
    assert 0 < len(partial) < 40 and [row["_step"] for row in partial] == list(range(len(partial)))


def test_hard_kill_keeps_config_and_flushed_history(tmp_path):
    """SIGKILL (time limit, OOM) skips close(): the config logged at init and rows flushed so far survive."""
    script = f"""
import os, pathlib, signal, sys, time
from tuneforge.conf.schema import LoggerConfig
from tuneforge.trainers.logging import RunLogger
log = RunLogger(LoggerConfig(name="wandb", mode="offline"), pathlib.Path(sys.argv[1]), {CONFIG!r}, enabled=True)
for step in range(3):
    log.log({{"loss": float(step)}}, step=step)
time.sleep(4.0)  # > the 2 s flush interval of the .wandb file
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert wandb_offline.read_config(tmp_path) == CONFIG
    steps = [row["_step"] for row in wandb_offline.read_history(tmp_path)]
    assert steps[:2] == [0, 1]  # wandb holds the newest row open until the next step or finish
