"""A hostile or careless user, through the real CLI: nothing gets in, nothing is lost, bad input is named.

- every value that reaches the sbatch script is refused when it could end an #SBATCH line or run as a
  command, or is quoted so that it cannot: the script of every accepted hostile value is RUN by bash
  against a stand-in `srun` that records its argv, and every #SBATCH line must still be read;
- a credential in any common spelling is refused, named by its key, never echoed;
- a damaged checkpoint is skipped (said so, and why) and the run resumes from the previous complete one
  with the loss curve of an uninterrupted run; export and status say the same; never from step 0 over them;
- one run, one directory: a second submission into a run dir owned by a live job is refused naming it;
  a finished run says so; a resume with another model changes nothing;
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from conftest import TINY, losses, metrics, tuneforge

from tuneforge.launch.cli import main as cli
from tuneforge.launch.compose import compose
from tuneforge.launch.validate import validate
from tuneforge.slurm import executors

# ------------------------------------------------------------------------------------------ helpers
#: a Slurm profile whose script is looked at, not submitted: the partition beside the tests is not asked
SLURM = ("cluster=slurm", "cluster.check_site=false")


def run_cli(capsys, *args: str) -> Tuple[int, str, str]:
    capsys.readouterr()
    code = cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def hydra_quoted(value: str) -> str:
    """`value` as one quoted Hydra override value (Hydra unescapes \\' and \\\\ inside quotes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def payloads(marker: Path) -> List[str]:
    """Ways of running `touch marker` from a value written into a shell script."""
    m = str(marker)
    return [
        f"x$(touch {m})",
        f"x`touch {m}`",
        f"x;touch {m}",
        f"x' ; touch {m} ; '",
        f'x" ; touch {m} ; "',
        f"x\ntouch {m}",
        f"x\rtouch {m}",
        "x\n",
        f"x && touch {m}",
        f"x|touch {m}",
        f"x > {m}",
        f"x\x00touch {m}",
        f"x\u2028touch {m}",
        f"x\\\ntouch {m}",
    ]


def sbatch_directives(script: str) -> Dict[str, str]:
    """The #SBATCH options sbatch reads: those before the first line that is not blank or a comment.
    Asserts that no #SBATCH line comes after that point (sbatch would silently ignore it) and that each
    line is one option, unquoted as the shell (and sbatch) would."""
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    read: List[str] = []
    for line in lines[1:]:
        if not line.strip():
            continue
        if not line.lstrip().startswith("#"):
            break
        if line.startswith("#SBATCH"):
            read.append(line)
    every = [line for line in lines if line.lstrip().upper().startswith("#SBATCH")]
    assert read == every, f"#SBATCH lines after the first command: {sorted(set(every) - set(read))}"
    options = {}
    for line in read:
        words = shlex.split(line[len("#SBATCH") :])
        assert len(words) == 1 and words[0].startswith("--"), line
        key, _, value = words[0][2:].partition("=")
        options[key] = value
    return options


def run_script(script: str, tmp_path: Path) -> List[str]:
    """Run the sbatch script with bash, `srun` replaced by a stub that records its argv; its argv."""
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$SRUN_ARGV"\n')
    srun.chmod(0o755)
    argv_file = tmp_path / "srun-argv"
    argv_file.unlink(missing_ok=True)
    script_file = tmp_path / "job.sh"
    script_file.write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_ARGV": str(argv_file)}
    done = subprocess.run(["bash", str(script_file)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert argv_file.is_file(), f"srun never ran: {done.stdout} {done.stderr}"
    return argv_file.read_text().split("\0")[:-1]


def dry_run_script(out: str, header: str = "# sbatch script\n") -> Tuple[str, Path]:
    """(the sbatch script, the run or sweep dir) printed by --dry-run."""
    script = out.split(header, 1)[1].split("\n# preflight", 1)[0].split("\n# dry run", 1)[0]
    run_dir = out.rsplit("# dry run: nothing submitted, ", 1)[1].rsplit(" not created", 1)[0]
    return script + "\n", Path(run_dir)


def expected_srun_argv(folder: Path, array: bool = False) -> List[str]:
    job = "%A_%a" if array else "%j"
    return [
        "--unbuffered",
        "--output",
        f"{folder}/{job}_%t_log.out",
        "--error",
        f"{folder}/{job}_%t_log.err",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-u",
        "-m",
        executors.SUBMIT_MODULE,
        str(folder),
    ]


# ------------------------------------------------------------------------------------------ sbatch script
SCRIPT_KEYS = [
    # (key, how one hostile value is given as an override)
    ("cluster.partition", lambda v: f"cluster.partition={hydra_quoted(v)}"),
    ("cluster.account", lambda v: f"cluster.account={hydra_quoted(v)}"),
    ("cluster.qos", lambda v: f"cluster.qos={hydra_quoted(v)}"),
    ("cluster.constraint", lambda v: f"cluster.constraint={hydra_quoted(v)}"),
    ("cluster.job_name", lambda v: f"cluster.job_name={hydra_quoted(v)}"),
    ("cluster.extra_sbatch[0]", lambda v: f"cluster.extra_sbatch=[{hydra_quoted('--comment=' + v)}]"),
    ("cluster.extra_sbatch[0]", lambda v: f"cluster.extra_sbatch=[{hydra_quoted('--' + v)}]"),
    ("cluster.setup[0]", lambda v: f"cluster.setup=[{hydra_quoted('echo ' + shlex.quote(v))}]"),
    ("run.name", lambda v: f"run.name={hydra_quoted(v)}"),
    ("run.root", lambda v: f"run.root={hydra_quoted('/tmp/tf hostile/' + v)}"),
    ("run.dir", lambda v: f"run.dir={hydra_quoted('/tmp/tf hostile/' + v + '/run')}"),
]


@pytest.mark.parametrize("key,override", SCRIPT_KEYS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(SCRIPT_KEYS)])
def test_hostile_sbatch_values_are_refused_or_quoted_and_never_run(key, override, tmp_path, capsys):
    """Each hostile value of each key that reaches the script: refused naming the key (exit 2), or its
    script, run by bash, reads every #SBATCH line, runs no payload and hands srun the exact paths."""
    marker = tmp_path / "PAYLOAD-RAN"
    accepted = 0
    for value in payloads(marker):
        code, out, err = run_cli(capsys, *SLURM, override(value), "--dry-run")
        if code != 0:
            assert code == 2, err
            assert key in err or key.split("[")[0] in err, (value, err)
            assert "Traceback" not in err
            if executors.unsafe_character(value):
                assert all(executors.unsafe_character(line) is None for line in err.splitlines()), err
            continue
        accepted += 1
        script, run_dir = dry_run_script(out)
        options = sbatch_directives(script)
        folder = run_dir / "slurm"
        assert options["time"] == "60" and options["signal"] == "USR2@120" and options["nodes"] == "1"
        assert options["output"] == f"{folder}/%j_0_log.out" and options["error"] == f"{folder}/%j_0_log.err"
        assert run_script(script, tmp_path) == expected_srun_argv(folder)
        assert not marker.exists(), f"{key}={value!r} ran its payload"
    if key.startswith(("run.root", "run.dir", "cluster.setup")):
        assert accepted >= 5, "paths and quoted setup arguments with quotes, $ and ; are valid: quoted, not refused"


def test_the_last_guard_refuses_what_validation_would_have(tmp_path):
    """Values that never went through the CLI (a config built in code) cannot write a script either."""
    base = compose(["cluster=slurm"]).cluster
    for change in (
        {"partition": "debug\ntouch /tmp/x"},
        {"job_name": "a b"},
        {"setup": ["module load x\nrm -rf ~"]},
        {"extra_sbatch": ["--reservation=x\n"]},
    ):
        with pytest.raises(ValueError, match="sbatch parameter|extra sbatch line"):
            executors.sbatch_script(dataclasses.replace(base, **change), tmp_path / "slurm")
    with pytest.raises(ValueError, match="refusing to write the script"):
        executors.sbatch_script(base, tmp_path / "a\nb" / "slurm")


def test_validation_checks_the_whole_value_of_every_script_key():
    """`validate` itself (not only Hydra's parser) refuses a trailing line break in every such key."""
    cfg = compose(["cluster=slurm"])
    cases = {
        "cluster.partition": dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, partition="debug\n")),
        "cluster.extra_sbatch[0]": dataclasses.replace(
            cfg, cluster=dataclasses.replace(cfg.cluster, extra_sbatch=["--exclusive\n"])
        ),
        "cluster.setup[0]": dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, setup=["true\n"])),
        "run.name": dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="default\n")),
        "run.dir": dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir="/tmp/run\n")),
        "run.root": dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, root="/tmp/\r")),
    }
    for key, bad in cases.items():
        assert key in {p.key for p in validate(bad)}, key


