"""Bad input fails in the CLI before anything is submitted: exit code 2, the key named, nothing written."""

from __future__ import annotations

import pytest

from tuneforge.launch.cli import main

BAD = [
    # (overrides, the key the message must name)
    (["train.lrr=1e-4"], "train.lrr"),  # typo'd key
    (["train.lr=fast"], "train.lr"),  # wrong type
    (["train.max_steps=2.5"], "train.max_steps"),  # float for an int
    (["model=llama9"], "model=llama9"),  # unknown group option
    (["+train.foo=1"], "train.foo"),  # adding keys outside the schema
    (["train.global_batch=10"], "train.global_batch"),  # not divisible by micro x world
    (["train.seq_len=1024"], "train.seq_len"),  # longer than the model's positions
    (["model=hf"], "model.name_or_path"),  # missing model path
    (["model=hf", "model.name_or_path=/no/such/model", "method=full"], "model.name_or_path"),  # path does not exist
    (["data.path=/no/such/corpus.txt"], "data.path"),  # missing data
    (["cluster.nodes=0"], "cluster.nodes"),  # impossible resources
    (["cluster.tasks_per_node=0"], "cluster.tasks_per_node"),
    (["cluster.nodes=2"], "cluster.nodes"),  # local runs on one machine only
    (["cluster=slurm", "cluster.partition='gpu; rm -rf ~'"], "cluster.partition"),  # shell metacharacters
    (["cluster=slurm", "cluster.account='$(whoami)'"], "cluster.account"),
    (["cluster=slurm", "cluster.extra_sbatch=['--comment=a b']"], "cluster.extra_sbatch[0]"),
    (["cluster=slurm", "cluster.partition=a;b"], "cluster.partition"),  # unquoted: a syntax error, key named
    (["method=full"], "method"),  # full finetuning of a randomly built model
    (["method=pretrain", "method.r=8"], "method.r"),  # a knob of another method
    (["train.dtype=fp8"], "train.dtype"),
    (["cluster.peak_tflops=0"], "cluster.peak_tflops"),  # MFU needs a positive peak (or none: measured)
    (["train.compile=maybe"], "train.compile"),
    (["logger.mode=sometimes"], "logger.mode"),
    (["run.name=a/b"], "run.name"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_refused_naming_the_key(overrides, key, tmp_path, capsys):
    code = main([*overrides, f"run.root={tmp_path}/runs"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert key in err, err
    assert "nothing submitted" in err
    assert not (tmp_path / "runs").exists()  # no run dir left behind


def test_all_problems_are_reported_at_once(tmp_path, capsys):
    code = main(["train.global_batch=10", "cluster.timeout_min=0", "data.path=/nope", f"run.root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    for key in ("train.global_batch", "cluster.timeout_min", "data.path"):
        assert key in err


def test_unknown_flag_is_refused(capsys):
    assert main(["--dryrun"]) == 2
    assert "--dryrun" in capsys.readouterr().err


def test_dry_run_writes_nothing(tmp_path, capsys):
    assert main(["--dry-run", f"run.root={tmp_path}/runs"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "validation: ok" in out
    assert not (tmp_path / "runs").exists()
