"""PEFT methods through the real CLI (2 CPU ranks): the method x backend matrix, adapters, export, resume.

Every run finetunes a small pretrained Llama (built and briefly trained by the `base` fixture) on a data
file of exactly one global batch, so the loss must fall step after step. One run per method x backend
serves several tests (runs are cached per module): the matrix checks, AdaLoRA's ranks, QLoRA's 4-bit
base, the merged export and the uninterrupted reference of the resume tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from conftest import saved_model

import tuneforge
from tuneforge.conf.methods import PEFT_METHODS
from tuneforge.launch import cli

BACKENDS = ("ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload")
CONF = Path(tuneforge.__file__).parent / "conf"
SEQ_LEN, GLOBAL_BATCH, STEPS = 32, 8, 6
# dropout 0: runs on different backends must see the same numbers (no RNG in the forward pass)
METHOD_ARGS: Dict[str, List[str]] = {
    "lora": ["method.dropout=0"],
    "dora": ["method.dropout=0"],
    "qlora": ["method.dropout=0"],
    "adalora": ["method.dropout=0", "method.init_r=6", "method.target_r=2"],
    "ia3": [],
    "loha": [],
    "lokr": [],
}
ADAPTED_MODULES = 14  # 2 layers x 7 linear projections (all but lm_head)


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama (hidden 64, 2 layers, BPE vocab 384 trained on the bundled corpus), pretrained for 40
    steps so that finetuning starts from a real language model; plus `<dir>/../data.txt`, a slice of the
    corpus that packs into exactly one global batch (every step trains on the same rows). Widths are
    multiples of 32: bitsandbytes' CPU inference kernel repacks 4-bit weights in blocks of 32 rows."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tuneforge.data import bundled
    from tuneforge.trainers.model import train_tokenizer
    from tuneforge.trainers.optim import counted_tokens, token_loss_sum

    root = tmp_path_factory.mktemp("peft")
    docs = [p.strip() for p in bundled("demo_corpus").read_text().split("\n\n") if p.strip()]
    tok = train_tokenizer(docs, 384, 2)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = [i for encoded in tok(docs, add_special_tokens=False)["input_ids"] for i in (*encoded, tok.eos_token_id)]
    rows = torch.tensor(ids[: len(ids) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = rows[torch.randint(len(rows), (16,), generator=gen)]
        (token_loss_sum(model(input_ids=batch).logits, batch) / counted_tokens(batch)).backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    kept, tokens = [], 0
    for doc in docs[::-1]:  # the corpus's end: text the base saw least
        words = doc.split(" ")
        while (
            words
            and tokens + len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) + 1 > GLOBAL_BATCH * SEQ_LEN
        ):  # + EOS
            words.pop()  # the last document is cut to fit
        if not words:
            break
        kept.append(" ".join(words))
        tokens += len(tok(kept[-1], add_special_tokens=False)["input_ids"]) + 1
    # packed end to end, the last row padded: exactly GLOBAL_BATCH rows (checked in test_matrix)
    assert (GLOBAL_BATCH - 1) * SEQ_LEN < tokens <= GLOBAL_BATCH * SEQ_LEN
    (root / "data.txt").write_text("\n\n".join(kept) + "\n")
    return root / "base"


def train_args(base: Path, method: str, backend: str, run_dir: Path, *extra: str) -> List[str]:
    return [
        "logger=none",
        "model=hf",
        f"model.name_or_path={base}",
        f"data.path={base.parent / 'data.txt'}",
        "data.validation_fraction=0",
        f"method={method}",
        f"backend={backend}",
        f"run.dir={run_dir}",
        *METHOD_ARGS[method],
        *partitioned(backend),
        f"train.max_steps={STEPS}",
        "train.warmup_steps=1",
        "train.lr=1e-2",
        f"train.seq_len={SEQ_LEN}",
        "train.micro_batch=2",
        f"train.global_batch={GLOBAL_BATCH}",
        "train.checkpoint_every=3",
        *extra,
    ]


def partitioned(backend: str) -> List[str]:
    """ZeRO-3 keeps parameters under a size threshold whole on every rank, which would be all of this tiny
    model: a threshold of 0 partitions every one, as on a real model (where adapters come out empty)."""
    from tuneforge.launch.compose import compose

    if (CONF / "backend" / f"{backend}.yaml").is_file():
        node = compose([f"backend={backend}", "model=llama3_8b"]).backend
        if getattr(node, "stage", None) == 3:
            return ["backend.param_persistence_threshold=0"]
    return []


class Runs:
    """One finished run per (method, backend), trained on first use."""

    def __init__(self, base: Path, root: Path):
        self.base, self.root, self.done = base, root, {}

    def get(self, method: str, backend: str = "ddp") -> Path:
        if (method, backend) not in self.done:
            run_dir = self.root / f"{method}-{backend}"
            assert cli.main(train_args(self.base, method, backend, run_dir)) == 0, f"{method} on {backend} failed"
            self.done[(method, backend)] = run_dir
        return self.done[(method, backend)]


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory) -> Runs:
    return Runs(base, tmp_path_factory.mktemp("runs"))


# ----------------------------------------------------------------------------------------- helpers
def metrics(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_config(run_dir: Path):
    from tuneforge.conf.schema import load

    return load(run_dir / "config.yaml")


def probe(base: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    text = ["Keep your head still over the ball as you play the drive.", "The bowler runs in and the batter waits."]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([row[:12] for row in ids])


def load_base(run_dir: Path):
    """The run's base model loaded the way the run loaded it (QLoRA: freshly quantised to 4 bits)."""
    from transformers import AutoTokenizer

    from tuneforge.trainers.model import load_model

    cfg = run_config(run_dir)
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    return load_model(cfg.model, cfg.method, tok, cfg.train.dtype, "cpu", cfg.train.seed), cfg


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


