"""A hostile or careless user, through the real CLI: nothing gets in, nothing is lost, bad input is named.

- every value that reaches the sbatch script is refused when it could end an #SBATCH line or run as a
  command, or is quoted so that it cannot: the script of every accepted hostile value is RUN by bash
  against a stand-in `srun` that records its argv, and every #SBATCH line must still be read;
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from tuneforge.launch.cli import main as cli
from tuneforge.launch.compose import compose
from tuneforge.launch.validate import validate
from tuneforge.slurm import executors


# ------------------------------------------------------------------------------------------ helpers
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
        code, out, err = run_cli(capsys, "cluster=slurm", override(value), "--dry-run")
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
    code, _, err = run_cli(capsys, "cluster=slurm", f"cluster.extra_sbatch=[{hydra_quoted(line)}]", "--dry-run")
    assert code == 2 and "cluster.extra_sbatch[0]" in err and key in err, err


def test_hostile_sweep_is_refused_per_element_or_its_array_script_is_safe(tmp_path, capsys):
    marker = tmp_path / "PAYLOAD-RAN"
    root = f"/tmp/tf hostile/x' ; touch {marker} ; '$(touch {marker})"
    code, out, err = run_cli(
        capsys, "-m", "cluster=slurm", f"run.root={hydra_quoted(root)}", "train.lr=1e-3,2e-3", "--dry-run"
    )
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
    code, out, err = run_cli(capsys, "cluster=slurm", override, f"run.root={tmp_path}/runs", "--dry-run")
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
        code, _, err = run_cli(capsys, "cluster=slurm", f"cluster.setup=[{hydra_quoted(line)}]", "--dry-run")
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
