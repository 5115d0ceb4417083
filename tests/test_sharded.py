"""trainers/sharded/: models built sharded (FSDP2, ZeRO-3), each rank reading only its own bytes, give
what a one-process `from_pretrained` gives; pretraining starts from the same weights on every world
size; exports have save_pretrained's layout.

The multi-rank tests start gloo processes running tests/sharded_worker.py on a tiny Llama saved with
save_pretrained in several files (tied and untied embeddings), and compare in this process with the
reference computed here (fp32: logits within 1e-6, weights and buffers exactly).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

WORKER = Path(__file__).with_name("sharded_worker.py")
LOGITS_TOL = 1e-6


def save_tiny(out: Path, tie: bool) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=250,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out, max_shard_size="60KB")  # 8-9 files
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"untied": save_tiny(root / "untied", False), "tied": save_tiny(root / "tied", True)}


def run_ranks(world: int, out: Path, **task) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    task = {**task, "model": str(task["model"]), "out": str(out)}
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(task)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    result = torch.load(out / "result.pt", weights_only=False)
    result["stats"] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return result


def reference(model_dir: Path, method: str = "full", dtype=torch.float32):
    """The one-process model: from_pretrained, then the method applied as the worker applies it."""
    sys.path.insert(0, str(WORKER.parent))
    from sharded_worker import PROBE, wrap_for
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    wrap = wrap_for(method, 0)
    if wrap is not None:
        model = wrap(model)
    model.eval()
    with torch.no_grad():
        return model, model(input_ids=PROBE).logits.float()


def checkpoint_bytes(model_dir: Path) -> int:
    from tuneforge.trainers.sharded.safetensors_io import ShardedCheckpoint

    with ShardedCheckpoint(model_dir) as ckpt:
        return sum(t.end - t.begin for t in ckpt.tensors.values())


# ------------------------------------------------------------------------------- loading, full models
@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,world,tie", [("fsdp", 2, "tied"), ("fsdp", 3, "untied"), ("zero3", 2, "tied"), ("zero3", 3, "untied")]
)
def test_sharded_load_gives_from_pretrained_and_reads_only_the_ranks_share(backend, world, tie, tiny, tmp_path):
    model_dir = tiny[tie]
    got = run_ranks(world, tmp_path / "run", task="load", backend=backend, method="full", model=model_dir, state=True)
    ref, ref_logits = reference(model_dir)
    assert float((got["logits"] - ref_logits).abs().max()) <= LOGITS_TOL
    ref_state = ref.state_dict()
    assert set(got["state"]) <= set(ref_state) and len(got["state"]) == len({id(p) for p in ref.parameters()})
    assert all(torch.equal(got["state"][k], ref_state[k]) for k in got["state"])
    ref_buffers = dict(ref.named_buffers())  # rotary inv_freq: non-persistent, made by the model itself
    assert ref_buffers and all(torch.equal(b, ref_buffers[n]) for n, b in got["buffers"].items())
    assert got["tied"] == (tie == "tied")
    # together the ranks read the checkpoint once; each about its 1/world share
    total = checkpoint_bytes(model_dir)
    read = [s["bytes_read"] for s in got["stats"]]
    assert sum(read) == total, (read, total)
    assert max(read) <= total / world * 1.1 + 4096, (read, total)


# ---------------------------------------------------------------------------------------- PEFT bases
@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,method",
    [("fsdp", m) for m in ("lora", "dora", "ia3", "loha", "lokr")]
    + [("zero3", m) for m in ("lora", "dora", "ia3", "loha", "lokr")],
)
def test_peft_on_a_sharded_base_equals_peft_on_from_pretrained(backend, method, tiny, tmp_path):
    """Adapters made with random (non-identity) init under the same seed: every adapter weight equals
    the one-process model's, and so do the logits; the base stays frozen."""
    model_dir = tiny["untied"]
    got = run_ranks(2, tmp_path / "run", task="load", backend=backend, method=method, model=model_dir, state=True)
    ref, ref_logits = reference(model_dir, method)
    ref_state = ref.state_dict()
    trainable = {n for n, p in ref.named_parameters() if p.requires_grad}
    assert trainable and trainable <= set(got["state"])
    unequal = [n for n in got["state"] if not torch.equal(got["state"][n], ref_state[n])]
    assert not unequal, unequal[:5]
    assert float((got["logits"] - ref_logits).abs().max()) <= LOGITS_TOL


@pytest.mark.slow
def test_bf16_lora_base_on_fsdp_equals_from_pretrained_in_bf16(tiny, tmp_path):
    model_dir = tiny["tied"]
    got = run_ranks(
        2, tmp_path / "run", task="load", backend="fsdp", method="dora", model=model_dir, state=True, dtype="bfloat16"
    )
    ref, _ = reference(model_dir, "dora", torch.bfloat16)
    ref_state = ref.state_dict()
    assert all(torch.equal(got["state"][n], ref_state[n]) for n in got["state"])