def adapter_logits(run_dir: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the saved adapter reloaded with peft onto a fresh base."""
    from peft import PeftModel

    base_model, _ = load_base(run_dir)
    return logits_of(PeftModel.from_pretrained(base_model, str(adapter)), ids)


def engine_state_logits(run_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the trained model rebuilt from the DDP engine's own checkpoint (not from the adapter
    files): an independent account of what the run ended with."""
    from tuneforge.trainers.methods import apply_method

    base_model, cfg = load_base(run_dir)
    model, _ = apply_method(base_model, cfg.method, cfg.train.max_steps, cfg.train.seed)
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = torch.load(latest / "engine" / "ddp_state.pt", map_location="cpu", weights_only=True)["model"]
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    return logits_of(model, ids)


def refused(method: str, backend: str) -> str:
    from tuneforge.conf.methods import incompatibility
    from tuneforge.launch.compose import compose

    return incompatibility(method, compose([f"method={method}", f"backend={backend}", "model=llama3_8b"]).backend)


# ----------------------------------------------------------------------------------------- the matrix
MATRIX: List[Tuple[str, str]] = [(m, b) for b in BACKENDS for m in PEFT_METHODS]


@pytest.mark.slow
@pytest.mark.parametrize("method,backend", MATRIX, ids=[f"{m}-{b}" for m, b in MATRIX])
def test_matrix(method, backend, runs, base, tmp_path, capsys):
    """Tested: loss falls over the run, the adapter is saved (final/ and each checkpoint) and, reloaded,
    gives the trained model's logits. Refused: exit code 2 before submission, with the reason."""
    if not (CONF / "backend" / f"{backend}.yaml").is_file():
        pytest.skip(f"backend={backend} is not in this tree yet (conf/backend/{backend}.yaml)")
    reason = refused(method, backend)
    if reason:
        run_dir = tmp_path / "refused"
        assert cli.main(train_args(base, method, backend, run_dir)) == 2
        assert f"method={method} cannot run on backend=" in capsys.readouterr().err
        assert not run_dir.exists()
        return
    run_dir = runs.get(method, backend)
    losses = [m["loss"] for m in metrics(run_dir)]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_rows"] == GLOBAL_BATCH  # every step trains on the same rows: the loss must fall
    assert losses[-1] < losses[0] and min(losses[1:]) < losses[0], losses
    assert 0 < summary["params_trainable"] < summary["params_total"] / 2  # the base is frozen
    for adapter in (run_dir / "final", run_dir / "checkpoints" / "step_3" / "adapter"):
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (run_dir / "final" / "tokenizer.json").is_file()
    from safetensors.torch import load_file

    saved = load_file(run_dir / "final" / "adapter_model.safetensors")
    empty = [k for k, t in saved.items() if t.numel() == 0]  # what ZeRO-3 leaves when nothing is gathered
    assert saved and len(empty) < len(saved), "empty adapter"
    if method == "adalora":  # only modules whose rank was cut to 0 may be empty
        pattern = json.loads((run_dir / "final" / "adapter_config.json").read_text())["rank_pattern"]
        assert len(empty) == 3 * sum(1 for mask in pattern.values() if not any(mask))  # lora_A, lora_B, lora_E
    else:
        assert not empty, empty

    ids = probe(base)
    reloaded = adapter_logits(run_dir, run_dir / "final", ids)
    if backend == "ddp":
        reference = engine_state_logits(run_dir, ids)
        torch.testing.assert_close(reloaded, reference, atol=1e-5, rtol=1e-5)
    else:  # the same training on DDP, whose saving is checked against its engine state above
        reference = adapter_logits(runs.get(method), runs.get(method) / "final", ids)
        # ZeRO-3 reduces the partitioned gradients in another order: QLoRA's adapter came out within 5e-5
        # of DDP's (of weights up to 0.15), which moved a few logits by up to 2e-3
        tolerance = 3e-3 if backend.startswith("zero3") else 1e-3
        torch.testing.assert_close(reloaded, reference, atol=tolerance, rtol=1e-3)
    base_model, _ = load_base(run_dir)
    assert (reloaded - logits_of(base_model, ids)).abs().max() > 1e-2, "the adapter changes nothing"


# ----------------------------------------------------------------------------------------- per method
@pytest.mark.slow
def test_adalora_reallocates_ranks_and_logs_orth_loss(runs):
    run_dir = runs.get("adalora")
    records = metrics(run_dir)
    ranks = [r["adalora_rank"] for r in records]
    assert ranks[0] < 6 * ADAPTED_MODULES and ranks[-1] == 2 * ADAPTED_MODULES  # init_r=6 -> target_r=2
    assert all(b <= a for a, b in zip(ranks, ranks[1:])) and len(set(ranks)) > 2, ranks
    assert all(r["orth_loss"] > 0 for r in records)  # reported apart from the LM loss
    pattern = json.loads((run_dir / "final" / "adapter_config.json").read_text())["rank_pattern"]
    per_module = sorted(sum(mask) for mask in pattern.values())
    assert len(per_module) == ADAPTED_MODULES and sum(per_module) == 2 * ADAPTED_MODULES
    assert per_module[0] != per_module[-1], "ranks were cut, not moved between modules"
    early = json.loads((run_dir / "checkpoints" / "step_3" / "adapter" / "adapter_config.json").read_text())
    assert sum(sum(mask) for mask in early["rank_pattern"].values()) > 2 * ADAPTED_MODULES


@pytest.mark.slow
def test_qlora_trains_on_a_4bit_base(runs, base):
    import bitsandbytes as bnb

    run_dir = runs.get("qlora")
    summary = json.loads((run_dir / "summary.json").read_text())
    linear_weights = 2 * (4 * 64 * 64 + 3 * 64 * 128)  # q, k, v, o and the three MLP projections per layer
    assert summary["params_4bit"] == linear_weights
    base_model, _ = load_base(run_dir)
    layers = base_model.model.layers
    assert all(
        isinstance(getattr(layer.self_attn, n), bnb.nn.Linear4bit) for layer in layers for n in ("q_proj", "o_proj")
    )
    assert all(isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit) for layer in layers)
    # loss falls and the adapter reloads onto a freshly quantised base: test_matrix[qlora-ddp]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bf16_base_on_fsdp_and_zero2_trains_as_on_ddp(method, base, tmp_path):
    """In bf16 the frozen base is loaded in bf16 on every backend (FSDP2 would otherwise keep fp32 shards
    of it) while the adapters stay fp32: mixed dtypes in one FSDP unit. QLoRA's 4-bit bytes are then
    stored in bf16, so that the backends' own cast to bf16 leaves them as they are (from fp32 storage
    it rewrote them as numbers and the first forward failed on half-sized weights)."""
    curves = {}
    for backend in ("ddp", "fsdp", "zero2"):
        run_dir = tmp_path / backend
        assert cli.main(train_args(base, method, backend, run_dir, "train.dtype=bf16")) == 0, backend
        curves[backend] = [m["loss"] for m in metrics(run_dir)]
    assert curves["ddp"][-1] < curves["ddp"][0], curves
    for backend in ("fsdp", "zero2"):
        assert curves[backend] == pytest.approx(curves["ddp"], rel=1e-2), curves


