"""End-to-end training through the real CLI: 1 and 2 gloo processes, pretraining, full finetuning, resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import QUICK, TINY, losses, metrics, tuneforge

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-process pretraining run from scratch (tokenizer trained on the corpus)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    tuneforge(*TINY, *QUICK, "cluster.tasks_per_node=2", f"run.dir={run}")
    return run


def test_two_ranks_match_one_rank_at_equal_global_batch(reference, tmp_path):
    one = tmp_path / "one"
    tuneforge(*TINY, *QUICK, "cluster.tasks_per_node=1", f"run.dir={one}")
    two_losses, one_losses = losses(reference), losses(one)
    assert len(two_losses) == len(one_losses) == 10
    assert max(abs(a - b) for a, b in zip(two_losses, one_losses)) < 1e-4
    assert json.loads((reference / "summary.json").read_text())["world_size"] == 2


def test_pretraining_trains_a_tokenizer_and_leaves_a_loadable_model(reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = metrics(reference)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"] - 0.2  # it learns the corpus
    assert (reference / "tokenizer" / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(reference / "final")
    tokenizer = AutoTokenizer.from_pretrained(reference / "final")
    assert len(tokenizer) <= model.config.vocab_size == 512
    ids = tokenizer("Keep your head over the ball and play with a straight bat.", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_full_finetuning_of_a_model_loaded_by_path(tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "full"
    tuneforge(
        "model=hf",
        f"model.name_or_path={tiny_base}",
        "method=full",
        *QUICK,
        "train.seq_len=32",
        "cluster.tasks_per_node=2",
        f"run.dir={run}",
    )
    curve = losses(run)
    assert curve[-1] < curve[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    tuned = AutoModelForCausalLM.from_pretrained(run / "final")
    # it started from the base's weights (its first loss is far below a random model's ~ln(512)=6.2)
    assert curve[0] < 6.0
    assert not torch.equal(base.model.embed_tokens.weight, tuned.model.embed_tokens.weight)


def test_resumed_run_equals_uninterrupted_run_and_keeps_its_wandb_run(reference, tmp_path):
    from tuneforge.trainers.wandb_offline import read_history, read_run_ids

    run = tmp_path / "resumed"
    common = [*TINY, *QUICK, "cluster.tasks_per_node=2", f"run.dir={run}", "logger=wandb", "logger.mode=offline"]
    tuneforge(*common, "debug.stop_after=5")
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]
    assert not (run / "final").exists()
    assert (run / "checkpoints" / "latest").read_text() == "step_5"
    tuneforge(*common)  # the same command again: resumes from step 5
    assert [r["step"] for r in metrics(run)] == list(range(1, 11))
    assert losses(run) == pytest.approx(losses(reference), abs=1e-6)
    # W&B offline: one run across both allocations, and the logged losses read back from its files
    assert len(read_run_ids(run)) == 1
    history = {row["_step"]: row["loss"] for row in read_history(run) if "loss" in row}
    assert sorted(history) == list(range(1, 11))
    assert [history[s] for s in range(1, 11)] == pytest.approx(losses(run), abs=1e-9)
