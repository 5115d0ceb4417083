"""Weighted mixtures (data.sources) and vocabulary extension (model.new_tokens): shares by target tokens in
both modes, exact resume through the CLI, per-source accounting and validation losses, bad input refused
naming data.sources[i].<key>, new tokens trained and saved, and the continued-pretraining demo."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK, TINY, metrics, tuneforge

from tuneforge import data as bundled_data
from tuneforge.conf.schema import DataConfig, SourceConfig, TrainConfig
from tuneforge.data import pipeline, records
from tuneforge.launch.cli import main
from tuneforge.launch.compose import compose
from tuneforge.trainers.distributed import DistEnv

ONE_RANK = DistEnv(0, 0, 1, 1, 1, "localhost", 0, "test", "cpu")
WEIGHTS = (0.7, 0.2, 0.1)
CHAT = {
    "messages": [{"role": "user", "content": "What is a yorker?"}, {"role": "assistant", "content": "A full ball."}]
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    from tuneforge.trainers.model import train_tokenizer

    texts = [row["text"] for _, row in records.read_rows(bundled_data.bundled("demo_corpus"), DataConfig())]
    tok = train_tokenizer(texts, 1024, 2)
    tok.pad_token = tok.eos_token
    return tok


def three_sources(cache: Path, **values) -> DataConfig:
    """Cricket documents, general documents and cricket conversations (text and chat in one mixture)."""
    sources = [
        SourceConfig(name="demo_corpus", weight=WEIGHTS[0]),
        SourceConfig(name="general_corpus", weight=WEIGHTS[1], validation_path="general_validation"),
        SourceConfig(name="demo_instruct", weight=WEIGHTS[2], format="chat"),
    ]
    return DataConfig(name="mix", cache_dir=str(cache), sources=sources, **values)


def shares_over(batches, steps: int) -> np.ndarray:
    tokens = np.zeros(len(batches.source_names))
    for step in range(steps):
        for _ in batches.micro_batches(step):
            pass
        tokens += batches.source_tokens
    return tokens / tokens.sum()


def first_inputs(batches, steps: int = 3) -> list:
    return [batch["input_ids"] for step in range(steps) for batch in batches.micro_batches(step)]


# ------------------------------------------------------------------------------------ shares
@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streaming"])
def test_rows_follow_the_weights_by_target_tokens(streaming, tokenizer, tmp_path):
    """Over 4000 rows (500 global batches of 8) each source's share of the target tokens is within 2% of its
    weight's share, text and chat sources mixed; the sequence is the seed's, and another seed reads other rows."""
    cfg = three_sources(tmp_path / "cache", streaming=streaming, stream_window=200)
    t = TrainConfig(seq_len=64, global_batch=8, micro_batch=4, max_steps=500)
    built = pipeline.build(cfg, t, tokenizer, ONE_RANK)
    realised = shares_over(built.train, 500)
    assert np.all(np.abs(realised / np.array(WEIGHTS) - 1) < 0.02), realised
    first, again = (first_inputs(pipeline.build(cfg, t, tokenizer, ONE_RANK).train) for _ in range(2))
    other = first_inputs(pipeline.build(cfg, replace(t, seed=1), tokenizer, ONE_RANK).train)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # weights need not sum to 1: only their ratios count
    scaled = replace(cfg, sources=[replace(s, weight=s.weight * 30) for s in cfg.sources])
    assert np.allclose(
        shares_over(pipeline.build(scaled, t, tokenizer, ONE_RANK).train, 50),
        shares_over(pipeline.build(cfg, t, tokenizer, ONE_RANK).train, 50),
    )


def test_cached_mixture_is_one_sequence_whatever_the_ranks(tokenizer, tmp_path):
    """The ranks read disjoint slices of the global batch the single rank reads; a sampler resumed from a
    saved position gives the same batches as one that never stopped."""
    cfg = three_sources(tmp_path / "cache")
    t = TrainConfig(seq_len=64, global_batch=8, micro_batch=2)
    one = pipeline.build(cfg, t, tokenizer, ONE_RANK).train
    ranks = [pipeline.build(cfg, t, tokenizer, DistEnv(r, r, 2, 2, 1, "x", 0, "t", "cpu")).train for r in (0, 1)]
    for step in (0, 5, 90):  # 90: every source past its first epoch
        parts = [r.rank_picks(step) for r in ranks]
        assert parts[0] + parts[1] == one.picks(step)
    state = one.state_dict(40)
    resumed = pipeline.build(cfg, t, tokenizer, ONE_RANK).train
    resumed.load_state_dict(json.loads(json.dumps(state)), 40)
    assert [resumed.picks(s) for s in range(40, 45)] == [one.picks(s) for s in range(40, 45)]
    changed = pipeline.build(
        replace(cfg, sources=[replace(cfg.sources[0], weight=0.5), *cfg.sources[1:]]), t, tokenizer, ONE_RANK
    )
    with pytest.raises(Exception, match="the mixture changed since the checkpoint"):
        changed.train.load_state_dict(state, 40)


# ------------------------------------------------------------------------------------ through the CLI
def replay_run(tmp_path: Path, streaming: bool) -> list:
    cricket_val = tmp_path / "cricket_val.txt"  # a stream cannot have a fraction carved off: a file of its own
    docs = bundled_data.bundled("demo_corpus").read_text().split("\n\n")
    cricket_val.write_text("\n\n".join(docs[-20:]))
    sources = (
        f"[{{name:cricket,path:{bundled_data.bundled('demo_corpus')},weight:3,validation_path:{cricket_val}}},"
        f"{{name:general,path:{bundled_data.bundled('general_corpus')},weight:1,validation_path:general_validation}}]"
    )
    return [
        *TINY,
        *QUICK,
        "train.max_steps=12",
        "train.checkpoint_every=0",
        "train.eval_every=4",
        f"data.sources={sources}",
        f"data.streaming={str(streaming).lower()}",
        "data.stream_window=100",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streaming"])
def test_mixture_stopped_and_resumed_logs_the_losses_of_the_uninterrupted_run(streaming, tmp_path, capsys):
    """2 ranks: a mixture stopped at step 5 and started again logs the same losses (training and per-source
    validation) as one that never stopped; tokens per source every step, validation losses token-normalised."""
    common = replay_run(tmp_path, streaming)
    tuneforge(*common, f"run.dir={tmp_path / 'full'}")
    tuneforge(*common, f"run.dir={tmp_path / 'resumed'}", "debug.stop_after=5")
    tuneforge(*common, f"run.dir={tmp_path / 'resumed'}")
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(full, resumed, strict=True):
        for key in [k for k in a if k == "loss" or k.startswith(("eval_loss", "eval_tokens", "tokens_seen"))]:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    for record in full:  # every step: tokens of each source, adding up to all tokens seen
        assert record["tokens_seen/cricket"] + record["tokens_seen/general"] == record["tokens_seen"]
    last = full[-1]
    assert last["tokens_seen/cricket"] / last["tokens_seen"] == pytest.approx(0.75, abs=0.03)
    evals = [r for r in full if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    for r in evals:  # token-normalised like the overall loss: it is their token-weighted mean
        tokens = r["eval_tokens/cricket"] + r["eval_tokens/general"]
        assert tokens == r["eval_tokens"] and min(r["eval_tokens/cricket"], r["eval_tokens/general"]) > 0
        pooled = (
            r["eval_loss/cricket"] * r["eval_tokens/cricket"] + r["eval_loss/general"] * r["eval_tokens/general"]
        ) / tokens
        assert r["eval_loss"] == pytest.approx(pooled, rel=1e-9)
    assert evals[-1]["eval_loss/cricket"] < evals[0]["eval_loss/cricket"]
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert set(summary["sources"]) == {"cricket", "general"} and summary["sources"]["cricket"]["share"] == 0.75
    capsys.readouterr()
    assert main(["status", str(tmp_path / "full")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("sources full:")]
    assert line and re.match(
        r"sources full: cricket 7[45]\.\d% of tokens, eval \d\.\d{3} \(first \d\.\d{3}\) \| general 2[45]", line[0]
    ), line


# ------------------------------------------------------------------------------------ config and bad input
def test_the_override_spellings_compose(tmp_path):
    cfg = compose(["data.sources=[{name:cricket,path:/data/c.txt,weight:0.8},{name:general_corpus,weight:0.2}]"])
    assert [(s.name, s.path, s.weight) for s in cfg.data.sources] == [
        ("cricket", "/data/c.txt", 0.8),
        ("general_corpus", None, 0.2),
    ]
    cfg = compose(["data=cricket_replay", "data.sources.1.weight=0.1"])
    assert [s.weight for s in cfg.data.sources] == [0.75, 0.1]
    assert compose([]).data.sources == []  # the plain case: one source, as before


def test_one_source_in_data_sources_is_the_plain_case(tokenizer, tmp_path):
    t = TrainConfig(seq_len=64, global_batch=8, micro_batch=4)
    plain = pipeline.build(DataConfig(cache_dir=str(tmp_path)), t, tokenizer, ONE_RANK)
    listed = pipeline.build(
        DataConfig(cache_dir=str(tmp_path), sources=[SourceConfig(name="demo_corpus")]), t, tokenizer, ONE_RANK
    )
    assert listed.stats["data_key"] == plain.stats["data_key"] and listed.stats["data_cache"] == "hit"
    assert torch.equal(
        next(plain.train.micro_batches(3))["input_ids"], next(listed.train.micro_batches(3))["input_ids"]
    )


def test_a_source_with_fewer_rows_than_its_share_of_a_batch_is_refused_at_the_job_start(tokenizer, tmp_path):
    """Text documents become rows only once tokenised: the job names the source before training."""
    small = tmp_path / "small.txt"
    small.write_text("A short note on the seam position.")
    cfg = DataConfig(
        cache_dir=str(tmp_path), sources=[SourceConfig(name="demo_corpus"), SourceConfig(name="note", path=str(small))]
    )
    with pytest.raises(
        records.DataError, match=r"data.sources\[1\] \(note\): 1 rows of train.seq_len=64 tokens, fewer "
    ):
        pipeline.build(cfg, TrainConfig(seq_len=64, global_batch=8, micro_batch=4), tokenizer, ONE_RANK)


def test_a_stream_takes_its_validation_from_a_file_or_a_bundled_name(tokenizer, tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), streaming=True, validation_path="general_validation")
    built = pipeline.build(cfg, TrainConfig(seq_len=64, global_batch=8, micro_batch=4), tokenizer, ONE_RANK)
    assert built.validation is not None and built.validation.num_rows > 0 and built.stats["data_cache"] == "built"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bad_cases(tmp: Path):
    chats = write_jsonl(tmp / "chats.jsonl", [CHAT] * 40)
    few = write_jsonl(tmp / "few.jsonl", [CHAT] * 3)
    good = "{name:demo_corpus,weight:1}"
    return {
        "zero weight": (
            f"[{good},{{name:general_corpus,weight:0}}]",
            "data.sources[1].weight: must be in (0, 1000000.0], got 0.0",
        ),
        "negative weight": (
            f"[{good},{{name:general_corpus,weight:-1}}]",
            "data.sources[1].weight: must be in (0, 1000000.0]",
        ),
        "NaN weight": (f"[{good},{{name:general_corpus,weight:nan}}]", "data.sources[1].weight: must be a finite"),
        "missing file": (
            f"[{good},{{name:mine,path:{tmp}/nowhere.txt}}]",
            f"data.sources[1].path: '{tmp}/nowhere.txt' does not exist",
        ),
        "same names": (
            f"[{good},{{name:demo_corpus,path:{chats},format:chat}}]",
            "data.sources[1].name: 'demo_corpus' is also",
        ),
        "format of other rows": (
            f"[{good},{{name:chats,path:{chats},format:alpaca}}]",
            f"data.sources[1].format: format=alpaca does not match the rows of {chats} ({chats}:1: field 'instruction': "
            "missing); its rows fit format=chat",
        ),
        "too few rows for its share": (
            f"[{good},{{name:chats,path:{few},format:chat}}]",
            f"data.sources[1].path: {few}: 2 training examples (1 of 3 held out by validation_fraction), fewer than "
            "its share of one global batch (50% of "
            "train.global_batch=8: 4 rows)",
        ),
    }


@pytest.mark.parametrize("case", list(bad_cases(Path("/tmp"))))
def test_bad_mixture_is_refused_in_one_line_naming_the_source_key(case, tmp_path, capsys):
    sources, expected = bad_cases(tmp_path)[case]
    code = main([f"data.sources={sources}", f"run.root={tmp_path}/runs", f"data.cache_dir={tmp_path}/cache"])
    err = capsys.readouterr().err
    assert code == 2 and "nothing submitted" in err, err
    problems = [line.strip() for line in err.splitlines()[1:] if line.strip()]
    assert len(problems) == 1 and problems[0].startswith(expected), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------ vocabulary
TERMS = ["yorker", "googly", "doosra"]


def test_new_rows_start_as_the_mean_of_the_old_ones(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.conf.schema import ModelConfig
    from tuneforge.trainers import vocab

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    before = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()
    old = vocab.extend_tokenizer(tok, ModelConfig(kind="hf", new_tokens=TERMS + ["yorker"]))
    assert len(tok) == old + 3 and [tok(t, add_special_tokens=False)["input_ids"] for t in TERMS] == [
        [old],
        [old + 1],
        [old + 2],
    ]
    assert vocab.resize_model(model, tok, old) == 3
    grown, grown_head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (
        grown.shape[0] >= len(tok)
        and torch.equal(grown[:old], before[:old])
        and torch.equal(grown_head[:old], head[:old])
    )
    for matrix, original in ((grown, before), (grown_head, head)):
        assert torch.allclose(matrix[old : old + 3], original[:old].mean(0).expand(3, -1), atol=1e-6)


@pytest.mark.slow
def test_extended_vocabulary_trains_and_final_and_export_load_with_it(tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    base_size = len(AutoTokenizer.from_pretrained(tiny_base))
    tuneforge(
        "model=hf",
        f"model.name_or_path={tiny_base}",
        "method=full",
        f"model.new_tokens=[{','.join(TERMS)}]",
        *QUICK,
        "train.seq_len=32",
        "train.max_steps=8",
        "train.checkpoint_every=4",
        f"run.dir={run}",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    losses = [m["loss"] for m in metrics(run)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert main(["export", str(run), "--step", "4", "--out", str(tmp_path / "export")]) == 0
    for directory in (run / "final", tmp_path / "export"):
        tok = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory)
        assert len(tok) == base_size + 3
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in TERMS]
        assert ids == [[base_size], [base_size + 1], [base_size + 2]]
        assert model.config.vocab_size == model.get_input_embeddings().weight.shape[0] >= base_size + 3
        with torch.no_grad():
            out = model(torch.tensor([[ids[0][0], ids[1][0], ids[2][0]]])).logits
        assert out.shape[-1] == model.config.vocab_size and torch.isfinite(out).all()