@pytest.mark.parametrize(
    "line,key",
    [
        ("--time=5", "cluster.timeout_min"),
        ("--tim=5", "cluster.timeout_min"),  # sbatch expands unambiguous abbreviations
        ("--nodes=4", "cluster.nodes"),
        ("--ntasks=8", "cluster.tasks_per_node"),
        ("--array=0-9", "sweep"),
        ("--signal=USR1@60", "cluster.signal_delay_s"),
        ("--output=/tmp/x.out", "run.dir"),
        ("--error=/tmp/x.err", "run.dir"),
        ("--job-name=x", "cluster.job_name"),
        ("--gres=gpu:8", "cluster.gpus_per_node"),
        ("--mem=100G", "cluster.mem_gb"),
        ("--partition=gpu", "cluster.partition"),
        ("--no-requeue", "cluster.max_requeues"),
    ],
)
def test_extra_sbatch_lines_may_not_override_what_tuneforge_sets(line, key, capsys):
    code, _, err = run_cli(capsys, *SLURM, f"cluster.extra_sbatch=[{hydra_quoted(line)}]", "--dry-run")
    assert code == 2 and "cluster.extra_sbatch[0]" in err and key in err, err


def test_hostile_sweep_is_refused_per_element_or_its_array_script_is_safe(tmp_path, capsys):
    marker = tmp_path / "PAYLOAD-RAN"
    root = f"/tmp/tf hostile/x' ; touch {marker} ; '$(touch {marker})"
    code, out, err = run_cli(capsys, "-m", *SLURM, f"run.root={hydra_quoted(root)}", "train.lr=1e-3,2e-3", "--dry-run")
    assert code == 0, err
    script, sweep_dir = dry_run_script(out, "# sbatch script (one job array of 2)\n")
    options = sbatch_directives(script)
    folder = sweep_dir / "slurm"
    assert options["array"] == "0-1%2" and options["time"] == "60" and options["output"] == f"{folder}/%A_%a_0_log.out"
    assert run_script(script, tmp_path) == expected_srun_argv(folder, array=True)
    assert not marker.exists()
    # a hostile value in one element of the sweep names that element and the key; nothing is written
    code, _, err = run_cli(
        capsys, "-m", "cluster=slurm", f"cluster.account=ok,{hydra_quoted('x' + chr(10) + 'touch ' + str(marker))}"
    )
    assert code == 2 and "element 1" in err and "cluster.account" in err, err


