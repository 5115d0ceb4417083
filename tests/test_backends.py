"""Backends: ddp, fsdp (FSDP2), zero1-3 and zero3_offload are interchangeable with one override.

Every run goes through the real CLI with cluster=local (2 gloo processes on this machine). One run per
backend serves three checks, compared with ONE shared, uninterrupted DDP run at the same global batch
and seed (fp32):
  - it stops after the step-5 checkpoint (debug.stop_after=5) and the same command resumes it to 10;
  - all 10 logged losses equal DDP's within 1e-4 (parity, and resume: losing the optimizer state at
    the resume moves the losses of steps 7-10 by 5e-4 to 4e-3, measured with DDP);
  - `tuneforge export` of the last checkpoint loads in transformers with the logits of final/ (1e-5),
    and final/ has DDP's logits (the trained weights agree).
Those runs also train with activation checkpointing and 2 micro batches per rank (accumulation 2).

The first DeepSpeed run on a machine JIT-builds DeepSpeed's ops into ~/.cache/tuneforge/torch_extensions
(about 1.5 min for the comm op, 6 min for DeepSpeedCPUAdam used by zero3_offload, on 2 busy cores);
later runs load them in a second.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tuneforge.launch import cli

TINY = [
    "logger=none",
    "cluster=local",
    "model=tiny",
    "model.hidden_size=32",
    "model.num_layers=2",
    "method=pretrain",
    "train.seq_len=32",
    "train.max_steps=10",
    "train.warmup_steps=2",
    "train.checkpoint_every=5",
    "train.global_batch=8",
    "train.micro_batch=2",
]
BACKENDS = ["ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload"]
PARITY_TOL = 1e-4
EXPORT_TOL = 1e-5


def losses(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["step"] > 0}  # step 0: the evaluation before training


def logits(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # dtype "auto": config.json's
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> Path:
    """The uninterrupted 10-step DDP run every backend is compared with."""
    run_dir = tmp_path_factory.mktemp("ddp_reference") / "run"
    assert cli.main(TINY + ["backend=ddp", f"run.dir={run_dir}"]) == 0
    assert sorted(losses(run_dir)) == list(range(1, 11))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_ddp_resumes_exactly_and_exports(backend, ddp_reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    command = TINY + [f"backend={backend}", f"run.dir={run_dir}", "train.activation_checkpointing=true"]

    assert cli.main(command + ["debug.stop_after=5"]) == 0
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_5"
    assert not (run_dir / "final").exists()
    _assert_sharded_state(backend, run_dir / "checkpoints" / "step_5" / "engine")

    assert cli.main(command) == 0  # the same command: resumes from step_5
    logs = "".join(p.read_text() for p in (run_dir / "slurm").glob("*_0_log.out"))
    assert f"resumed from {run_dir / 'checkpoints' / 'step_5'} at step 5" in logs
    ours, reference = losses(run_dir), losses(ddp_reference)
    assert sorted(ours) == list(range(1, 11))
    errors = {step: abs(ours[step] - reference[step]) for step in reference}
    print(f"\n{backend}: max |loss - ddp| over 10 steps = {max(errors.values()):.2e}")
    assert max(errors.values()) < PARITY_TOL, errors

    out = tmp_path / "exported"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    final = logits(run_dir / "final")
    assert max_diff(logits(out), final) < EXPORT_TOL
    assert max_diff(final, logits(ddp_reference / "final")) < PARITY_TOL
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["peak_memory_mb_per_rank"]) == 2


def _assert_sharded_state(backend: str, engine_dir: Path) -> None:
    """Each backend wrote its own state: one file for DDP, a shard per rank otherwise."""
    if backend == "ddp":
        assert [p.name for p in engine_dir.iterdir()] == ["ddp_state.pt"]
    elif backend == "fsdp":
        assert sorted(p.name for p in engine_dir.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    else:
        shards = sorted(p.name for p in (engine_dir / "zero").glob("*optim_states.pt"))
        assert len(shards) == 2, shards


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_bf16_trains_and_exports_fp32_master_weights(backend, tmp_path):
    run_dir = tmp_path / "run"
    command = TINY + [f"backend={backend}", f"run.dir={run_dir}", "train.dtype=bf16", "train.lr=3e-3"]
    assert cli.main(command) == 0
    values = [losses(run_dir)[step] for step in range(1, 11)]
    assert all(v == v and abs(v) < 1e3 for v in values), values  # no NaN or blow-up
    assert sum(values[-3:]) / 3 < values[0] - 0.02, values  # the loss falls
    out = tmp_path / "exported"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    for model_dir in (run_dir / "final", out):  # the fp32 masters, and config.json says so
        assert json.loads((model_dir / "config.json").read_text())["dtype"] == "float32"
    assert max_diff(logits(out), logits(run_dir / "final")) < EXPORT_TOL


ACTIVATION_CHECK = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    from transformers import LlamaConfig, AutoModelForCausalLM
    from tuneforge.conf.backends import DDPConfig, FSDPConfig, DeepSpeedConfig
    from tuneforge.conf.schema import TrainConfig
    from tuneforge.trainers.distributed import DistEnv
    from tuneforge.trainers import backends
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo")
    env = DistEnv(0, 0, 1, 1, 1, "127.0.0.1", 0, "test", "cpu")
    train = TrainConfig(activation_checkpointing=True, global_batch=2, micro_batch=2)
    for backend in (DDPConfig(), FSDPConfig(), DeepSpeedConfig(name="zero3", stage=3)):
        model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
        calls, mlp = [], model.model.layers[0].mlp
        forward = mlp.forward
        mlp.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
        engine = backends.prepare(model, backend, train, env)
        with engine.accumulate(last_micro_batch=True):
            engine.backward(engine.model(input_ids=torch.randint(0, 64, (2, 16))).logits.float().mean())
        engine.step(1e-3, 1.0)
        print("CALLS", backend.name, len(calls))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_activation_checkpointing_recomputes_blocks_under_every_backend(tmp_path):
    """A block's MLP runs twice per forward+backward (forward, then recomputed in the backward)."""
    import os

    from conftest import free_port

    env = {**os.environ, "PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", ACTIVATION_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    calls = dict(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("CALLS"))
    assert calls == {"ddp": "2", "fsdp": "2", "zero3": "2"}, done.stdout


# ------------------------------------------------------------------------------------- refusals
def _ds_file(tmp_path: Path, content: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return str(path)


REFUSALS = [
    # (overrides, text that must appear in the one-line problem)
    (["backend=zero2", "backend.offload_params=true"], "backend.offload_params"),
    (["backend=ddp", "backend.offload_optimizer=true"], "backend.offload_optimizer"),  # ddp has no offload
    (["backend=fsdp", "backend.offload_params=true"], "backend.offload_params"),  # fsdp's is cpu_offload
    (["backend=zero1", "backend.stage=0"], "backend.stage"),
    (["backend=fsdp", "train.dtype=fp16"], "train.dtype"),
    (["backend=zero3", "backend.config_file=/nonexistent/ds.json"], "backend.config_file"),
]


def test_impossible_backend_combinations_are_refused_naming_the_key(tmp_path, capsys):
    for overrides, key in REFUSALS:
        run_dir = tmp_path / "never"
        assert cli.main(overrides + [f"run.dir={run_dir}"]) == 2, overrides
        err = capsys.readouterr().err
        assert key in err, (overrides, err)
        assert not run_dir.exists()


def test_deepspeed_config_file_conflicts_are_refused_before_launch(tmp_path, capsys):
    """Merged under our keys: a key set differently is named with the tuneforge key that decides it."""
    cases = [
        ({"gradient_clipping": 1.0}, ["train.grad_clip=0.5"], ["gradient_clipping", "train.grad_clip"]),
        ({"fp16": {"enabled": True}}, ["train.dtype=bf16"], ["fp16.enabled", "train.dtype"]),  # bf16 + fp16
        ({"bf16": {"enabled": True}}, [], ["bf16.enabled", "train.dtype"]),
        ({"optimizer": {"type": "Adam"}}, [], ["'optimizer'"]),  # the optimizer is trainers/optim.py's
        ({"scheduler": {"type": "WarmupLR"}}, [], ["'scheduler'"]),
        ({"zero_optimization": {"stage": 3}}, [], ["zero_optimization.stage", "backend.stage"]),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            [],
            ["zero_optimization.offload_optimizer.device", "backend.offload_optimizer"],
        ),
        ({"train_micro_batch_size_per_gpu": 8}, [], ["train_micro_batch_size_per_gpu", "train.micro_batch"]),
    ]
    for content, overrides, names in cases:
        path = _ds_file(tmp_path, content)
        run_dir = tmp_path / "never"
        assert cli.main(["backend=zero2", f"backend.config_file={path}", f"run.dir={run_dir}"] + overrides) == 2
        err = capsys.readouterr().err
        assert "backend.config_file" in err and all(n in err for n in names), (content, err)
        assert not run_dir.exists()
    (tmp_path / "bad.json").write_text("{not json")
    assert cli.main(["backend=zero2", f"backend.config_file={tmp_path / 'bad.json'}", "--dry-run"]) == 2
    assert "not a DeepSpeed JSON object" in capsys.readouterr().err


def test_deepspeed_config_comes_from_train_and_merges_the_users_file(tmp_path):
    from dataclasses import replace

    from tuneforge.conf import ds_config
    from tuneforge.launch.compose import compose
    from tuneforge.launch.validate import validate

    user = {
        "train_batch_size": "auto",
        "gradient_clipping": 0.0,
        "wall_clock_breakdown": True,
        "zero_optimization": {"sub_group_size": 1000, "stage": 3},
    }
    cfg = compose(
        [
            "backend=zero3_offload",
            "train.grad_clip=0",
            "train.micro_batch=2",
            f"backend.config_file={_ds_file(tmp_path, user)}",
        ]
    )
    assert validate(cfg) == []  # same values and "auto" are no conflict
    ds = ds_config.merged(cfg.backend, cfg.train, world_size=2, trainable_params=1000)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed's default 1.0 never applies
    assert ds["wall_clock_breakdown"] is True and ds["zero_optimization"]["sub_group_size"] == 1000
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == 1024  # capped at the model's size, rounded up to 512
    no_file = replace(cfg.backend, config_file=None)
    assert ds_config.build(no_file, cfg.train, 2)["zero_optimization"]["reduce_bucket_size"] == 500_000_000


def test_every_backend_option_composes_and_validates():
    from tuneforge.launch.compose import compose, group_options
    from tuneforge.launch.validate import validate

    assert set(BACKENDS) <= set(group_options("backend"))
    for option in group_options("backend"):
        for dtype in ("fp32", "bf16"):
            cfg = compose([f"backend={option}", f"train.dtype={dtype}"])
            assert validate(cfg) == [], (option, dtype)


@pytest.mark.slow
def test_export_refuses_a_missing_run_or_step(ddp_reference, tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert cli.main(["export", str(ddp_reference), "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert "--step" in err and "step_5, step_10" in err