@pytest.mark.slow
@pytest.mark.parametrize("method", PEFT_METHODS)
def test_export_merges_the_adapter(method, runs, base, capsys):
    """`tuneforge export <run dir>`: the merged model's logits equal base + adapter (QLoRA: merged into
    the full-precision base, compared with that base + adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = runs.get(method)
    out = run_dir / "merged"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    ids = probe(base)
    merged = logits_of(AutoModelForCausalLM.from_pretrained(out), ids)
    with_adapter = logits_of(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run_dir / "final")), ids
    )
    torch.testing.assert_close(merged, with_adapter, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "adalora", "qlora"])
def test_resume_equals_uninterrupted(method, runs, base, tmp_path):
    """Stopped after step 3 (a checkpoint), then restarted: same losses, allocator state and adapter
    (QLoRA: the frozen 4-bit base is reloaded, not read from the checkpoint)."""
    from safetensors.torch import load_file

    reference = runs.get(method)
    run_dir = tmp_path / "resumed"
    assert cli.main(train_args(base, method, "ddp", run_dir, "debug.stop_after=3")) == 0
    assert len(metrics(run_dir)) == 3 and not (run_dir / "final").exists()
    assert cli.main(train_args(base, method, "ddp", run_dir)) == 0
    keys = ("loss", "grad_norm", "orth_loss", "adalora_rank")
    got = [{k: r[k] for k in keys if k in r} for r in metrics(run_dir)]
    want = [{k: r[k] for k in keys if k in r} for r in metrics(reference)]
    assert got == want
    resumed, uninterrupted = (load_file(d / "final" / "adapter_model.safetensors") for d in (run_dir, reference))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    config = lambda d: json.loads((d / "final" / "adapter_config.json").read_text())["rank_pattern"]  # noqa: E731
    assert config(run_dir) == config(reference)


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overrides,key,words",
    [
        (["method=lora", "method.target_modules=[q_proj,qkv_proj]"], "method.target_modules", "'qkv_proj'"),
        (["method=lora", "method.target_modules=[q_prj]"], "method.target_modules", "did you mean 'q_proj'"),
        (["method=dora", "method.r=0"], "method.r", "must be in [1,"),
        (["method=loha", "method.r=-2"], "method.r", "must be in [1,"),
        (["method=adalora", "method.init_r=0"], "method.init_r", "must be in [1,"),
        (["method=adalora", "method.target_r=16"], "method.target_r", "exceeds method.init_r"),
        (["method=lora", "method.init_r=4"], "method.init_r", "unknown key"),
        (["method=ia3", "method.r=4"], "method.r", "unknown key"),
        (["method=lokr", "method.orth_reg_weight=0.1"], "method.orth_reg_weight", "unknown key"),
        (
            ["method=ia3", "method.target_modules=[k_proj]", "method.feedforward_modules=[down_proj]"],
            "method.feedforward_modules",
            "not in method.target_modules",
        ),
        (["method=qlora", "method.quant_type=int3"], "method.quant_type", "nf4"),
    ],
)
def test_bad_input_is_refused_before_submission(overrides, key, words, tmp_path, capsys):
    model_dir = tmp_path / "model"  # validation reads config.json only
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    run_dir = tmp_path / "run"
    args = ["logger=none", "model=hf", f"model.name_or_path={model_dir}", f"run.dir={run_dir}", *overrides]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.strip().startswith(key))
    assert words in line, err
    assert not run_dir.exists()


def test_qlora_on_cpu_refuses_widths_the_4bit_cpu_kernel_cannot_lay_out(tmp_path, capsys):
    config = {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    for width, code in ((32, 2), (64, 0)):
        model_dir = tmp_path / f"model{width}"
        model_dir.mkdir()
        saved_model(model_dir, {**config, "hidden_size": width, "intermediate_size": 2 * width})
        args = ["model=hf", f"model.name_or_path={model_dir}", "method=qlora", "cluster.gpus_per_node=0", "--dry-run"]
        capsys.readouterr()
        assert cli.main(args) == code, width
        if code:
            line = next(line for line in capsys.readouterr().err.splitlines() if "multiples of 64" in line)
            assert line.strip().startswith("model.name_or_path:") and "hidden_size 32" in line, line


def test_unknown_architecture_targets_fail_at_job_start():
    """Validation knows Llama-style names only; for other architectures apply_method names the key and
    lists the model's own linear layers."""
    from transformers import AutoModelForCausalLM, OPTConfig

    from tuneforge.conf.methods import LoraMethodConfig
    from tuneforge.trainers.methods import apply_method

    model = AutoModelForCausalLM.from_config(
        OPTConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    )
    cfg = LoraMethodConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "gate_proj"])
    with pytest.raises(ValueError, match=r"method.target_modules: 'gate_proj' matches no module .* fc1, fc2"):
        apply_method(model, cfg, total_steps=10, seed=0)