# ------------------------------------------------------------------------------------- pretraining
@pytest.mark.slow
def test_random_init_is_the_same_on_every_world_size_and_backend(tiny, tmp_path):
    model_dir = tiny["tied"]  # only its config is used
    one = run_ranks(
        1, tmp_path / "dense1", task="load", backend="dense", method="pretrain", model=model_dir, seed=7, state=True
    )
    assert one["tied"]
    for name, world, backend in (("fsdp2", 2, "fsdp"), ("fsdp3", 3, "fsdp"), ("zero3", 2, "zero3")):
        got = run_ranks(
            world, tmp_path / name, task="load", backend=backend, method="pretrain", model=model_dir, seed=7, state=True
        )
        assert set(got["state"]) == set(one["state"]), name
        assert all(torch.equal(got["state"][k], one["state"][k]) for k in one["state"]), name
        assert float((got["logits"] - one["logits"]).abs().max()) <= LOGITS_TOL, name
    other_seed = run_ranks(
        1, tmp_path / "seed8", task="load", backend="dense", method="pretrain", model=model_dir, seed=8, state=True
    )
    assert not torch.equal(
        other_seed["state"]["model.layers.0.mlp.up_proj.weight"], one["state"]["model.layers.0.mlp.up_proj.weight"]
    )


def test_random_init_keeps_the_models_own_distributions(tiny):
    """Per unit seeds, the model's own _init_weights: normal(0, initializer_range) weights, ones for norms,
    the padding row of the embedding zero; ties kept."""
    from transformers import AutoConfig

    from tuneforge.trainers.sharded.init import dense_initialized
    from tuneforge.trainers.sharded.meta import build_meta_model

    config = AutoConfig.from_pretrained(tiny["tied"])
    model = dense_initialized(build_meta_model(config, torch.float32), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.count_nonzero(model.model.embed_tokens.weight[config.pad_token_id]) == 0
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(float(p.std()) - config.initializer_range) < 0.1 * config.initializer_range, name
    q0, q1 = model.model.layers[0].self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(q0, q1)  # blocks draw from their own streams


# --------------------------------------------------------------------------------------------- export
@pytest.mark.slow
@pytest.mark.parametrize("backend,tie", [("fsdp", "untied"), ("zero3", "tied")])
def test_export_has_save_pretrained_layout_and_tensors(backend, tie, tiny, tmp_path):
    from safetensors.torch import load_file

    model_dir = tiny[tie]
    run_ranks(2, tmp_path / "run", task="load", backend=backend, method="full", model=model_dir, export="60KB")
    out = tmp_path / "run" / "exported"
    theirs = json.loads((model_dir / "model.safetensors.index.json").read_text())
    ours = json.loads((out / "model.safetensors.index.json").read_text())
    assert ours == theirs  # same files, same names in each, same metadata (total_size, total_parameters)
    for name in sorted(set(theirs["weight_map"].values())):
        a, b = load_file(model_dir / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((out / "config.json").read_text()) == json.loads((model_dir / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    ref, ref_logits = reference(model_dir)
    from sharded_worker import PROBE  # on sys.path since reference()

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref_state = ref.state_dict()
    assert loaded.state_dict().keys() == ref_state.keys()
    assert all(torch.equal(t, ref_state[k]) for k, t in loaded.state_dict().items())  # buffers included
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=PROBE).logits.float(), ref_logits)


def test_stream_writer_and_range_reader_round_trip(tmp_path):
    from safetensors import safe_open

    from tuneforge.trainers.sharded.safetensors_io import SafetensorsStreamWriter, ShardedCheckpoint

    tensors = {
        "a": torch.randn(5, 7),
        "b": torch.arange(12, dtype=torch.int64).view(3, 4),
        "c": torch.randn(9).to(torch.bfloat16),
        "d": torch.tensor(3.5),
    }
    writer = SafetensorsStreamWriter(
        tmp_path / "model.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"format": "pt"}
    )
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    with ShardedCheckpoint(tmp_path) as ckpt:
        assert torch.equal(ckpt.read_flat("a", 9, 23), tensors["a"].view(-1)[9:23])
        out = torch.empty(4, dtype=torch.float32)  # read into another dtype: cast
        assert torch.equal(ckpt.read_flat("c", 2, 6, out), tensors["c"][2:6].float())
        assert torch.equal(ckpt.read("d"), tensors["d"]) and ckpt.bytes_read == 14 * 4 + 4 * 2 + 4
        with pytest.raises(ValueError):
            ckpt.read_flat("b", 10, 13)


def test_stream_writer_refuses_a_tensor_out_of_order_or_missing(tmp_path):
    from tuneforge.trainers.sharded.safetensors_io import SafetensorsStreamWriter

    writer = SafetensorsStreamWriter(
        tmp_path / "x.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]
    )
    with pytest.raises(ValueError, match="expected a"):
        writer.write("b", torch.zeros(2))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()


def test_file_plan_from_meta_tensors_equals_huggingface_split_of_real_ones():
    from huggingface_hub import split_torch_state_dict_into_shards

    from tuneforge.trainers.sharded.export import plan_files

    shapes = {"a": (300, 100), "b": (10,), "c": (2000, 100), "d": (50, 100), "e": (100, 100)}
    real = {k: torch.zeros(s) for k, s in shapes.items()}
    theirs = split_torch_state_dict_into_shards(
        real, max_shard_size="200KB", filename_pattern="model{suffix}.safetensors"
    )
    ours = plan_files([(k, torch.float32, s) for k, s in shapes.items()], "200KB")
    assert ours.filename_to_tensors == theirs.filename_to_tensors and ours.metadata == theirs.metadata


def test_peft_wrap_on_meta_keeps_the_base_free_and_refuses_base_rewriting_inits(tiny):
    import peft
    from transformers import AutoConfig

    from tuneforge.trainers.sharded.meta import build_meta_model
    from tuneforge.trainers.sharded.peft_meta import wrap_on_meta

    config = AutoConfig.from_pretrained(tiny["untied"])
    wrapped = wrap_on_meta(
        build_meta_model(config, torch.float32),
        lambda m: peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules="all-linear")),
    )
    assert all(p.is_meta for p in wrapped.model.parameters())  # everything back on meta, ready to shard
    assert wrapped.adapter_values and all(not v.is_meta for v in wrapped.adapter_values.values())
    assert all(a in ("weight",) for (_, a) in wrapped.adapter_values)
    with pytest.raises(NotImplementedError, match="pissa"):
        wrap_on_meta(
            build_meta_model(config, torch.float32),
            lambda m: peft.get_peft_model(
                m, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")
            ),
        )


