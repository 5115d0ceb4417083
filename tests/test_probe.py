"""`tuneforge probe`: two tiny bases pretrained here, one on the cricket corpus and one on the general
corpus, scored by bits per byte; the cricket one ranks first on cricket data, the other on general text;
the Slurm array gives the bits per byte one process gives; a stopped probe resumes; bad candidates are
refused before anything is submitted."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from conftest import QUICK, TINY, tuneforge

from tuneforge.data import bundled

WIDE = [a for a in TINY if not a.startswith(("model.hidden_size=", "model.intermediate_size="))] + [
    "model.hidden_size=64",
    "model.intermediate_size=128",
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    """{"cricket": final/ of a tiny Llama pretrained on demo_corpus, "general": one on general_corpus}."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, data in (("cricket", "demo_corpus"), ("general", "general_corpus")):
        run = root / name
        tuneforge(
            *WIDE, *QUICK, f"data.name={data}", "train.max_steps=40", "cluster.tasks_per_node=1", f"run.dir={run}"
        )
        out[name] = run / "final"
    return out


def probe_args(bases: dict, run_dir: Path, *extra: str) -> list:
    return [
        "probe",
        "model=hf",
        f"model.name_or_path={bases['cricket']},{bases['general']}",
        "method=lora",
        "probe.examples=64",
        "train.seq_len=64",
        f"run.dir={run_dir}",
        "logger=wandb",
        "logger.mode=offline",
        *extra,
    ]


@pytest.fixture(scope="module")
def local_probe(bases, tmp_path_factory):
    run = tmp_path_factory.mktemp("probe") / "cricket"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        tuneforge(*probe_args(bases, run, "data=demo_corpus", "cluster.tasks_per_node=1"))
    return json.loads((run / "probe.json").read_text()), run, printed.getvalue()


@pytest.mark.slow
def test_the_cricket_base_ranks_first_on_cricket_data(local_probe, bases, capsys):
    record, run, printed = local_probe
    cricket, general = record["candidates"]
    # each candidate's end line says what it scored, not a training step
    ends = [line for line in printed.splitlines() if line.startswith("done: ")]
    assert len(ends) == 2 and all(" batch(es) per rank scored, domain " in line for line in ends), ends
    assert f"domain {cricket['result']['domain']['bits_per_byte']:.3f} bits/byte" in ends[0]
    assert record["ranking"] == [0, 1]
    assert cricket["result"]["domain"]["bits_per_byte"] < general["result"]["domain"]["bits_per_byte"]
    # and the general base is the closer one to the general slice
    assert general["result"]["general"]["bits_per_byte"] < cricket["result"]["general"]["bits_per_byte"]
    assert cricket["result"]["gap"] < general["result"]["gap"]
    for c in record["candidates"]:
        domain = c["result"]["domain"]
        assert domain["rows"] == 64 and domain["tokens"] > 0 and 1.0 < domain["tokens_per_word"] < 4.0
        assert c["result"]["params"] > 0 and c["result"]["context"] == 512
        assert c["preflight"]["available"] and c["preflight"]["fits"] is None  # CPU: reported, not checked
    # the same text is scored for both: its bytes differ only by the first token of each window
    b0, b1 = (c["result"]["domain"]["bytes"] for c in record["candidates"])
    assert abs(b0 - b1) < 0.05 * b0
    assert record["recommendation"].startswith(f"recommendation: model.name_or_path={bases['cricket']}:")
    # printed again from the probe dir; W&B: one offline run per candidate, with the scores
    capsys.readouterr()
    tuneforge("probe", str(run))
    out = capsys.readouterr().out
    assert "bits/byte" in out and out.strip().splitlines()[-1] == record["recommendation"]
    from tuneforge.trainers import wandb_offline

    for i, c in enumerate(record["candidates"]):
        summary = wandb_offline.read_summary(run / str(i))
        assert summary["probe/domain/bits_per_byte"] == pytest.approx(c["result"]["domain"]["bits_per_byte"])


@pytest.mark.slow
@pytest.mark.slurm
def test_the_general_base_ranks_first_on_general_text_and_the_array_matches_one_process(
    local_probe, bases, slurm_cluster, tmp_path
):
    """On Slurm, one job array with an element per candidate, scoring the general slice as the user's data:
    the general base ranks first, with exactly the bits per byte the local probe computed for that slice
    in one process each."""
    run = tmp_path / "general"
    general_text = bundled("general_validation")
    slurm = [
        "cluster=slurm",
        f"cluster.partition={slurm_cluster}",
        "cluster.tasks_per_node=1",
        "cluster.cpus_per_task=1",
        "cluster.mem_gb=2",
        "cluster.timeout_min=10",
    ]
    tuneforge(*probe_args(bases, run, "data=text_files", f"data.path={general_text}", *slurm), "--wait")
    record = json.loads((run / "probe.json").read_text())
    sweep = json.loads((run / "sweep.json").read_text())
    assert sweep["array_job_id"] and len(sweep["elements"]) == 2
    assert record["ranking"] == [1, 0]
    local = local_probe[0]["candidates"]
    for mine, theirs in zip(record["candidates"], local):
        assert mine["result"]["domain"]["bits_per_byte"] == theirs["result"]["general"]["bits_per_byte"]


