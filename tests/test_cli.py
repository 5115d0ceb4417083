"""The command line a user brings from Hydra, axolotl and torchtune: config files, experiments, site
profiles, every problem in one report, help, completion, progress, Ctrl-C, status of any run.

Through the real CLI; the runs are real local runs (the launcher as its own process where a signal
must reach it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY, tuneforge

from tuneforge.commands import runinfo
from tuneforge.launch.cli import main as cli
from tuneforge.slurm import events

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / "examples" / "site"
RUN = [*TINY, "logger=none", "train.micro_batch=2", "train.global_batch=4", "train.checkpoint_every=50"]


def refused(capsys, *args: str) -> str:
    """stderr of a command line that must be refused before anything is written (exit 2)."""
    capsys.readouterr()
    code = cli(list(args))
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def printed_config(capsys, *args: str) -> str:
    capsys.readouterr()
    assert cli(["--print-config", *args]) == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------------------------- config files
def test_a_config_file_is_checked_like_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("good.yaml").write_text(
        "defaults:\n  - override /cluster: slurm\nmodel: tiny\ntrain:\n  lr: 1e-4\n  max_steps: 30\n"
        "cluster:\n  partition: gpu\n"
    )
    cfg = yaml.safe_load(printed_config(capsys, "--config", "good.yaml", "cluster.partition=cli"))
    assert (cfg["cluster"]["name"], cfg["cluster"]["partition"], cfg["train"]["lr"]) == ("slurm", "cli", 1e-4)
    assert cfg["train"]["max_steps"] == 30  # the file's value; the command line's where both set one

    Path("bad.yaml").write_text(
        "defaults:\n  - override /model: llama9\ntrain:\n  lrr: 0.5\n  lr: fast\nmodel:\n  hidden: 3\n"
    )
    err = refused(capsys, "--config", "bad.yaml", "train.seed=x", f"run.root={tmp_path}/runs")
    # each problem of the file named as the command line's would be, and the command line's too
    for problem in (
        "bad.yaml: model=llama9: no such option",
        "bad.yaml: train.lrr: unknown key; did you mean 'lr'?",
        "bad.yaml: train.lr: 'fast' is not a valid Float",
        "bad.yaml: model.hidden: unknown key; did you mean 'hidden_size'?",
        "train.seed: 'x' is not a valid Integer",
    ):
        assert problem in err, err
    assert "5 problem(s)" in err and not (tmp_path / "runs").exists()
    assert "train.lrr: unknown key" in refused(capsys, "train.lrr=0.5")  # the same words on the command line

    assert "no such file" in refused(capsys, "--config", "missing.yaml")
    assert "give it as --config bad.yaml" in refused(capsys, "bad.yaml")  # axolotl's `axolotl train my.yml`


def test_hydra_spellings_of_a_config_dir_and_name(tmp_path, capsys):
    (tmp_path / "conf" / "cluster").mkdir(parents=True)
    (tmp_path / "conf" / "cluster" / "lab.yaml").write_text("defaults: [base_slurm]\npartition: lab\n")
    (tmp_path / "conf" / "exp.yaml").write_text("cluster: lab\ntrain:\n  max_steps: 7\n")
    cfg = yaml.safe_load(printed_config(capsys, "--config-dir", str(tmp_path / "conf"), "--config-name", "exp"))
    assert (cfg["cluster"]["partition"], cfg["train"]["max_steps"]) == ("lab", 7)
    assert "--config-dir DIR" in refused(capsys, "--config-path", "conf")


def test_experiments_are_deltas_chosen_with_or_without_plus(capsys):
    plain = yaml.safe_load(printed_config(capsys, "experiment=smoke"))
    assert yaml.safe_load(printed_config(capsys, "+experiment=smoke")) == plain
    assert (plain["train"]["max_steps"], plain["logger"]["name"]) == (20, "none")
    # the command line comes after the experiment
    assert yaml.safe_load(printed_config(capsys, "experiment=smoke", "train.max_steps=3"))["train"]["max_steps"] == 3
    assert "experiment=smok: no such option; did you mean experiment=smoke?" in refused(capsys, "experiment=smok")


def test_a_saved_config_composes_to_itself(tmp_path, capsys):
    """A run's config.yaml is fully resolved: given back with --config, it composes to the same config
    (its method, backend and cluster chosen by their `name`)."""
    args = [
        "model=llama3_8b",
        "method=qlora",
        "backend=zero3_offload",
        "cluster=slurm",
        "cluster.setup=[module load cuda,source venv/bin/activate]",
        "train.dtype=bf16",
        f"run.dir={tmp_path}/run",
    ]
    saved = tmp_path / "config.yaml"
    saved.write_text(printed_config(capsys, *args))
    assert printed_config(capsys, "--config", str(saved)) == saved.read_text()
    changed = yaml.safe_load(printed_config(capsys, "--config", str(saved), "method.r=4"))
    assert changed["method"]["r"] == 4 and changed["method"]["name"] == "qlora"
    # the same run elsewhere: another cluster option on the command line brings its own settings
    local = yaml.safe_load(printed_config(capsys, "--config", str(saved), "cluster=local"))
    assert local["cluster"] == yaml.safe_load(printed_config(capsys, "cluster=local"))["cluster"]
    assert local["method"] == yaml.safe_load(saved.read_text())["method"]


# ------------------------------------------------------------------------------------ site profiles
def test_a_site_profile_on_the_search_path_composes_like_a_shipped_option(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CONFIG_PATH", str(SITE))
    capsys.readouterr()
    # (another site's partitions, not the test cluster's: not asked)
    assert cli(["cluster=mysite", "cluster.check_site=false", "train.global_batch=64", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --partition=gpu" in out and "#SBATCH --account=myproject" in out
    monkeypatch.delenv("TUNEFORGE_CONFIG_PATH")
    assert "cluster=mysite: no such option" in refused(capsys, "cluster=mysite")

    user = Path(os.environ["XDG_CONFIG_HOME"]) / "tuneforge" / "cluster"  # ~/.config/tuneforge/cluster/
    user.mkdir(parents=True)
    try:
        (user / "home.yaml").write_text("defaults: [base_slurm]\npartition: home\n")
        assert yaml.safe_load(printed_config(capsys, "cluster=home"))["cluster"]["partition"] == "home"
        assert "home" in cli_help(capsys)  # listed with the group's options
        (user / "slurm.yaml").write_text("defaults: [base_slurm]\npartition: shadowed\n")
        assert "the shipped cluster=slurm has this name" in refused(capsys, "cluster=home")
    finally:
        for path in user.glob("*.yaml"):
            path.unlink()


# ------------------------------------------------------------------------------------------- errors
def test_every_unknown_key_and_wrong_type_in_one_report_with_the_cross_field_problems(tmp_path, capsys):
    err = refused(
        capsys, "train.lr=1e-4", "train.lrr=2", "model.hidden=3", "train.seed=x", "train.global_batch=10", "--dry-run"
    )
    assert "train.lrr: unknown key" in err and "model.hidden: unknown key" in err
    assert "train.seed: 'x' is not a valid Integer" in err
    assert "train.global_batch: 10 is not divisible" in err  # validation of what composed
    assert "4 problem(s)" in err


def test_hydra_settings_are_refused_naming_the_tuneforge_key(capsys):
    assert "set run.dir (the run directory) instead" in refused(capsys, "hydra.run.dir=/tmp/x")
    assert "set run.dir instead" in refused(capsys, "-m", "train.lr=1,2", "hydra.sweep.dir=/tmp/x")
    assert "set run.name instead" in refused(capsys, "hydra.job.name=x")
    assert "cluster=slurm or cluster=local" in refused(capsys, "hydra/launcher=submitit_slurm")
    assert "--print-config" in refused(capsys, "--cfg", "job")


def test_sweep_functions_work_or_are_refused_by_name(tmp_path, capsys):
    capsys.readouterr()
    assert cli(["-m", "backend=glob(zero*,exclude=*offload)", "train.seed=range(1,3)", "--dry-run"]) == 0
    labels = {" ".join(line.split()[2:]) for line in capsys.readouterr().out.splitlines() if line[:4].strip().isdigit()}
    assert labels == {f"backend={b} train.seed={seed}" for b in ("zero1", "zero2", "zero3") for seed in (1, 2)}
    assert "add -m" in refused(capsys, "train.lr=range(1,3)")
    assert "add -m" in refused(capsys, "train.lr=1e-4,3e-4")
    assert "interval() needs an optimizing sweeper" in refused(capsys, "-m", "train.lr=interval(0,1)")
    assert "glob() selects options of a config group" in refused(capsys, "-m", "train.lr=glob(*)")
    assert "Hydra has no function extend_list()" in refused(capsys, "cluster.setup=extend_list(a)")


def test_a_mistyped_command_gets_did_you_mean(capsys):
    assert "unknown command 'statu'; did you mean status?" in refused(capsys, "statu")
    assert "unknown option --dryrun; did you mean --dry-run?" in refused(capsys, "--dryrun")


# ------------------------------------------------------------------------------------ discoverability
def cli_help(capsys, *topic: str) -> str:
    capsys.readouterr()
    assert cli(["--help", *topic]) == 0
    return capsys.readouterr().out


def test_help_lists_commands_groups_options_and_examples(capsys):
    text = cli_help(capsys)
    for command in ("status", "logs", "cancel", "sync", "export"):
        assert f"\n  {command} " in text
    groups = {
        line.split()[0]: line for line in text.split("\ngroups (")[1].split("options:")[0].splitlines()[1:] if line
    }
    assert "tiny*" in groups["model"] and "lora" in groups["method"] and "smoke" in groups["experiment"]
    assert "--print-config" in text and "--completion SHELL" in text and "examples:" in text
    keys = cli_help(capsys, "train")
    assert "train.lr=0.001  (in (0, 1])  # peak learning rate" in keys
    assert "experiment=smoke  # The shortest run through every stage" in cli_help(capsys, "experiment")


def test_print_config_prints_only_yaml(capsys):
    text = printed_config(capsys, "method=lora", "model=llama3_8b")
    assert yaml.safe_load(text)["method"]["name"] == "lora"


def test_bash_completion_lists_commands_groups_options_and_keys(tmp_path):
    script = tmp_path / "tuneforge.bash"
    script.write_text(
        subprocess.run(
            [sys.executable, "-m", "tuneforge.launch.cli", "--completion", "bash"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    )

    def complete(line: str) -> list:
        words = line.split() + ([""] if line.endswith(" ") else [])
        program = (
            f"source {script}\nCOMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}\n"
            f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
            '_tuneforge; printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert complete("tuneforge sta") == ["status"]
    assert {"model=", "method=", "backend=", "cluster=", "data=", "logger=", "experiment="} <= set(
        complete("tuneforge ")
    )
    assert set(complete("tuneforge model=")) >= {"tiny", "hf", "llama3_8b"}  # bash replaces what follows '='
    assert complete("tuneforge train.dt") == ["train.dtype="] and complete("tuneforge train.dtype=b") == ["bf16"]
    assert complete("tuneforge --dry") == ["--dry-run"] and complete("tuneforge --completion ") == ["bash", "zsh"]
    assert "cluster.partition=" in complete("tuneforge cluster=slurm cluster.pa")


@pytest.mark.skipif(not __import__("shutil").which("zsh"), reason="zsh is not installed")
def test_zsh_completion_offers_the_same_words(tmp_path):
    script = tmp_path / "_tuneforge"
    script.write_text(
        subprocess.run(
            [sys.executable, "-m", "tuneforge.launch.cli", "--completion", "zsh"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    )
    program = (
        f"autoload -U compinit && compinit -u && source {script} && print -r -- $_comps[tuneforge] && "
        "_tuneforge_candidates model= tuneforge '' 1 && _tuneforge_candidates '' --completion '' 2"
    )
    out = subprocess.run(["zsh", "-c", program], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "_tuneforge_zsh"
    assert {"model=tiny", "model=llama3_8b", "bash", "zsh"} <= set(out.stdout.split())


def test_dry_run_shows_the_sbatch_script_where_slurm_is_not_installed(tmp_path):
    bin_dir = Path(sys.executable).parent  # python only: no srun, no sbatch on this PATH
    env = {**os.environ, "PATH": str(bin_dir)}
    out = subprocess.run(
        [sys.executable, "-m", "tuneforge.launch.cli", "cluster=slurm", "cluster.nodes=2", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --nodes=2" in out.stdout and "srun" in out.stdout


# --------------------------------------------------------------------------------- local runs, slow
def launcher(tmp_path: Path, *args: str) -> subprocess.Popen:
    """The real `tuneforge` launcher as its own process, stdout and stderr to files (not a terminal)."""
    out, err = open(tmp_path / "launcher.out", "w"), open(tmp_path / "launcher.err", "w")
    return subprocess.Popen([sys.executable, "-m", "tuneforge.launch.cli", *args], stdout=out, stderr=err, cwd=tmp_path)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.5)


def steps(run: Path) -> list:
    """The optimizer steps logged (step 0's evaluation, train.eval_on_start, left out)."""
    path = run / "metrics.jsonl"
    logged = [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []
    return [step for step in logged if step > 0]


def rank_pids(run: Path) -> list:
    return [e["pid"] for e in events.read(run) if e["event"] == "task"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_progress_is_one_plain_line_per_step_batch_when_not_a_terminal(tmp_path):
    run = tmp_path / "run"
    proc = launcher(tmp_path, *RUN, "cluster.tasks_per_node=1", "train.max_steps=6", f"run.dir={run}")
    assert proc.wait(timeout=300) == 0, (tmp_path / "launcher.err").read_text()
    err = (tmp_path / "launcher.err").read_text()
    assert "\r" not in err
    lines = err.splitlines()
    phases = [line.split("] ", 1)[1].split(":")[0] for line in lines if line.startswith("[")]
    assert phases == [
        "started (allocation 0)",
        "process group",
        "tokenizer",
        "data",
        "model",
        "backend",
        "logger",
        "GEMM ceiling",
        "first step",
    ]
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == [f"{i}/6" for i in range(1, 7)]
    assert all("loss " in line and "elapsed " in line for line in progress)
    assert "done: step 6" in (tmp_path / "launcher.out").read_text()


@pytest.mark.slow
def test_ctrl_c_saves_on_every_rank_exits_130_and_the_saved_config_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*RUN, "cluster.tasks_per_node=2", "train.max_steps=40", "debug.step_sleep_s=0.25", f"run.dir={run}"]
    proc = launcher(tmp_path, *args)
    wait_for(lambda: len(steps(run)) >= 3, 300, "step 3")
    os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends (the terminal sends it to the ranks too)
    assert proc.wait(timeout=120) == 130
    err, out = (tmp_path / "launcher.err").read_text(), (tmp_path / "launcher.out").read_text()
    assert err.count("stopping: saving a checkpoint") == 1 and "Traceback" not in err
    [stopped] = [e for e in events.read(run) if e["event"] == "stopped"]
    assert stopped["cause"] == "SIGINT" and 3 <= stopped["step"] < 40
    assert [e["reason"] for e in events.read(run) if e["event"] == "checkpoint"] == ["interrupt"]
    assert sorted(e["rank"] for e in events.read(run) if e["event"] == "signal") == [0, 1]
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stopped['step']}"
    assert f"to resume: tuneforge --config {run}" in out
    capsys.readouterr()
    tuneforge("status", str(run))
    assert "STOPPED (Ctrl-C)" in capsys.readouterr().out

    # what the message says: the saved config.yaml (its run.dir) resumes the run
    assert cli(["--config", str(run), "debug.step_sleep_s=0"]) == 0
    assert steps(run) == list(range(1, 41))
    log = runinfo.latest_job(run).paths(0).stdout.read_text()
    assert f"resumed from {run / 'checkpoints' / ('step_' + str(stopped['step']))} at step {stopped['step']}" in log


@pytest.mark.slow
def test_killing_only_the_launcher_stops_its_ranks(tmp_path):
    run = tmp_path / "run"
    args = [*RUN, "cluster.tasks_per_node=2", "train.max_steps=200", "debug.step_sleep_s=0.25", f"run.dir={run}"]
    proc = launcher(tmp_path, *args)
    wait_for(lambda: len(steps(run)) >= 2, 300, "step 2")
    ranks = rank_pids(run)
    assert len(ranks) == 2 and all(map(alive, ranks))
    proc.send_signal(signal.SIGKILL)  # no handler runs: the ranks must notice by themselves
    proc.wait(timeout=30)
    wait_for(lambda: not any(map(alive, ranks)), 60, "the ranks stopped")
    assert sorted(e["rank"] for e in events.read(run) if e["event"] == "launcher_gone") == [0, 1]
    [stopped] = [e for e in events.read(run) if e["event"] == "stopped"]
    assert stopped["cause"] == "launcher gone"
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stopped['step']}"