# ------------------------------------------------------------------------------------------ secrets
HF = "hf_" + "Q" * 34  # the shape of a Hugging Face token
WANDB = "0123456789abcdef" * 2 + "01234567"  # 40 hex characters, the shape of a W&B key
SPELLINGS = [
    ("cluster.setup[0]", f"cluster.setup=[{hydra_quoted('export WANDB_API_KEY=' + WANDB)}]", WANDB),
    ("cluster.setup[0]", f"cluster.setup=[{hydra_quoted('WANDB_API_KEY=' + WANDB + ' python x.py')}]", WANDB),
    ("cluster.setup[0]", f"cluster.setup=[{hydra_quoted('export HF_TOKEN=' + chr(34) + HF + chr(34))}]", HF),
    ("cluster.setup[1]", f"cluster.setup=[true,{hydra_quoted('huggingface-cli login --token ' + HF)}]", HF),
    ("cluster.setup[0]", f"cluster.setup=[{hydra_quoted('hf auth login --token=' + HF)}]", HF),
    ("cluster.setup[0]", f"cluster.setup=[{hydra_quoted('wandb login ' + WANDB)}]", WANDB),
    ("cluster.setup[0]", f"cluster.setup=[{hydra_quoted('setenv GITHUB_TOKEN ghp_' + 'a' * 36)}]", "a" * 36),
    ("cluster.setup[0]", f"cluster.setup=[{hydra_quoted('env AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI python')}]", "wJalrX"),
    ("cluster.setup[0]", f"cluster.setup=[{hydra_quoted('export PGPASSWORD=hunter2hunter2')}]", "hunter2"),
    (
        "cluster.setup[0]",
        f"cluster.setup=[{hydra_quoted('curl -H ' + chr(34) + 'Authorization: Bearer abcdef123456' + chr(34) + ' x')}]",
        "abcdef123456",
    ),
    (
        "cluster.setup[0]",
        f"cluster.setup=[{hydra_quoted('pip install --index-url https://me:s3cretpw@pypi.example/simple x')}]",
        "s3cretpw",
    ),
    ("cluster.extra_sbatch[0]", f"cluster.extra_sbatch=[{hydra_quoted('--comment=' + HF)}]", HF),
    (
        "model.name_or_path",
        f"model.name_or_path={hydra_quoted('https://user:pa55word@models.example/llama')}",
        "pa55word",
    ),
    ("logger.entity", f"logger.entity={HF}", HF),
    ("train.lr", f"train.lr={HF}", HF),  # a value that also fails to compose: the type error must not echo it
    ("logger.api_key", f"+logger.api_key={WANDB}", WANDB),  # a key that does not exist, named by what it holds
]


@pytest.mark.parametrize("key,override,secret", SPELLINGS, ids=[o[:40] for _, o, _ in SPELLINGS])
def test_credentials_in_any_spelling_are_refused_without_echoing_them(key, override, secret, tmp_path, capsys):
    code, out, err = run_cli(capsys, *SLURM, override, f"run.root={tmp_path}/runs", "--dry-run")
    assert code == 2 and key in err, err
    assert secret not in err and secret not in out, err
    assert "****" in err and not (tmp_path / "runs").exists()


def test_references_to_credentials_and_lookalikes_pass(capsys):
    for line in (
        "export HF_TOKEN=$HF_TOKEN",
        'export WANDB_API_KEY="$WANDB_API_KEY"',
        "export HF_TOKEN=$(cat ~/.cache/huggingface/token)",
        "export TOKENIZERS_PARALLELISM=false",
        "git checkout " + WANDB,  # 40 hex characters that are a commit
        "wandb login $WANDB_API_KEY",
    ):
        code, _, err = run_cli(capsys, *SLURM, f"cluster.setup=[{hydra_quoted(line)}]", "--dry-run")
        assert code == 0, (line, err)
    assert run_cli(capsys, "model.tokenizer=null", "--dry-run")[0] == 0


