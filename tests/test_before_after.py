"""Before and after, in every run: the validation loss at step 0, the eval prompts' greedy answers in
samples.jsonl (step 0, every evaluation, the end), the paired table, `tuneforge compare` and `generate`,
generation in step on 2 ranks of every backend, and exports that keep the run's chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QUICK, all_metrics, tuneforge

from tuneforge.data import bundled

PROMPTS = [
    {"prompt": "How do I play an inswinging cricket ball?", "reference": "Play late and straight."},
    {"prompt": "What is a yorker?"},
]


def chat_lora(base: Path, run: Path, *extra: str) -> list:
    return [
        "model=hf",
        f"model.name_or_path={base}",
        "method=lora",
        "data=demo_instruct",
        *QUICK,
        "train.seq_len=64",
        "train.eval_every=5",
        "eval.max_new_tokens=8",
        f"run.dir={run}",
        *extra,
    ]


def samples(run: Path) -> list:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chat_run(tiny_base, tmp_path_factory):
    """A LoRA run on the bundled chat data, 2 ranks: its own held-out rows are the prompts."""
    run = tmp_path_factory.mktemp("chat") / "run"
    tuneforge(*chat_lora(tiny_base, run, "cluster.tasks_per_node=2", "train.lr=1e-2"))
    return run


@pytest.mark.slow
def test_a_chat_run_answers_its_held_out_prompts_before_during_and_after(chat_run, capsys):
    rows = samples(chat_run)
    assert [r["step"] for r in rows] == [0] * 3 + [5] * 3 + [10] * 3  # eval.num_prompts=3
    held_out = [json.loads(line) for line in bundled("demo_instruct").read_text().splitlines()]
    questions = {m["content"] for r in held_out for m in r["messages"] if m["role"] == "user"}
    assert all(r["prompt"] in questions and r["reference"] for r in rows)
    assert all(isinstance(r["answer"], str) and r["reference_loss"] > 0 for r in rows)
    first = all_metrics(chat_run)[0]
    assert first["step"] == 0 and "eval_loss" in first and "loss" not in first  # eval_on_start
    # the reference answers got more likely with training
    before = [r["reference_loss"] for r in rows if r["step"] == 0]
    after = [r["reference_loss"] for r in rows if r["step"] == 10]
    assert sum(after) < sum(before)


@pytest.mark.slow
def test_compare_shows_the_paired_table(chat_run, capsys):
    from tuneforge.trainers.samples import paired

    table = paired(chat_run)
    assert (table.before_step, table.after_step) == (0, 10) and len(table.rows) == 3
    row = table.rows[0]
    assert row["answer_before"] is not None and row["answer_after"] is not None
    assert row["reference_loss_after"] < row["reference_loss_before"] + 1.0
    assert table.eval_loss_after < table.eval_loss_before
    capsys.readouterr()
    tuneforge("compare", str(chat_run))
    out = capsys.readouterr().out
    assert out.startswith("held-out loss: ") and "[3] " in out and "before (step 0, reference loss" in out
    assert "after (step 10, reference loss" in out and row["prompt"][:30] in out
    # the job's log ends with the same table
    log = next((chat_run / "slurm").glob("*_0_log.out")).read_text()
    assert "before and after training:" in log and row["prompt"][:30] in log
    tuneforge("compare", str(chat_run), str(chat_run), "--json")
    parsed = json.loads(capsys.readouterr().out)
    assert len(parsed) == 2 and parsed[0]["rows"][0]["prompt"] == row["prompt"]


@pytest.mark.slow
def test_exports_carry_the_chat_template_and_are_ready_for_inference(chat_run, capsys):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "How do I play an inswinging cricket ball?"}]
    template = AutoTokenizer.from_pretrained(chat_run / "final").chat_template
    assert template
    for step in ([], ["--step", "10"]):
        tuneforge("export", str(chat_run), *step)
        out = chat_run / "export" / ("step_10" if step else "final")
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert tokenizer.chat_template == template
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|assistant|>\n") and "inswinging" in text
        assert json.loads((out / "config.json").read_text())["use_cache"] is True
        assert tokenizer.model_max_length == json.loads((out / "config.json").read_text())["max_position_embeddings"]


@pytest.mark.slow
def test_a_pretraining_checkpoint_export_is_ready_for_inference(tiny_base):
    from transformers import AutoTokenizer

    assert json.loads((tiny_base / "config.json").read_text())["use_cache"] is True
    assert AutoTokenizer.from_pretrained(tiny_base).model_max_length == 512


@pytest.mark.slow
def test_samples_after_a_requeue_hold_each_step_once(tiny_base, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    run = tmp_path / "run"
    args = chat_lora(
        tiny_base, run, f"eval.prompts={prompts}", "train.eval_every=2", "cluster.tasks_per_node=1", "logger=wandb"
    )
    tuneforge(*args, "debug.stop_after=5")
    assert sorted({r["step"] for r in samples(run)}) == [0, 2, 4]
    # what an allocation killed after its checkpoint leaves: answers past the step it resumes from
    with open(run / "samples.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "index": 0, "prompt": "stale", "answer": "stale"}) + "\n")
    tuneforge(*args)
    rows = samples(run)
    assert [(r["step"], r["index"]) for r in rows] == [(s, i) for s in (0, 2, 4, 6, 8, 10) for i in (0, 1)]
    assert all(r["prompt"] == PROMPTS[r["index"]]["prompt"] for r in rows)
    assert [r["reference_loss"] is None for r in rows[:2]] == [False, True]  # the second has no reference
    assert [m["step"] for m in all_metrics(run)].count(0) == 1  # eval_on_start once
    # W&B (offline here): a Table of the answers at every evaluation, and the before/after table at the end
    tables = sorted(p.name.split("_")[-2] for p in run.glob("wandb/offline-run-*/files/media/table/samples_*.json"))
    assert sorted(map(int, tables)) == [0, 2, 4, 6, 8, 10]
    (paired,) = run.glob("wandb/offline-run-*/files/media/table/before_after_*.table.json")
    assert json.loads(paired.read_text())["columns"][:4] == ["prompt", "reference", "answer_before", "answer_after"]
    # `tuneforge generate` renders the prompt with the run's chat template and answers as the run did
    capsys.readouterr()
    tuneforge("generate", str(run), PROMPTS[0]["prompt"], "--max-new-tokens", "8")
    assert capsys.readouterr().out.strip() == rows[-2]["answer"]


# ---------------------------------------------------------------------------------- every backend
BACKENDS = ["ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload"]


@pytest.fixture(scope="module")
def one_process(tiny_base, tmp_path_factory):
    run = tmp_path_factory.mktemp("gen") / "one"
    tuneforge(*generation_run(tiny_base, run, "ddp", 1))
    return samples(run)


def generation_run(base: Path, run: Path, backend: str, ranks: int, *extra: str) -> list:
    prompts = bundled("demo_prompts")
    return [
        "model=hf",
        f"model.name_or_path={base}",
        "method=full",
        "data=demo_instruct",
        f"backend={backend}",
        *(["backend.param_persistence_threshold=0"] if backend.startswith("zero3") else []),
        *QUICK,
        "train.max_steps=2",
        "train.warmup_steps=1",
        "train.seq_len=64",
        f"eval.prompts={prompts}",
        "eval.max_new_tokens=12",
        f"cluster.tasks_per_node={ranks}",
        f"run.dir={run}",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_on_2_ranks_gives_one_process_text(backend, one_process, tiny_base, tmp_path):
    """Step 0 (before any training, the same weights everywhere): every backend's 2 ranks answer in step
    (FSDP2's and ZeRO-3's forwards are collective) and give the text one process gives."""
    run = tmp_path / backend
    tuneforge(*generation_run(tiny_base, run, backend, 2))
    mine = [(r["prompt"], r["answer"]) for r in samples(run) if r["step"] == 0]
    assert mine == [(r["prompt"], r["answer"]) for r in one_process if r["step"] == 0]
    assert len(mine) == 3 and any(answer for _, answer in mine)
    losses = [r["reference_loss"] for r in samples(run) if r["step"] == 0]
    assert losses == pytest.approx([r["reference_loss"] for r in one_process if r["step"] == 0], rel=1e-5)


@pytest.mark.slow
def test_lora_on_zero3_generates_as_one_process(one_process, tiny_base, tmp_path):
    run = tmp_path / "lora-zero3"
    tuneforge(*generation_run(tiny_base, run, "zero3", 2, "method=lora"))
    # LoRA's B starts at zero: at step 0 the adapted model is the base
    mine = [(r["prompt"], r["answer"]) for r in samples(run) if r["step"] == 0]
    assert mine == [(r["prompt"], r["answer"]) for r in one_process if r["step"] == 0]


@pytest.mark.slow
def test_qlora_on_fsdp_answers_from_its_4bit_base(one_process, tiny_base, tmp_path):
    run = tmp_path / "qlora-fsdp"
    tuneforge(*generation_run(tiny_base, run, "fsdp", 2, "method=qlora"))
    rows = [r for r in samples(run) if r["step"] == 0]
    full = [r for r in one_process if r["step"] == 0]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in full] and all(
        isinstance(r["answer"], str) for r in rows
    )
    # the same model in 4 bits (NF4 on a 64-wide model: within 20%) near the full-precision reference losses
    assert [r["reference_loss"] for r in rows] == pytest.approx([r["reference_loss"] for r in full], rel=0.2)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "rows,words",
    [
        ([{"prompt": "ok"}, {"reference": "no prompt"}], ":2: field 'prompt': missing"),
        ([{"prompt": "ok", "answer": "x"}], ":1: field 'answer': unknown"),
        ([{"prompt": ""}], ":1: field 'prompt': must be a non-empty string"),
    ],
)
def test_a_bad_eval_prompts_row_is_refused_before_submission(rows, words, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    code = tuneforge("logger=none", f"eval.prompts={prompts}", f"run.dir={run}", check=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2 and err[1].strip().startswith("eval.prompts: ") and words in err[1]
    assert not run.exists()


def test_a_missing_eval_prompts_file_is_refused(tmp_path, capsys):
    code = tuneforge("logger=none", f"eval.prompts={tmp_path / 'nope.jsonl'}", check=False)
    assert code == 2 and "eval.prompts: " in capsys.readouterr().err


def test_the_reference_loss_counts_the_last_answer_only():
    """A held-out conversation's earlier assistant turns are context: only its last answer is scored, and
    the prompt is the conversation up to it, rendered with the chat template's generation prompt."""
    from tuneforge.conf.schema import DataConfig
    from tuneforge.data import prompts
    from tuneforge.data.tokenize import DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX
    from tuneforge.trainers.generate import Sampler
    from tuneforge.trainers.model import train_tokenizer

    docs = [p for p in bundled("demo_corpus").read_text().split("\n\n") if p.strip()]
    tok = train_tokenizer(docs[:200], 300, 2)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    turns = [
        {"role": "user", "content": "What is a yorker?"},
        {"role": "assistant", "content": "A full ball at the toes."},
        {"role": "user", "content": "How do I practise it?"},
        {"role": "assistant", "content": "Bowl at a shoe on the crease."},
    ]
    data = DataConfig(format="chat")
    (prompt,) = prompts.from_held_out([{"messages": turns}], data)
    assert (prompt.prompt, prompt.reference) == ("How do I practise it?", "Bowl at a shoe on the crease.")
    sampler = Sampler([prompt], data, tok, 256, 8, 512)
    assert tok.decode(sampler.inputs[0]).endswith("How do I practise it?</s>\n<|assistant|>\n")
    assert "A full ball at the toes." in tok.decode(sampler.inputs[0])
    ids, labels = sampler.scored[0]
    scored = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tok.decode(scored) == "Bowl at a shoe on the crease.</s>\n"