# ------------------------------------------------------------------------------- through the trainer
@pytest.mark.slow
def test_full_finetuning_by_path_loads_sharded_and_matches_ddp(tiny_base, tmp_path):
    """The real CLI (2 ranks): fsdp and zero3 load the model by path sharded (the job log says so), train
    as ddp does, and final/ (written tensor by tensor) has ddp's weights."""
    from conftest import QUICK, losses, tuneforge
    from test_backends import logits, max_diff

    common = [
        "logger=none",
        "model=hf",
        f"model.name_or_path={tiny_base}",
        "method=full",
        "train.seq_len=32",
        *[a for a in QUICK if not a.startswith("logger")],
        "train.checkpoint_every=0",
        "backend.param_persistence_threshold=0",
    ]
    runs = {}
    for backend in ("ddp", "fsdp", "zero3"):
        run_dir = tmp_path / backend
        extra = [a for a in common if backend == "zero3" or not a.startswith("backend.")]
        tuneforge(*extra, f"backend={backend}", f"run.dir={run_dir}")
        runs[backend] = run_dir
        log = "".join(p.read_text() for p in (run_dir / "slurm").glob("*_0_log.out"))
        assert ("sharded load" in log) == (backend != "ddp"), log[-2000:]
    reference = losses(runs["ddp"])
    for backend in ("fsdp", "zero3"):
        assert max(abs(a - b) for a, b in zip(losses(runs[backend]), reference)) < 1e-4, backend
        assert max_diff(logits(runs[backend] / "final"), logits(runs["ddp"] / "final")) < 1e-4, backend


# ------------------------------------------------------------------------------------ damaged checkpoints
def _damaged(tiny, tmp_path, damage) -> tuple:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny["untied"], model)
    files = sorted(set(json.loads((model / "model.safetensors.index.json").read_text())["weight_map"].values()))
    return model, damage(model, files)


def _delete(model: Path, files) -> str:
    (model / files[2]).unlink()
    return files[2]


def _truncate(model: Path, files) -> str:
    path = model / files[3]
    path.write_bytes(path.read_bytes()[:-100])  # the header intact, the data short
    return files[3]


def _cut_header(model: Path, files) -> str:
    path = model / files[1]
    path.write_bytes(path.read_bytes()[:40])  # the header itself cut
    return files[1]