def test_submit_json_records_the_diff_stat_and_hash_not_the_diff(tmp_path, monkeypatch):
    from tuneforge.launch import rundir

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / ".env").write_text("A=1\n")
    (repo / "train.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=repo, check=True)
    (repo / ".env").write_text(f"A=1\nHF_TOKEN={HF}\n")
    (repo / "train.py").write_text(f"x = 2\ntoken = '{HF}'\n")
    monkeypatch.chdir(repo)
    cfg = rundir.with_run_dir(compose([f"run.dir={tmp_path / 'run'}"]))
    record = (rundir.create(cfg, ["x"]) / "submit.json").read_text()
    assert HF not in record and "A=1" not in record
    state = __import__("json").loads(record)["git"]
    assert state["dirty"] and ".env" in state["diff_stat"] and len(state["diff_sha256"]) == 64 and "diff" not in state
    cfg = rundir.with_run_dir(compose([f"run.dir={tmp_path / 'run2'}", "run.record_diff=true"]))
    state = __import__("json").loads((rundir.create(cfg, ["x"]) / "submit.json").read_text())["git"]
    assert "x = 2" in state["diff"] and "hf_****" not in state["diff"] and HF not in state["diff"]
    assert ".env" not in state["diff"]  # only code files, even when asked


# ------------------------------------------------------------------------------------------ checkpoints
RUN = [
    *TINY,
    "logger=none",
    "train.max_steps=10",
    "train.warmup_steps=2",
    "train.checkpoint_every=3",
    "train.micro_batch=2",
    "train.global_batch=8",
    "train.lr=3e-3",
    "cluster.tasks_per_node=1",
]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Tuple[List[float], Path]:
    """(losses of an uninterrupted 10-step run, a run dir of the same run stopped after step 7: its
    complete checkpoints are step_6 and step_7)."""
    base = tmp_path_factory.mktemp("checkpoints")
    tuneforge(*RUN, f"run.dir={base / 'reference'}")
    tuneforge(*RUN, f"run.dir={base / 'stopped'}", "debug.stop_after=7")
    assert sorted(p.name for p in (base / "stopped" / "checkpoints").glob("step_*")) == ["step_6", "step_7"]
    return losses(base / "reference"), base / "stopped"


def copy_run(source: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(source, run)
    return run


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGE = {
    "truncated engine state": (lambda ck: truncate(ck / "step_7" / "engine" / "ddp_state.pt"), "truncated"),
    "deleted rank state": (lambda ck: (ck / "step_7" / "rank" / "rank_0.json").unlink(), "rank/rank_0.json is missing"),
    "changed trainer state": (
        lambda ck: (ck / "step_7" / "trainer.json").write_text(
            (ck / "step_7" / "trainer.json").read_text().replace("7", "9")
        ),
        "does not match its hash",
    ),
    "no manifest, latest names a step that does not exist": (
        lambda ck: ((ck / "step_7" / "manifest.json").unlink(), (ck / "latest").write_text("step_99")),
        "no manifest.json",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_skipped_and_the_run_resumes_from_the_previous_one(damage, interrupted, tmp_path, capsys):
    reference, stopped = interrupted
    run = copy_run(stopped, tmp_path)
    hurt, reason = DAMAGE[damage]
    hurt(run / "checkpoints")
    code, out, err = run_cli(capsys, *RUN, f"run.dir={run}")
    assert code == 0, err
    assert "resuming from step_6 (" in out and "skipped step_7: " in out and reason in out, out
    log = runinfo_log(run)
    assert f"resumed from {run / 'checkpoints' / 'step_6'} at step 6" in log and reason in log
    assert [m["step"] for m in metrics(run)] == list(range(1, 11))
    assert losses(run) == pytest.approx(reference, abs=1e-6)  # the curve of the uninterrupted run
    assert (run / "final" / "model.safetensors").is_file()


def submit_directly(run: Path, folder: Path):
    """Start a job on a run dir's config without the launcher (no claim, no checks): submitit itself."""
    from tuneforge.conf.schema import load
    from tuneforge.slurm.job import TrainJob

    cfg = load(run / "config.yaml")
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run)))  # a copy's own dir
    return executors.make_executor(cfg.cluster, folder).submit(TrainJob(), cfg)


def runinfo_log(run: Path) -> str:
    from tuneforge.commands import runinfo

    return runinfo.latest_job(run).paths(0).stdout.read_text()


@pytest.mark.slow
def test_export_and_status_take_the_checkpoint_a_resume_would(interrupted, tmp_path, capsys):
    _, stopped = interrupted
    run = copy_run(stopped, tmp_path)
    truncate(run / "checkpoints" / "step_7" / "engine" / "ddp_state.pt")
    code, out, err = run_cli(capsys, "status", str(run))
    assert code == 0 and "checkpoint run: step_6 (skipped step_7: engine/ddp_state.pt is" in out, out
    code, out, err = run_cli(capsys, "export", str(run), "--step", "7")
    assert code == 2 and "step_7" in err and "truncated" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "export", str(run))
    assert code == 0 and "skipped step_7" in err and (run / "export" / "step_6" / "model.safetensors").is_file(), err


@pytest.mark.slow
def test_never_from_step_0_over_damaged_checkpoints_and_never_overwrite_them(interrupted, tmp_path, capsys):
    _, stopped = interrupted
    run = copy_run(stopped, tmp_path)
    for step in (6, 7):
        truncate(run / "checkpoints" / f"step_{step}" / "rng" / "rank_0.pt")
    config = (run / "config.yaml").read_text()
    jobs = json.loads((run / "submit.json").read_text())["jobs"]
    code, out, err = run_cli(capsys, *RUN, f"run.dir={run}")
    assert code == 2 and "run.dir" in err and "none is complete" in err and "step_6: rng/rank_0.pt" in err, err
    assert (run / "config.yaml").read_text() == config and json.loads((run / "submit.json").read_text())["jobs"] == jobs
    # the job refuses too, when it is started some other way (here: the run dir's own submission)
    job = submit_directly(run, run / "slurm")
    with pytest.raises(Exception, match="none is complete"):
        job.result()
    assert (run / "checkpoints" / "step_6").is_dir() and not (run / "final").exists()


@pytest.mark.slow
def test_resume_with_another_model_shape_changes_nothing(interrupted, tmp_path, capsys):
    _, stopped = interrupted
    run = copy_run(stopped, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, *RUN, "model.hidden_size=64", "method.tokenizer_min_frequency=3", f"run.dir={run}")
    assert code == 2 and "model.hidden_size: the checkpoints" in err and "32" in err and "64" in err, err
    assert "method.tokenizer_min_frequency" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_finished_run_says_so_and_continues_when_max_steps_is_raised(interrupted, tmp_path, capsys):
    _, stopped = interrupted
    run = copy_run(stopped, tmp_path)
    tuneforge(*RUN, f"run.dir={run}")  # finishes the run
    code, out, err = run_cli(capsys, *RUN, f"run.dir={run}")
    assert code == 0 and "is finished: trained to step 10 (train.max_steps=10)" in out, out + err
    code, out, err = run_cli(capsys, *RUN, "train.max_steps=12", f"run.dir={run}")
    assert code == 0, err
    assert [m["step"] for m in metrics(run)][-3:] == [10, 11, 12] and "resuming from step_10" in out