@pytest.mark.slow
def test_status_finds_a_run_written_anywhere_and_tells_stopped_from_completed(tmp_path, capsys, monkeypatch):
    run = tmp_path / "scratch" / "somewhere"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tuneforge(*RUN, "cluster.tasks_per_node=1", "train.max_steps=4", "debug.stop_after=2", f"run.dir={run}")
    monkeypatch.chdir(elsewhere)  # no ./runs here: the user's index of runs knows it
    capsys.readouterr()
    tuneforge("status")
    out = capsys.readouterr().out
    assert str(run) in out and "STOPPED (debug.stop_after)" in out and "2/4" in out
    tuneforge(*RUN, "cluster.tasks_per_node=1", "train.max_steps=4", f"run.dir={run}")  # resumes, completes
    capsys.readouterr()
    tuneforge("status")
    out = capsys.readouterr().out
    assert "COMPLETED" in out and "STOPPED" not in out and "4/4" in out


def test_ctrl_c_before_submission_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C while the config composes (before anything is submitted): no traceback, nothing created."""
    run = tmp_path / "run"
    code = (
        "import os, signal, sys, threading; from tuneforge.launch.cli import main; "
        "threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start(); "  # composing takes > 0.2 s
        f"sys.exit(main(['--dry-run', 'logger=none', 'run.dir={run}']))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 130, out.stderr
    assert "Traceback" not in out.stderr and "interrupted (Ctrl-C); nothing was submitted" in out.stderr, out.stderr
    assert not run.exists()