@pytest.mark.slow
def test_a_stopped_probe_resumes_where_it_stopped(local_probe, bases, tmp_path):
    run = tmp_path / "stopped"
    one = [a for a in probe_args(bases, run, "data=demo_corpus", "cluster.tasks_per_node=2") if "," not in a]
    one.append(f"model.name_or_path={bases['cricket']}")
    tuneforge(*one, "debug.stop_after=3")
    assert (run / "0" / "probe_progress.json").is_file() and not (run / "0" / "probe_result.json").exists()
    tuneforge(*one)  # the same probe again: the examples scored before are not scored twice
    result = json.loads((run / "0" / "probe_result.json").read_text())
    expected = local_probe[0]["candidates"][0]["result"]
    # 2 ranks here, 1 there: the per-example sums are added in example order either way
    assert result["domain"] == expected["domain"] and result["general"] == expected["general"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_a_sharded_candidate_scores_as_one_process(backend, local_probe, bases, tmp_path):
    """2 ranks with the model sharded (FSDP2, ZeRO-3: every forward collective, each rank its own batches)."""
    run = tmp_path / backend
    args = [a for a in probe_args(bases, run, "data=demo_corpus", "cluster.tasks_per_node=2") if "," not in a]
    extra = ["backend.param_persistence_threshold=0"] if backend == "zero3" else []
    tuneforge(*args, f"model.name_or_path={bases['cricket']}", f"backend={backend}", *extra)
    result = json.loads((run / "0" / "probe_result.json").read_text())
    expected = local_probe[0]["candidates"][0]["result"]
    for which in ("domain", "general"):
        assert result[which]["bits_per_byte"] == pytest.approx(expected[which]["bits_per_byte"], rel=1e-6)
        assert result[which]["bytes"] == expected[which]["bytes"]


def test_bits_per_byte_counts_the_bytes_of_the_scored_text():
    """The definition on one document and one chat turn, by hand with a tokenizer: the scored tokens
    produce the text after the first token (documents), the response span (chat)."""
    from tuneforge.conf.schema import DataConfig
    from tuneforge.data.tokenize import DEFAULT_CHAT_TEMPLATE
    from tuneforge.trainers.model import train_tokenizer
    from tuneforge.trainers.probe import scored_examples

    docs = [p for p in bundled("demo_corpus").read_text().split("\n\n") if p.strip()]
    tok = train_tokenizer(docs[:200], 300, 2)
    doc = "Play the inswinger late, with a straight bat. Café au lait ☕ after nets."
    (example,) = scored_examples(DataConfig(format="text"), tok, 512, [{"text": doc}])
    first = tok(doc)["input_ids"][0]
    assert example["bytes"] == len(doc.encode()) - len(tok.decode([first]).encode())
    assert example["words"] == len(doc.split()) - (0 if doc.split()[0] != tok.decode([first]) else 1)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    answer = "Move the front foot to the line, and play late."
    chat = {
        "messages": [{"role": "user", "content": "How do I play inswing?"}, {"role": "assistant", "content": answer}]
    }
    (example,) = scored_examples(DataConfig(format="chat"), tok, 512, [chat])
    assert abs(example["bytes"] - len((answer + "</s>\n").encode())) <= 2
    assert example["words"] == len(answer.split())
    # and the score: summed loss / (ln 2 x bytes)
    from tuneforge.trainers.probe import totals

    t = totals({"0": [math.log(2) * 100, 10, 50, 8, 9]}, 1)
    assert t["bits_per_byte"] == pytest.approx(2.0) and t["tokens_per_word"] == pytest.approx(9 / 8)


@pytest.mark.parametrize(
    "candidates,words",
    [
        (["model=no_such_model"], "model=no_such_model: no such option; available: "),
        (
            ["model=hf", "model.name_or_path=/no/such/model,HuggingFaceTB/SmolLM2-135M"],
            "model.name_or_path: '/no/such/model' does not exist",
        ),
        (["model=tiny"], "model: the probe scores a trained model"),
    ],
)
def test_a_candidate_that_does_not_exist_is_refused_before_submission(candidates, words, tmp_path, capsys):
    run = tmp_path / "probe"
    assert tuneforge("probe", *candidates, "logger=none", f"run.dir={run}", check=False) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and words in err[1]
    assert not run.exists()