# ------------------------------------------------------------------------------------------ one run, one dir
def test_a_dead_owner_does_not_hold_the_run_dir(tmp_path, capsys):
    from tuneforge.slurm import owner

    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / "owner.json").write_text(
        json.dumps({"job_id": str(dead.pid), "cluster": "local", "host": os.uname().nodename, "pid": dead.pid})
    )
    assert owner.busy(run) is None
    # a live local process holds it; the same pid reused by another process later does not
    (run / "owner.json").write_text(
        json.dumps(
            {
                "job_id": str(os.getpid()),
                "cluster": "local",
                "host": os.uname().nodename,
                "pid": os.getpid(),
                "pid_start": owner.process_start(os.getpid()),
            }
        )
    )
    assert f"local job {os.getpid()}" in owner.busy(run)
    code, _, err = run_cli(capsys, *RUN, f"run.dir={run}")
    assert code == 2 and f"owned by local job {os.getpid()}" in err, err
    record = json.loads((run / "owner.json").read_text())
    (run / "owner.json").write_text(json.dumps({**record, "pid_start": record["pid_start"] - 1000}))
    assert owner.busy(run) is None


@pytest.mark.slow
def test_second_submission_into_a_busy_run_dir_is_refused_naming_the_job(tmp_path, capsys):
    run = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    first = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.launch.cli", *RUN, "debug.step_sleep_s=1", f"run.dir={run}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").is_file():
            assert time.time() < deadline and first.poll() is None, "the first run never started"
            time.sleep(0.5)
        job_id = json.loads((run / "owner.json").read_text())["job_id"]
        code, _, err = run_cli(capsys, *RUN, f"run.dir={run}")
        assert code == 2 and f"owned by local job {job_id}" in err and "running" in err, err
        assert json.loads((run / "submit.json").read_text())["jobs"][-1]["job_id"] == job_id  # nothing submitted
        # a job started into it some other way refuses to train, naming the owner
        job = submit_directly(run, tmp_path / "other")
        with pytest.raises(Exception, match=f"owned by local job {job_id}"):
            job.result()
    finally:
        out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert [m["step"] for m in metrics(run)] == list(range(1, 11))  # the first run was not disturbed