# ----------------------------------------------------------------------------------------- rules, matrix
def test_refusals_read_the_backend_whatever_its_option_is_called():
    from tuneforge.conf.backends import DDPConfig, DeepSpeedConfig, FSDPConfig
    from tuneforge.conf.methods import incompatibility

    for backend in (DeepSpeedConfig(name="zero3", stage=3), DeepSpeedConfig(name="zero1", stage=1), FSDPConfig()):
        assert "use backend=ddp" in incompatibility("adalora", backend)
        assert all(incompatibility(m, backend) is None for m in PEFT_METHODS if m != "adalora")
    assert all(incompatibility(m, DDPConfig()) is None for m in PEFT_METHODS)


def test_qlora_on_fsdp_needs_storage_in_the_param_dtype():
    from tuneforge.launch.compose import compose
    from tuneforge.launch.validate import validate

    def problems(backend):
        cfg = compose(
            [
                "model=llama3_8b",
                "method=qlora",
                f"backend={backend}",
                "method.quant_storage=uint8",
                "cluster.gpus_per_node=1",
                "logger=none",
            ]
        )
        return [p for p in validate(cfg) if p.key == "method.quant_storage"]

    found = problems("fsdp")
    assert len(found) == 1 and "quant_storage=auto" in found[0].message
    assert not problems("ddp")


def test_matrix_renders_from_the_validation_rules():
    from tuneforge.launch.compose import group_options
    from tuneforge.launch.matrix import refusals, render, render_matrix

    table = render_matrix()
    assert all(f"| {m} |" in table for m in PEFT_METHODS)
    assert all(b in table.splitlines()[0] for b in group_options("backend"))
    # with a refused cell: the numbered reason is printed once under the table
    cells = dict(refusals(backend_names=["ddp"]))
    cells[("adalora", "other")] = "it cannot"
    cells.update({(m, "other"): None for m in PEFT_METHODS if m != "adalora"})
    text = render(cells)
    assert "| adalora | tested | refused (1) |" in text and "| lora | tested | tested |" in text
    assert text.rstrip().endswith("1. it cannot")