@pytest.mark.parametrize(
    "damage,what",
    [
        (_delete, "named in model.safetensors.index.json but absent"),
        (_truncate, "truncated"),
        (_cut_header, "truncated"),
    ],
)
def test_a_checkpoint_with_a_shard_missing_or_truncated_is_refused_naming_the_file(
    damage, what, tiny, tmp_path, capsys
):
    """Before submission (validation: exit 2, nothing created), and by the reader every rank opens."""
    from tuneforge.launch.cli import main
    from tuneforge.trainers.sharded.safetensors_io import ShardedCheckpoint

    model, name = _damaged(tiny, tmp_path, damage)
    run_dir = tmp_path / "never"
    args = ["model=hf", f"model.name_or_path={model}", "method=full", "backend=fsdp", f"run.dir={run_dir}"]
    assert main(args + ["train.seq_len=32", "--dry-run"]) == 2
    assert main(args + ["train.seq_len=32"]) == 2 and not run_dir.exists()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("  model.name_or_path: ")]
    assert lines and all(str(model / name) in line and what in line for line in lines), err
    with pytest.raises(FileNotFoundError, match=name):
        ShardedCheckpoint(model)


def test_a_complete_checkpoint_has_no_file_problems(tiny):
    from tuneforge import safetensors_files

    assert all(safetensors_files.problems(tiny[t]) == [] for t in tiny)


# ------------------------------------------------------------------------------ many ranks per node
#: 2 nodes x 2 tasks of the Slurm test cluster (2 CPUs per node): a LoRA base loaded sharded on ZeRO-3,
#: a full finetune loaded sharded on FSDP2
TWO_BY_TWO = {
    "lora-zero3": ["method=lora", "backend=zero3", "backend.param_persistence_threshold=0", "train.lr=2e-2"],
    "full-fsdp": ["method=full", "backend=fsdp"],
}


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("name", list(TWO_BY_TWO))
def test_two_nodes_of_two_tasks_load_sharded_train_and_export(name, slurm_cluster, tiny_base, tmp_path):
    """Local ranks 0 and 1 on each node, one rendezvous of 4 ranks, the model loaded sharded, the loss
    falling, final/ written; the job completes."""
    from conftest import QUICK, metrics, tuneforge
    from test_slurm import final_state

    run = tmp_path / name
    tuneforge(
        "model=hf",
        f"model.name_or_path={tiny_base}",
        "train.seq_len=32",
        *QUICK,
        *TWO_BY_TWO[name],
        "cluster=slurm",
        f"cluster.partition={slurm_cluster}",
        "cluster.nodes=2",
        "cluster.tasks_per_node=2",
        "cluster.cpus_per_task=1",
        "cluster.timeout_min=10",
        "cluster.mem_gb=4",
        "cluster.max_requeues=0",  # a job that hangs fails at its time limit instead of starting over
        f"run.dir={run}",
    )
    job_id = json.loads((run / "submit.json").read_text())["jobs"][0]["job_id"]
    state = final_state(job_id, timeout_s=600)
    logs = {p.name: p.read_text() for p in (run / "slurm").glob(f"{job_id}*_log.*")}
    assert state == "COMPLETED", (state, {name: text[-1500:] for name, text in logs.items()})
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["num_nodes"] == 2
    places = set()
    for text in logs.values():  # submitit: "JobEnvironment(job_id=.., hostname=.., local_rank=1(2), node=0(2), ..)"
        for line in text.splitlines():
            if "JobEnvironment(" in line and "hostname=" in line:
                node = line.split("node=")[1].split("(")[0]  # the test cluster's nodes share one hostname
                local = line.split("local_rank=")[1].split("(")[0]
                places.add((int(node), int(local)))
    assert places == {(0, 0), (0, 1), (1, 0), (1, 1)}, places
    assert "sharded load" in "".join(logs.values())
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3]), losses
    final = run / "final"
    assert (final / ("adapter_model.safetensors" if name.startswith("lora") else "config.json")).is_file()


# ------------------------------------------------------------------------------------ the memory invariant
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_no_rank_grows_by_more_than_its_share_and_one_block_while_loading(backend, tmp_path):
    """4 ranks load a 40M-parameter Llama (161 MB fp32, saved in 4 files): each rank's RSS grows by at
    most 1.25 x its quarter plus one decoder block (the issue's goal; the whole model would be 4x that)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=128,
    )
    model_dir = tmp_path / "model"
    model = AutoModelForCausalLM.from_config(config)
    block = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    model.save_pretrained(model_dir, max_shard_size="50MB")
    del model
    total = checkpoint_bytes(model_dir)
    got = run_ranks(4, tmp_path / "run", task="memory", backend=backend, method="full", model=model_dir)
    goal = 1.25 * total / 4 + block
    growth = [s["rss_growth"] for s in got["stats"]]
    print(f"\n{backend}: RSS growth per rank {[round(g / 2**20, 1) for g in growth]} MiB, goal {goal / 2**20:.1f} MiB")
    assert max(growth) <= goal, (growth, goal, total)
    assert sum(s["bytes_read"] for s in got["stats"]) == total