# ------------------------------------------------------------------------------------------ files that lie
def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def parquet_bytes(tmp_path: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    whole = tmp_path.parent / "whole.parquet"
    pq.write_table(pa.table({"text": [f"document number {i} " * 20 for i in range(200)]}), whole)
    return whole.read_bytes()


BAD_DATA = {
    # name: (make(tmp) -> the path given as data.path, extra overrides, what the one line must say)
    "latin-1 text": (
        lambda t: write(t / "d.txt", b"hello\n\ncaf\xe9 au lait\n"),
        [],
        ["d.txt:3:", "not UTF-8", "byte 0xe9 at byte 10"],
    ),
    "latin-1 jsonl row": (
        lambda t: write(t / "d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
        [],
        ["d.jsonl:2:", "not UTF-8", "at byte 28"],
    ),
    "UTF-16 jsonl": (lambda t: write(t / "d.jsonl", '{"text": "a"}\n'.encode("utf-16")), [], ["d.jsonl:1:", "UTF-16"]),
    "a PNG called .txt": (
        lambda t: write(t / "d.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
        [],
        ["d.txt:1:", "0x89"],
    ),
    "NUL bytes in a csv": (
        lambda t: write(t / "d.csv", b"text\nfine\nbad\x00\x00\n"),
        [],
        ["d.csv:3:", "binary data (a NUL byte"],
    ),
    "not Parquet at all": (
        lambda t: write(t / "d.parquet", b"PAR1 but not really" * 50),
        [],
        ["d.parquet", "not a readable Parquet"],
    ),
    "truncated Parquet": (
        lambda t: write(t / "d.parquet", parquet_bytes(t)[:3000]),
        [],
        ["d.parquet", "not a readable Parquet"],
    ),
    "JSON nested 100000 deep": (
        lambda t: write(t / "d.jsonl", b"[" * 100000 + b"\n"),
        [],
        ["d.jsonl:1:", "nested too deeply"],
    ),
    "JSON file nested deep": (lambda t: write(t / "d.json", b"[" * 100000), [], ["d.json:1:", "nested too deeply"]),
    "a CSV cell past the csv module's limit": (
        lambda t: write(t / "d.csv", b"text\n" + b"x" * 200_000 + b"\n"),
        ["data.text_sample_by=line"],
        None,  # read whole, as pandas reads it: accepted
    ),
    "a UTF-8 byte-order mark": (
        lambda t: write(t / "d.jsonl", b"\xef\xbb\xbf" + b'{"text": "hello"}\n' * 20),
        [],
        None,
    ),
}


@pytest.mark.parametrize("name", list(BAD_DATA))
def test_data_files_that_are_not_what_they_claim_are_named_in_one_line(name, tmp_path, capsys):
    make, extra, expected = BAD_DATA[name]
    path = make(tmp_path / "data")
    code, _, err = run_cli(
        capsys, f"data.path={path}", "train.micro_batch=1", "train.global_batch=2", *extra, "--dry-run"
    )
    if expected is None:
        assert code == 0, err
        return
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("  data.path: ")]
    assert len(lines) == 1, err
    assert all(part in lines[0] for part in expected), lines[0]


def run_cli_subprocess(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI in a child process with a time limit: what must not hang (a FIFO would block a reader)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "tuneforge.launch.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_special_files_are_refused_before_they_are_opened(tmp_path):
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "x"}\n')
    os.mkfifo(folder / "b.jsonl")
    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(model / "config.json")
    for args, key, what in (
        ([f"data.path={fifo}"], "data.path", f"{fifo}: is a FIFO"),
        ([f"data.path={folder}", "data.format=text"], "data.path", f"{folder / 'b.jsonl'}: is a FIFO"),
        (["model=hf", "method=full", f"model.name_or_path={model}"], "model.name_or_path", "config.json: is a FIFO"),
        ([f"model.tokenizer={fifo}"], "model.tokenizer", "is a FIFO"),
        (
            [f"data.sources=[{{name:a,path:'{fifo}'}},{{name:b,path:'{folder / 'a.jsonl'}'}}]"],
            "data.sources[0].path",
            f"{fifo}: is a FIFO",
        ),
    ):
        done = run_cli_subprocess(*args, "--dry-run")
        assert done.returncode == 2 and f"{key}: " in done.stderr and what in done.stderr, done.stderr


def test_unreadable_data_is_named(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    if os.geteuid() == 0:  # root reads any mode: a file whose read fails instead
        (folder / "d.txt").symlink_to("/proc/self/mem")
        expected = "cannot be read"
    else:
        write(folder / "d.txt", b"hello\n").chmod(0)
        expected = "permission denied"
    code, _, err = run_cli(capsys, f"data.path={folder}", "--dry-run")
    assert code == 2 and "data.path: " in err and expected in err and "d.txt" in err, err


def test_the_job_reads_a_byte_order_mark_as_the_precheck_does(tmp_path):
    from tuneforge.data import sources

    path = write(tmp_path / "d.txt", "\ufeffhello world\n\nsecond document\n".encode())
    cfg = compose([f"data.path={path}"]).data
    assert [row["text"] for row in sources.rows(sources.train_source(cfg), cfg)] == ["hello world", "second document"]


LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}


def model_dir(tmp_path: Path, config, weights: bool = True) -> Path:
    path = tmp_path / "model"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights:
        (path / "model.safetensors").write_bytes(b"\2" + b"\0" * 7 + b"{}")  # a safetensors file of no tensors
    return path


BAD_MODELS = {
    "a file": (lambda t: write(t / "model.bin", b"weights"), "model.name_or_path", "is a file"),
    "an empty folder": (lambda t: (t / "empty").mkdir() or t / "empty", "model.name_or_path", "is an empty folder"),
    "config.json not JSON": (
        lambda t: model_dir(t, '{"hidden_size": 64,\n oops'),
        "model.name_or_path",
        "config.json:2: not JSON",
    ),
    "config.json a list": (lambda t: model_dir(t, "[1, 2]"), "model.name_or_path", "must hold a JSON object"),
    "sizes as strings": (
        lambda t: model_dir(t, {**LLAMA, "hidden_size": "64"}),
        "model.name_or_path",
        "'hidden_size' is '64' (str); sizes must be positive integers",
    ),
    "a negative size": (
        lambda t: model_dir(t, {**LLAMA, "num_hidden_layers": -2}),
        "model.name_or_path",
        "'num_hidden_layers' is -2",
    ),
    "no weights": (lambda t: model_dir(t, LLAMA, weights=False), "model.name_or_path", "holds no weights"),
    "longer than the model's positions": (
        lambda t: model_dir(t, LLAMA),
        "train.seq_len",
        "max_position_embeddings=256",
    ),
}


@pytest.mark.parametrize("name", list(BAD_MODELS))
def test_model_paths_that_are_not_models_are_named(name, tmp_path, capsys):
    make, key, what = BAD_MODELS[name]
    path = make(tmp_path)
    code, _, err = run_cli(
        capsys, "model=hf", "method=full", f"model.name_or_path={path}", "train.seq_len=512", "--dry-run"
    )
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"  {key}: ")]
    assert len(lines) == 1 and what in lines[0], err


@pytest.mark.parametrize(
    "make,what",
    [
        (lambda t: write(t / "tok.json", b"{}"), "is a file"),
        (lambda t: (t / "tok").mkdir() or t / "tok", "is an empty folder"),
        (lambda t: write(t / "tok" / "README", b"x").parent, "holds no tokenizer"),
        (lambda t: write(t / "tok" / "tokenizer.json", b"{not json").parent, "tokenizer.json:1: not JSON"),
    ],
)
def test_tokenizer_paths_that_are_not_tokenizers_are_named(make, what, tmp_path, capsys):
    code, _, err = run_cli(capsys, f"model.tokenizer={make(tmp_path)}", "--dry-run")
    assert code == 2 and "model.tokenizer: " in err and what in err, err


# ------------------------------------------------------------------------------------------ numbers
OPTIONS = {
    "model": ["tiny", "llama3_8b"],
    "method": ["pretrain", "full", "lora", "qlora", "adalora", "ia3", "loha", "lokr", "dora"],
    "backend": ["ddp", "fsdp", "zero2", "zero3_offload"],
    "cluster": ["local", "slurm"],
}


def numeric_fields(node, prefix: str = "") -> List[Tuple[str, type, dict]]:
    """(dotted key, int or float, declared bounds) of every number of a composed config."""
    import typing

    hints = typing.get_type_hints(type(node))
    out = []
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += numeric_fields(value, key + ".")
            continue
        kind = next((t for t in (int, float) if t in (hints[f.name], *typing.get_args(hints[f.name]))), None)
        if kind is not None and not isinstance(value, bool) and "choices" not in f.metadata:
            out.append((key, kind, dict(f.metadata)))
    return out


def number_values(kind: type, rules: dict):
    """Numbers for one field: mostly inside its declared range (so that runs reach the preflight), and
    at, just past and far past its bounds, huge, NaN and infinite."""
    from hypothesis import strategies as st

    lo = rules.get("ge", rules.get("gt", -1e6 if kind is float else -(2**20)))
    hi = rules.get("le", rules.get("lt", 1e6 if kind is float else 2**20))
    edges = [v for r in ("ge", "gt", "le", "lt") if r in rules for v in (rules[r] - 1, rules[r], rules[r] + 1)]
    if kind is int:
        inside = st.one_of(st.integers(int(lo), int(min(hi, lo + 64))), st.integers(int(lo), int(hi)))
        hostile = st.one_of(
            st.integers(-(2**80), 2**80), st.sampled_from([-1, 0, 2**31, 2**63, 10**30] + [int(v) for v in edges])
        )
        return st.one_of(inside, inside, hostile).map(str)
    inside = st.floats(lo, hi, exclude_min="gt" in rules, exclude_max="lt" in rules, allow_nan=False)
    hostile = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e300, 1.7e308] + [float(v) for v in edges]),
    )
    return st.one_of(inside, inside, hostile).map(lambda v: "nan" if v != v else repr(v))


@pytest.mark.slow
def test_any_numbers_are_refused_with_a_key_or_estimated_never_a_traceback(tmp_path):
    """Property: for option groups and numbers drawn at random (in range, at and past the declared
    bounds, huge, NaN, infinities), composing + `validate` refuse with a problem naming a key, or the
    preflight prints an estimate (and the sbatch script renders); nothing raises anything else."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tuneforge.launch import preflight, rundir
    from tuneforge.launch.compose import ConfigError, validator

    sections = {f.name for f in dataclasses.fields(compose([]))}

    @st.composite
    def overrides(draw):
        options = dict(OPTIONS)
        options["method"] = ["pretrain"] if draw(st.sampled_from(OPTIONS["model"])) == "tiny" else OPTIONS["method"]
        options["model"] = ["tiny"] if options["method"] == ["pretrain"] else ["llama3_8b"]
        chosen = [f"{group}={draw(st.sampled_from(choices))}" for group, choices in options.items()]
        fields = numeric_fields(compose(chosen))
        picked = draw(st.lists(st.sampled_from(fields), min_size=1, max_size=4, unique_by=lambda f: f[0]))
        return chosen + [f"{key}={draw(number_values(kind, rules))}" for key, kind, rules in picked]

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(overrides())
    def check(args):
        args = [*args, f"run.root={tmp_path}"]
        try:
            cfg = compose(args)
        except ConfigError as e:
            assert str(e).split(":")[0].split(".")[0] in sections | set(OPTIONS), str(e)
            return
        problems = validate(cfg)
        if problems:
            for p in problems:
                assert p.key.split(".")[0].split("[")[0].split("=")[0] in sections, str(p)
            return
        cfg = rundir.with_run_dir(cfg)
        report = preflight.check(cfg, validator(args))
        assert preflight.render(report).startswith("# preflight")
        json.dumps(report.to_dict(), allow_nan=False)  # preflight.json: finite numbers only
        if cfg.cluster.name == "slurm":
            executors.sbatch_script(cfg.cluster, Path(cfg.run.dir) / "slurm")

    check()


# ------------------------------------------------------------------------------------------ contradictions
def test_contradictions_are_refused_naming_the_key(tmp_path, capsys):
    from tuneforge.launch.validate import local_gpus

    more = local_gpus() + 1
    val = write(tmp_path / "val.txt", b"some validation text\n")
    for args, key in (
        ([f"cluster.gpus_per_node={more}", f"cluster.tasks_per_node={more}"], "cluster.gpus_per_node"),
        (["model.attn_implementation=flash_attention_2", "train.dtype=bf16"], "model.attn_implementation"),
        (["train.dtype=fp16"], "train.dtype"),  # ddp: no loss scaling
        (["backend=fsdp", "train.dtype=fp16"], "train.dtype"),
        (["cluster.gpu_memory_gb=80"], "cluster.gpu_memory_gb"),  # and no GPU asked for
        (["cluster=slurm", "cluster.gpu_type=h100_80g"], "cluster.gpu_type"),
        ([f"data.validation_path={val}", "data.validation_fraction=0.1"], "data.validation_fraction"),
        (["cluster=slurm", "cluster.extra_sbatch=['--time=10']"], "cluster.extra_sbatch[0]"),
        (["cluster=slurm", "cluster.timeout_min=2", "cluster.signal_delay_s=120"], "cluster.signal_delay_s"),
        (["cluster.assumed_mfu=5e-324"], "cluster.assumed_mfu"),  # a positive number that makes no time
    ):
        code, _, err = run_cli(capsys, *args, f"run.root={tmp_path}/runs", "--dry-run")
        assert code == 2 and f"  {key}: " in err, (args, err)
    # defaults adapt: an unset warm-up never makes a short run invalid
    assert run_cli(capsys, "train.max_steps=3", "--dry-run")[0] == 0


# ------------------------------------------------------------------------------------------ the cluster and the disk
@pytest.fixture
def tmpfs(tmp_path):
    """A mount point factory: tmpfs(size, *options) -> a fresh directory with its own small filesystem."""
    mounted = []

    def make(size: str, *options: str) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield make
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_run_dir_without_room_for_a_checkpoint_or_read_only_is_refused(tmpfs, capsys):
    small = tmpfs("1m")
    code, _, err = run_cli(capsys, "model=llama3_8b", "method=lora", f"run.root={small}/runs", "--dry-run")
    assert code == 2 and "run.dir: " in err and "one checkpoint of this run takes about" in err, err
    read_only = tmpfs("1m", "ro")
    code, _, err = run_cli(capsys, *RUN, f"run.dir={read_only}/run")
    assert code == 2 and "run.dir: " in err and "read-only file system" in err, err
    code, out, err = run_cli(capsys, *RUN, f"run.root={small}/runs", "--dry-run")
    assert code == 0, err  # a tiny model's checkpoint fits in 1 MiB


@pytest.mark.slow
def test_a_disk_that_fills_up_fails_the_job_in_one_line_and_keeps_the_last_checkpoint(interrupted, tmpfs, capsys):
    import threading

    reference, _ = interrupted
    disk = tmpfs("20m")
    run = disk / "run"
    args = [*RUN, "train.checkpoint_every=2", "debug.step_sleep_s=1", f"run.dir={run}"]
    filler = disk / "filler"

    def fill_after_step_2():
        deadline = time.time() + 300
        while not (run / "checkpoints" / "step_2" / "manifest.json").is_file() and time.time() < deadline:
            time.sleep(0.1)
        free = shutil.disk_usage(disk).free
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, max(0, free - 200 * 1024))  # leaves less than one checkpoint

    thread = threading.Thread(target=fill_after_step_2)
    thread.start()
    code, out, err = run_cli(capsys, *args)
    thread.join()
    assert code == 1, out + err
    failure = [line for line in err.splitlines() if "failed:" in line]
    assert len(failure) == 1 and "no space left on the disk" in failure[0], err
    assert "the last complete checkpoint, step_2, is kept" in failure[0], failure
    assert [c.path.name for c in __import__("tuneforge.layout").layout.checkpoints(run) if c.complete] == ["step_2"]
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial checkpoint is gone
    filler.unlink()
    code, out, err = run_cli(capsys, *args)  # the same command, once there is room: resumes from step 2
    assert code == 0 and "resuming from step_2" in out, out + err
    assert losses(run) == pytest.approx(reference, abs=1e-6)


def test_the_partition_check_is_skipped_with_a_warning_where_slurm_cannot_be_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo, no scontrol: not a login node
    code, out, _ = run_cli(capsys, "cluster=slurm", "--dry-run")
    assert code == 0 and "warning: partition check skipped: scontrol not found" in out, out


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize(
    "args,key,what",
    [
        ([], "cluster.cpus_per_task", "4 CPUs per node asked"),  # the default of cluster=slurm
        (
            ["cluster.cpus_per_task=1", "cluster.nodes=3", "train.global_batch=12"],
            "cluster.nodes",
            "partition debug has 2",
        ),
        (["cluster.cpus_per_task=1", "cluster.mem_gb=4096"], "cluster.mem_gb", "at most"),
        (
            ["cluster.cpus_per_task=1", "cluster.gpus_per_node=1", "cluster.gpu_type=h100_80g"],
            "cluster.gpus_per_node",
            "GPU",
        ),
        (["cluster.cpus_per_task=1", "cluster.partition=gpu"], "cluster.partition", "partitions: debug"),
    ],
)
def test_a_request_the_partition_can_never_satisfy_is_refused(slurm_cluster, args, key, what, tmp_path, capsys):
    code, _, err = run_cli(capsys, "cluster=slurm", *args, f"run.root={tmp_path}/runs")
    assert code == 2 and f"  {key}: " in err and what in err, err
    assert not (tmp_path / "runs").exists()


def wait_done(run: Path, timeout_s: float = 600):
    from tuneforge.commands import runinfo

    deadline = time.time() + timeout_s
    info = runinfo.gather([run])[0]
    while info.state not in runinfo.FINAL_STATES:
        assert time.time() < deadline, f"{run}: still {info.state}"
        time.sleep(2)
        info = runinfo.gather([run])[0]
    return info


@pytest.mark.slurm
@pytest.mark.slow
def test_on_slurm_a_hostile_run_dir_is_quoted_and_a_busy_one_is_refused(slurm_cluster, tmp_path, capsys):
    """A real job whose run dir holds quotes, $(...) and backticks: it runs (nothing of the path is
    executed, its logs land where submitit looks); a second submission while it runs is refused naming
    the job (asked of squeue); once it has ended the same command says the run is finished."""
    marker = tmp_path / "PAYLOAD-RAN"
    run = tmp_path / f"it's a $(touch {marker}) `touch {marker}` run" / "run"
    args = [
        *RUN,
        "train.max_steps=6",
        "train.global_batch=2",
        "train.checkpoint_every=3",
        "debug.step_sleep_s=2",
        "cluster=slurm",
        f"cluster.partition={slurm_cluster}",
        "cluster.cpus_per_task=1",
        "cluster.mem_gb=2",
        "cluster.timeout_min=10",
        f"run.dir={hydra_quoted(str(run))}",
    ]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    job_id = json.loads((run / "submit.json").read_text())["jobs"][-1]["job_id"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and f"owned by slurm job {job_id}" in err and "(squeue)" in err, err
    info = wait_done(run)
    assert info.state == "COMPLETED", (info.state, info.errors)
    assert [m["step"] for m in metrics(run)] == list(range(1, 7))
    assert (run / "slurm" / f"{job_id}_0_log.out").is_file() and not marker.exists()
    from tuneforge.slurm import owner

    deadline = time.time() + 120  # the result is written before Slurm has ended the job (srun, epilog)
    while owner.busy(run) is not None:
        assert time.time() < deadline, owner.busy(run)
        time.sleep(2)
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "is finished" in out, out + err
