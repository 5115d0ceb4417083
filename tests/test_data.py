"""Data: sources, formats and their label masks, packing equivalence and fill, the token cache,
deterministic and resumable batches (cached and streaming), bad data refused with file, row and
field, and a chat finetune through the CLI whose validation loss falls."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK, TINY, free_port, losses, metrics, tuneforge

from tuneforge import data as bundled_data
from tuneforge.conf.backends import DDPConfig
from tuneforge.conf.schema import DataConfig, DebugConfig, LoggerConfig, TrainConfig
from tuneforge.data import packing, pipeline, prepare, records, sources
from tuneforge.data.batches import Collate
from tuneforge.data.records import DataError
from tuneforge.data.tokenize import DEFAULT_CHAT_TEMPLATE, Encoder
from tuneforge.launch.cli import main
from tuneforge.trainers.distributed import DistEnv, StopFlag
from tuneforge.trainers.metrics import Throughput
from tuneforge.trainers.optim import IGNORE_INDEX, counted_tokens, token_loss_sum

ONE_RANK = DistEnv(
    rank=0,
    local_rank=0,
    world_size=1,
    local_world_size=1,
    num_nodes=1,
    master_addr="localhost",
    master_port=0,
    job_id="test",
    device="cpu",
)
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is a yorker?"},
            {"role": "assistant", "content": "A full ball aimed at the batter's toes."},
            {"role": "user", "content": "And a bouncer?"},
            {"role": "assistant", "content": "A short ball that rises towards the head."},
        ]
    },
    {"messages": [{"role": "user", "content": "Who keeps wicket?"}, {"role": "assistant", "content": "The keeper."}]},
]


def data_cfg(**values) -> DataConfig:
    return DataConfig(**{"cache_dir": "/nonexistent-cache", **values})


def train_cfg(**values) -> TrainConfig:
    return TrainConfig(**{"seq_len": 64, "global_batch": 4, "micro_batch": 2, **values})


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models in this process: one thread is faster than two fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    """The tokenizer the default run trains on the bundled corpus (byte-level BPE, 1024 tokens)."""
    from tuneforge.trainers.model import train_tokenizer

    spec = data_cfg(name="demo_corpus")
    texts = [row["text"] for _, row in records.read_rows(bundled_data.bundled("demo_corpus"), spec)]
    tok = train_tokenizer(texts, 1024, 2)
    tok.pad_token = tok.eos_token
    return tok


def targets(tokenizer, example) -> str:
    ids, labels = example
    return tokenizer.decode([label for label in labels if label != IGNORE_INDEX])


# ------------------------------------------------------------------------------------ label masks
def test_label_masks_count_only_the_responses(tokenizer):
    eos = tokenizer.eos_token
    cases = [
        (data_cfg(format="text"), {"text": "Keep the head still."}, "Keep the head still." + eos),
        (
            data_cfg(format="alpaca"),
            {"instruction": "Name a shot.", "input": "", "output": "The cover drive."},
            "The cover drive." + eos,
        ),
        (
            data_cfg(format="alpaca", instruction_field="q", input_field="ctx", output_field="a"),
            {"q": "Name a shot.", "ctx": "Off side.", "a": "The cut."},
            "The cut." + eos,
        ),
        (
            data_cfg(format="completion"),
            {"prompt": "The best drill for footwork is", "completion": " shadow batting."},
            " shadow batting." + eos,
        ),
        (
            data_cfg(format="chat"),
            CHATS[0],
            f"A full ball aimed at the batter's toes.{eos}\nA short ball that rises towards the head.{eos}\n",
        ),
    ]
    for cfg, row, expected in cases:
        example = Encoder(cfg, tokenizer, 256).encode([row])[0]
        assert targets(tokenizer, example) == expected, cfg.format
        ids, labels = example
        assert len(ids) == len(labels)
        assert all(label in (IGNORE_INDEX, tok) for tok, label in zip(ids, labels))  # a label is its token or ignored
        if cfg.format != "text":  # the prompt is there, but not a target
            assert labels[0] == IGNORE_INDEX and ids[0] != IGNORE_INDEX
        everything = Encoder(replace(cfg, train_on_prompt=True), tokenizer, 256).encode([row])[0]
        assert everything[1] == everything[0]  # train_on_prompt: every token is a target

    # the chat rendering itself is the documented default template, and the mask follows any template
    rendered = tokenizer.decode(Encoder(data_cfg(format="chat"), tokenizer, 256).encode([CHATS[1]])[0][0])
    assert rendered == f"<|user|>\nWho keeps wicket?{eos}\n<|assistant|>\nThe keeper.{eos}\n"
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    example = Encoder(data_cfg(format="chat", chat_template=chatml), tokenizer, 256).encode([CHATS[1]])[0]
    assert targets(tokenizer, example) == "The keeper.<|im_end|>\n"
    assert DEFAULT_CHAT_TEMPLATE in Path(__file__).parents[1].joinpath("docs", "data.md").read_text()


def tokenizer_kinds(docs):
    """Fast tokenizers of the layouts models ship: a Llama-2-like one (a normaliser prepends "▁",
    BOS and EOS added), a SentencePiece-like Metaspace one adding BOS, a BERT-like one adding CLS and
    SEP, and a GPT-2-like byte-level one adding nothing whose prefix space is a token of offsets (0, 0)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def bpe(specials, **kw):
        t = Tokenizer(models.BPE(**kw))
        return t, trainers.BpeTrainer(vocab_size=400, special_tokens=specials)

    t, trainer = bpe(["<unk>", "<s>", "</s>"], unk_token="<unk>", byte_fallback=True)
    t.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    t.train_from_iterator(docs, trainer)
    t.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    yield PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    t, trainer = bpe(["<unk>", "<s>", "</s>"], unk_token="<unk>")
    t.normalizer, t.pre_tokenizer = normalizers.NFKC(), pre_tokenizers.Metaspace()
    t.train_from_iterator(docs, trainer)
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    yield PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer, t.pre_tokenizer = normalizers.BertNormalizer(), pre_tokenizers.BertPreTokenizer()
    t.train_from_iterator(docs, trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    t.post_processor = processors.BertProcessing(("[SEP]", 2), ("[CLS]", 1))
    yield PreTrainedTokenizerFast(tokenizer_object=t, eos_token="[SEP]", unk_token="[UNK]", cls_token="[CLS]")
    t, trainer = bpe(["<|endoftext|>"])
    t.pre_tokenizer, t.post_processor = pre_tokenizers.ByteLevel(add_prefix_space=True), processors.ByteLevel()
    t.train_from_iterator(docs, trainer)
    yield PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>")


def test_text_labels_mark_every_token_of_the_text_and_none_the_tokenizer_added(tokenizer):
    """format=text: a token is a target unless the tokenizer added it (BOS, CLS, SEP, a template's EOS),
    special tokens written in the text and a zero-width prefix space included. The encoder knows what
    is added from encoding probes and skips the offsets (a third of the Rust tokenizer's time); the
    oracle is the tokenizer's own mask of the tokens it added, which is also the path taken when what a
    tokenizer adds varies with the text."""
    docs = [row["text"] for _, row in records.read_rows(bundled_data.bundled("demo_corpus"), data_cfg())]
    for tok in [tokenizer, *tokenizer_kinds(docs)]:
        texts = docs[:40] + [" ", "x", "  lead", "trail  ", "1 2 3", "naïve café ✓ \u00a0 tabs\tand\nlines"]
        texts += [f"{tok.eos_token} first", f"mid {tok.eos_token} dle", f"end {tok.eos_token}"]
        encoder = Encoder(data_cfg(format="text"), tok, 4096)
        assert encoder.added is not None, type(tok.backend_tokenizer.post_processor)
        got = encoder.encode([{"text": t} for t in texts])
        assert len(got) == len(texts)
        eos = tok.eos_token_id
        for (ids, labels), encoding in zip(got, tok.backend_tokenizer.encode_batch(texts)):
            want_ids, added = encoding.ids, encoding.special_tokens_mask
            want = [IGNORE_INDEX if a else t for t, a in zip(want_ids, added)]
            if want_ids and want_ids[-1] == eos:
                want_ids, want = want_ids[:-1], want[:-1]
            assert (ids, labels) == (want_ids + [eos], want + [eos])
        encoder.added = None  # as for a tokenizer whose additions vary with the text: its mask per text
        assert encoder.encode([{"text": t} for t in texts]) == got


@pytest.mark.parametrize("split_special_tokens", [False, True])
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_rust_encodings_read_directly_equal_the_tokenizers_call(tokenizer, split_special_tokens, add_special_tokens):
    """compat.encode_with_offsets skips transformers' per-encoding conversion: the same ids and offsets
    as tokenizer(..., return_offsets_mapping=True), special tokens written in the text and the
    tokenizer's own settings (split_special_tokens, a truncation left on the backend) included."""
    import copy

    from tuneforge.compat.transformers import encode_with_offsets

    tok = copy.deepcopy(tokenizer)
    tok.split_special_tokens = split_special_tokens
    tok.backend_tokenizer.enable_truncation(8)  # as a tokenizer.json may ship it; __call__ turns it off
    docs = [row["text"] for _, row in records.read_rows(bundled_data.bundled("demo_corpus"), data_cfg())][:20]
    docs += ["", " ", f"before {tok.eos_token} after", "naïve café ✓ \u00a0 tabs\tand\nlines"]
    want = tok(docs, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    got = encode_with_offsets(tok, docs, add_special_tokens=add_special_tokens)
    assert [ids for ids, _ in got] == want["input_ids"]
    assert [list(offsets) for _, offsets in got] == [list(map(tuple, o)) for o in want["offset_mapping"]]
    assert max(len(ids) for ids, _ in got) > 8


def test_long_examples_are_truncated_and_those_left_without_targets_dropped(tokenizer):
    enc = Encoder(data_cfg(format="completion"), tokenizer, 16)
    long_prompt = {"prompt": "word " * 40, "completion": "answer"}
    fits = {"prompt": "Hi", "completion": " there, a short answer"}
    examples = enc.encode([long_prompt, fits])
    assert len(examples) == 1 and enc.dropped == 1 and enc.truncated == 1
    text = Encoder(data_cfg(format="text"), tokenizer, 16).encode([{"text": "word " * 40}])[0]
    assert len(text[0]) > 16  # documents are not truncated: the packer splits them


# ------------------------------------------------------------------------------------ packing
def tiny_llama(attn: str, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        use_cache=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=attn, dtype=torch.float32).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_gives_each_document_its_own_logits_and_loss(attn):
    model = tiny_llama(attn)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (7, 12, 5, 9, 20, 3, 30)]
    examples = [(d, [IGNORE_INDEX] * 2 + d[2:]) for d in docs]  # two prompt tokens each
    rows = packing.pack(examples, 32, pad_id=0, split_long=False)
    assert len(rows) < len(docs)  # several documents share a row
    alone_loss, alone_tokens = 0.0, 0
    with torch.no_grad():
        for collate in (Collate(packed=True), Collate(packed=True, flatten=True), Collate(packed=False)):
            rows_here = rows if collate.packed else packing.pad(examples, 32, pad_id=0, split_long=False)
            batch = collate(rows_here)
            labels = batch.pop("labels")
            logits = model(**batch).logits.reshape(len(rows_here), -1, 128)
            for r, pieces in enumerate(_pieces(rows_here)):
                for start, end in pieces:
                    alone = model(
                        input_ids=torch.tensor(rows_here.input_ids[r : r + 1, start:end], dtype=torch.long)
                    ).logits
                    torch.testing.assert_close(logits[r, start:end], alone[0], atol=1e-5, rtol=0)
            # the loss of the packed (or padded) batch = the documents' losses taken one by one
            assert counted_tokens(labels) == sum(len(d) - 2 for d in docs)
            packed_loss = token_loss_sum(model(**batch).logits, labels).item()
            if not alone_tokens:
                for ids, labs in examples:
                    alone_loss += token_loss_sum(
                        model(input_ids=torch.tensor([ids])).logits, torch.tensor([labs])
                    ).item()
                    alone_tokens += counted_tokens(torch.tensor([labs]))
            assert packed_loss == pytest.approx(alone_loss, rel=1e-5)


def _pieces(rows):
    """[(start, end)] of the real examples in each row, from the position ids."""
    out = []
    for r in range(len(rows)):
        starts = [i for i in range(int(rows.lengths[r])) if rows.position_ids[r, i] == 0]
        out.append(list(zip(starts, starts[1:] + [int(rows.lengths[r])])))
    return out


@pytest.mark.parametrize(
    "name, fmt, packed, seq_len",
    [("demo_corpus", "text", True, 48), ("demo_instruct", "chat", True, 48), ("demo_alpaca", "alpaca", False, 96)],
)
def test_rows_are_the_same_on_any_number_of_workers(tokenizer, monkeypatch, tmp_path, name, fmt, packed, seq_len):
    """data.prepare_workers: forked processes tokenise the chunks (chunks of 16 rows here, to have many),
    and the rows, their order and the truncated/dropped counts are those of one process."""
    spec = data_cfg(name=name, format=fmt, packing=packed)
    rows_read = [row for _, row in records.read_rows(bundled_data.bundled(name), spec)]
    monkeypatch.setattr(prepare, "ENCODE_CHUNK", 16)
    assert len(rows_read) > 3 * 16
    encode_chunk = prepare._encode_chunk

    def in_which_process(encoder, recs):  # inherited by the forked workers
        with (tmp_path / "pids").open("a") as f:
            f.write(f"{os.getpid()}\n")
        return encode_chunk(encoder, recs)

    monkeypatch.setattr(prepare, "_encode_chunk", in_which_process)
    built = {}
    for workers in (1, 3):
        (tmp_path / "pids").write_text("")
        encoder = Encoder(spec, tokenizer, seq_len)  # short: some chat and alpaca examples are truncated or dropped
        built[workers] = (prepare.rows_from_records(rows_read, encoder, spec, 0, workers), encoder)
        pids = set((tmp_path / "pids").read_text().split())
        if workers == 1:
            assert pids == {str(os.getpid())}
        else:  # (which of the 3 gets a chunk is the pool's business)
            assert str(os.getpid()) not in pids and len(pids) >= 2, pids
    (one, serial), (three, forked) = built[1], built[3]
    for field in packing.ROW_FIELDS:
        np.testing.assert_array_equal(getattr(one, field), getattr(three, field))
    assert (serial.truncated, serial.dropped) == (forked.truncated, forked.dropped)
    assert fmt == "text" or serial.truncated > 0


@pytest.mark.parametrize(
    "name, fmt, packed, fraction, seq",
    [
        ("demo_corpus", "text", True, 0.0, 48),
        ("demo_corpus", "text", True, 0.2, 48),
        ("demo_corpus", "text", False, 0.2, 48),
        ("demo_instruct", "chat", True, 0.1, 48),
        ("demo_alpaca", "alpaca", False, 0.0, 96),
    ],
)
def test_the_cache_built_in_one_reading_holds_the_rows_of_packing_in_memory(
    tokenizer, monkeypatch, tmp_path, name, fmt, packed, fraction, seq
):
    """The token cache is built from one reading of the files, its examples spooled to disk and its rows
    written in chunks (data/prepare.py; documents made with numpy, not materialise's loop): chunks of 16
    rows, write chunks of 3 rows, 2 workers, and a validation split whose examples are not adjacent in
    the spool. The rows are those `pack`/`pad` make of the split's examples in memory."""
    monkeypatch.setattr(prepare, "ENCODE_CHUNK", 16)
    monkeypatch.setattr(prepare, "WRITE_CHUNK", 3)
    cfg = data_cfg(
        name=name, format=fmt, packing=packed, validation_fraction=fraction, prepare_workers=2, cache_dir=str(tmp_path)
    )
    data = pipeline.build(cfg, train_cfg(seq_len=seq, global_batch=2), tokenizer, ONE_RANK)
    read = list(sources.rows(sources.train_source(cfg), cfg))
    train, held = pipeline.split_validation(read, fraction, train_cfg().seed)
    arrange = packing.pack if packed else packing.pad
    for split, recs, got in (
        ("train", train, data.train.rows),
        ("validation", held, getattr(data.validation, "rows", None)),
    ):
        if not recs:
            assert f"{split}_rows" not in data.stats
            continue
        want = arrange(Encoder(cfg, tokenizer, seq).encode(recs), seq, tokenizer.pad_token_id, split_long=fmt == "text")
        assert data.stats[f"{split}_examples"] == len(recs) and data.stats[f"{split}_rows"] == len(want) > 3
        for field in packing.ROW_FIELDS:
            np.testing.assert_array_equal(np.asarray(getattr(data_rows(data, split), field)), getattr(want, field))
    assert [p.name for p in tmp_path.iterdir()] == [data.stats["data_key"]]  # no spool or half cache left
    assert sorted(p.name for p in (tmp_path / data.stats["data_key"]).iterdir()) == sorted(
        ["meta.json", "train"] + (["validation"] if held else [])
    )


def data_rows(data, split):
    """The cached rows of a split, as the batches hold them."""
    return data.train.rows if split == "train" else pipeline._load_rows(Path(data.stats["data_cache_dir"]) / split)


def test_text_files_are_read_as_a_stream_of_the_same_documents(monkeypatch, tmp_path):
    """A text file is decoded a block at a time (its documents are not held whole): blocks of 1-7 bytes
    cut CRLF pairs, paragraph breaks and multibyte characters, and the documents are those of the
    whole file split at once; a bad byte is still named by line and byte."""
    import random

    rng = random.Random(0)
    pieces = ["ab", "é", "\r", "\n", " ", "\r\n", "\n\n", "🏏", "\r\n\r\n"]
    path = tmp_path / "t.txt"
    for trial in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        path.write_bytes((records.BOM if trial % 4 == 0 else b"") + text.encode())
        norm = text.replace("\r\n", "\n").replace("\r", "\n")
        for sample_by, parts in (("paragraph", norm.split("\n\n")), ("line", norm.split("\n"))):
            want = [p for p in parts if p.strip()]
            for block in (1, 2, 7):
                monkeypatch.setattr(records, "TEXT_BLOCK", block)
                got = [row["text"] for _, row in records.read_rows(path, data_cfg(text_sample_by=sample_by))]
                assert got == want, (text, sample_by, block)
    path.write_bytes("first\n\nsecond é\n".encode() + b"\xff rest\n")
    with pytest.raises(DataError, match=r"t\.txt:4: not UTF-8 \(byte 0xff at byte 17\)"):
        list(records.read_rows(path, data_cfg()))


def test_a_bad_row_deep_in_a_corpus_fails_the_build_naming_every_bad_row(tokenizer, monkeypatch, tmp_path):
    """One reading checks and tokenises: bad rows found after many chunks were tokenised on 2 workers
    stop the build with the message of the check before submission (all of them counted), and leave
    no cache, spool or temporary directory behind."""
    monkeypatch.setattr(prepare, "ENCODE_CHUNK", 16)
    rows = [{"text": f"document {i} about the cover drive"} for i in range(400)]
    rows[250], rows[390] = {"text": 7}, {"body": "x"}
    path = write_jsonl(tmp_path / "corpus.jsonl", rows)
    cfg = data_cfg(path=str(path), prepare_workers=2, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as raised:
        pipeline.build(cfg, train_cfg(), tokenizer, ONE_RANK)
    assert str(raised.value) == (
        f"2 bad row(s) in {path}:\n  {path}:251: field 'text': must be a string, got int\n  {path}:391: field 'text': missing"
    )
    assert list((tmp_path / "cache").iterdir()) == []


MEMORY_PROBE = """
import json, resource, sys
from transformers import AutoTokenizer
from tuneforge.conf.schema import DataConfig, TrainConfig
from tuneforge.data import pipeline
from tuneforge.trainers.distributed import DistEnv
corpus, tokenizer, cache = sys.argv[1:4]
cfg = DataConfig(path=corpus, prepare_workers=1, cache_dir=cache, validation_fraction=0.05)
train = TrainConfig(seq_len=256, global_batch=4, micro_batch=2)
tokenizer = AutoTokenizer.from_pretrained(tokenizer)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = pipeline.build(cfg, train, tokenizer, DistEnv(0, 0, 1, 1, 1, "127.0.0.1", 0, "t", "cpu"))
print(json.dumps({"growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, **data.stats}))
"""


@pytest.mark.slow
def test_building_the_cache_of_a_larger_corpus_takes_no_more_memory(tokenizer, tmp_path):
    """Rows are written as they are made and the examples spooled to disk: building the cache of a 12 MB
    corpus raises the peak memory of the process (one process: data.prepare_workers=1) by less than
    1 MB per MB of corpus more than a 3 MB corpus does (measured: ~0.6; holding the records and the
    examples until packing, as before, cost ~10)."""
    import subprocess
    import sys

    tokenizer.save_pretrained(tmp_path / "tokenizer")
    docs = [row["text"] for _, row in records.read_rows(bundled_data.bundled("demo_corpus"), data_cfg())]
    growth = {}
    for mb in (3, 12):
        corpus, size, i = tmp_path / f"corpus{mb}.txt", 0, 0
        with corpus.open("w") as f:
            while size < mb * 10**6:
                doc = f"Document {i}. {docs[i % len(docs)]}\n\n"
                f.write(doc)
                size, i = size + len(doc.encode()), i + 1
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                MEMORY_PROBE,
                str(corpus),
                str(tmp_path / "tokenizer"),
                str(tmp_path / f"cache{mb}"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        stats = json.loads(out.stdout.strip().splitlines()[-1])
        assert stats["data_cache"] == "built" and stats["train_rows"] > mb * 600
        growth[mb] = stats["growth_kb"] / 1024
    assert growth[12] - growth[3] < 9, growth


def test_packing_fills_rows_of_the_bundled_instruction_data(tokenizer):
    cfg = data_cfg(name="demo_instruct", format="chat")
    rows_read = [row for _, row in records.read_rows(bundled_data.bundled("demo_instruct"), cfg)]
    fills = {}
    for seq_len in (256, 512):
        examples = Encoder(cfg, tokenizer, seq_len).encode(rows_read)
        packed = packing.pack(examples, seq_len, tokenizer.pad_token_id, split_long=False)
        padded = packing.pad(examples, seq_len, tokenizer.pad_token_id, split_long=False)
        fills[seq_len] = (round(packed.fill, 4), round(padded.fill, 4))
        assert packed.fill >= 0.95, fills
        assert padded.fill < 0.5
        # every example is in exactly one row, whole
        assert int(packed.lengths.sum()) == sum(len(ids) for ids, _ in examples) == int(padded.lengths.sum())
    print("fill (packed, padded) by seq_len:", fills)

    # text: documents laid end to end and cut at row ends; a cut document restarts its positions
    docs = [(list(range(5, 5 + n)), list(range(5, 5 + n))) for n in (10, 50, 7)]
    rows = packing.pack(docs, 16, pad_id=0, split_long=True)
    assert rows.lengths.tolist() == [16, 16, 16, 16, 3]
    assert rows.position_ids[0].tolist() == list(range(10)) + list(range(6))
    assert rows.labels[1, 0] == IGNORE_INDEX  # the continued piece is not predicted from the previous row


# ------------------------------------------------------------------------------------ sources
SOURCE_ROWS = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(6)]


def test_each_local_file_type_loads_the_same_rows(tmp_path):
    """sources.rows reads local files with data/records.py (the check's reader: one reading checks and
    feeds the cache); a streaming run reads them through `datasets` (sources.dataset): both give
    these rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "a.jsonl", SOURCE_ROWS)
    (tmp_path / "a.json").write_text(json.dumps(SOURCE_ROWS))
    pq.write_table(pa.Table.from_pylist(SOURCE_ROWS), tmp_path / "a.parquet")
    (tmp_path / "a.csv").write_text(
        "instruction,input,output\n" + "".join(f'"{r["instruction"]}",,"{r["output"]}"\n' for r in SOURCE_ROWS)
    )
    cfg = data_cfg(format="alpaca")
    for name in ("a.jsonl", "a.json", "a.parquet", "a.csv"):
        source = sources.train_source(replace(cfg, path=str(tmp_path / name)))
        got = [{k: r[k] or "" for k in ("instruction", "input", "output")} for r in sources.rows(source, cfg)]
        assert got == SOURCE_ROWS, name
        streamed = [{k: r[k] or "" for k in ("instruction", "input", "output")} for r in sources.dataset(source, cfg)]
        assert streamed == SOURCE_ROWS, name

    # text files: one document per paragraph (or line); a folder reads its files in name order
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "1.txt").write_text("First paragraph,\nstill first.\n\n\nSecond.\n")
    write_jsonl(corpus / "2.jsonl", [{"text": "Third, from JSONL."}])
    text = data_cfg(format="text", path=str(corpus))
    docs = [r["text"] for r in sources.rows(sources.train_source(text), text)]
    assert docs == ["First paragraph,\nstill first.", "Second.", "Third, from JSONL."]
    streamed = [sources.clean(r, text) for r in sources.dataset(sources.train_source(text), text)]
    assert [r["text"] for r in streamed if r] == docs
    lines = replace(text, text_sample_by="line", path=str(corpus / "1.txt"))
    assert [r["text"] for r in sources.rows(sources.train_source(lines), lines)] == [
        "First paragraph,",
        "still first.",
        "Second.",
    ]

    # a dataset id goes through datasets.load_dataset as is: here a local dataset folder
    hub_dir = tmp_path / "hub_dataset"
    hub_dir.mkdir()
    write_jsonl(hub_dir / "train.jsonl", SOURCE_ROWS)
    hub = data_cfg(format="alpaca", hub_id=str(hub_dir), hub_split="train")
    assert [r["output"] for r in sources.rows(sources.train_source(hub), hub)] == [r["output"] for r in SOURCE_ROWS]
    write_jsonl(hub_dir / "train.jsonl", [*SOURCE_ROWS, {"instruction": "x", "output": 3}])
    with pytest.raises(DataError, match=r"hub:.*\[train\]:7: field 'output': must be a string, got int"):
        list(sources.rows(sources.train_source(hub), hub))


# ------------------------------------------------------------------------------------ bad data
BAD_ROWS = {
    "invalid JSON": ("alpaca", '{"instruction": "a", "output": "b"', "bad.jsonl:3: invalid JSON"),
    "missing field": ("alpaca", {"instruction": "a"}, "bad.jsonl:3: field 'output': missing"),
    "empty text": ("text", {"text": "   "}, "bad.jsonl:3: field 'text': empty"),
    "wrong type": (
        "completion",
        {"prompt": "a", "completion": 42},
        "bad.jsonl:3: field 'completion': must be a string, got int",
    ),
    "unknown role": (
        "chat",
        {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
        "bad.jsonl:3: field 'messages[1].role': unknown role 'bot'",
    ),
    "no assistant turn": (
        "chat",
        {"messages": [{"role": "user", "content": "a"}]},
        "bad.jsonl:3: field 'messages': no assistant turn",
    ),
}
GOOD = {
    "alpaca": {"instruction": "a", "output": "b"},
    "text": {"text": "a"},
    "completion": {"prompt": "a", "completion": "b"},
    "chat": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
}


def refused(tmp_path, capsys, *overrides) -> str:
    code = main([*overrides, f"run.root={tmp_path}/runs", f"data.cache_dir={tmp_path}/cache"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "nothing submitted" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # nothing written
    return err


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_row_is_refused_before_submission_naming_file_row_and_field(kind, tmp_path, capsys):
    fmt, bad, message = BAD_ROWS[kind]
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[fmt], GOOD[fmt], bad] + [GOOD[fmt]] * 10)
    err = refused(tmp_path, capsys, f"data.path={path}", f"data.format={fmt}")
    assert f"data.path: {tmp_path}/{message}" in err, err


def test_empty_or_too_small_datasets_and_unusable_files_are_refused(tmp_path, capsys):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    assert "the dataset is empty" in refused(tmp_path, capsys, f"data.path={empty}", "data.format=alpaca")
    small = write_jsonl(tmp_path / "small.jsonl", [GOOD["alpaca"]] * 7)
    err = refused(tmp_path, capsys, f"data.path={small}", "data.format=alpaca", "data.validation_fraction=0")
    assert "7 training examples, fewer than one global batch (train.global_batch=8)" in err
    err = refused(
        tmp_path,
        capsys,
        f"data.path={small}",
        "data.format=alpaca",
        "train.global_batch=4",
        "train.micro_batch=1",
        "data.validation_fraction=0.5",
    )
    assert "3 training examples (4 of 7 held out by data.validation_fraction), fewer than one global batch" in err
    err = refused(tmp_path, capsys, "data=demo_instruct", "data.validation_fraction=0.99")
    assert "fewer than one global batch" in err
    csv = tmp_path / "chats.csv"
    csv.write_text("messages\nhello\n")
    assert "format=chat needs .jsonl, .json, .parquet" in refused(
        tmp_path, capsys, f"data.path={csv}", "data.format=chat"
    )
    broken_csv = tmp_path / "broken.csv"
    broken_csv.write_text("instruction,output\na,b\na,b,c\n")
    assert "broken.csv:3: 3 cells, the header has 2 columns" in refused(
        tmp_path, capsys, f"data.path={broken_csv}", "data.format=alpaca"
    )
    err = refused(tmp_path, capsys, "data=alpaca_jsonl")
    assert "data.path: no data: data.name=alpaca is not a bundled dataset; set data.path=" in err
    err = refused(tmp_path, capsys, "data.streaming=true", "data.validation_fraction=0.1")
    assert "data.validation_fraction: cannot carve a fraction off a stream" in err


def test_bad_rows_unchecked_before_submission_stop_the_job_before_training(tokenizer, tmp_path):
    """data.precheck=false (files only the compute nodes can read): the job's first step finds them."""
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD["chat"]] * 20 + [{"messages": "hello"}])
    cfg = data_cfg(format="chat", path=str(path), precheck=False, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"bad\.jsonl:21: field 'messages': must be a list"):
        pipeline.build(cfg, train_cfg(), tokenizer, ONE_RANK)
    assert not list((tmp_path / "cache").glob("*/meta.json"))  # no cache of half-read data
    # too few rows after packing: known only once tokenised, refused at the start of the job
    small = write_jsonl(tmp_path / "small.jsonl", [GOOD["chat"]] * 20)
    with pytest.raises(DataError, match=r"\d+ rows of train.seq_len=64 tokens .* fewer than one global batch"):
        pipeline.build(replace(cfg, path=str(small)), train_cfg(global_batch=64), tokenizer, ONE_RANK)


@pytest.mark.slow
def test_bad_rows_found_at_job_start_fail_every_rank_before_training(tmp_path, capsys):
    """Through the CLI on 2 ranks: the job stops at its start with the row named, nothing trained."""
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a good row"}, {"text": 5}] + [{"text": "more text"}] * 10)
    run = tmp_path / "run"
    code = tuneforge(
        *TINY,
        "logger=none",
        f"data.path={path}",
        "data.precheck=false",
        f"run.dir={run}",
        f"data.cache_dir={tmp_path / 'cache'}",
        check=False,
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"DataError: 1 bad row(s) in {path}:\n  {path}:2: field 'text': must be a string, got int" in err, err
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


# ------------------------------------------------------------------------------------ cache, batches
def test_token_cache_is_reused_and_keyed_by_data_tokenizer_and_seq_len(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", CHATS * 20)
    cfg = data_cfg(format="chat", path=str(path), cache_dir=str(tmp_path / "cache"), validation_fraction=0.1)
    first = pipeline.build(cfg, train_cfg(), tokenizer, ONE_RANK)
    again = pipeline.build(cfg, train_cfg(), tokenizer, ONE_RANK)
    assert (first.stats["data_cache"], again.stats["data_cache"]) == ("built", "hit")
    assert first.stats["data_key"] == again.stats["data_key"]
    assert first.stats["validation_examples"] == 4 and first.stats["train_examples"] == 36
    np.testing.assert_array_equal(first.train.rows.input_ids, again.train.rows.input_ids)
    keys = {first.stats["data_key"]}
    for changed_cfg, changed_train in (
        (cfg, train_cfg(seq_len=128)),
        (replace(cfg, train_on_prompt=True), train_cfg()),
        (replace(cfg, packing=False), train_cfg()),
    ):
        keys.add(pipeline.build(changed_cfg, changed_train, tokenizer, ONE_RANK).stats["data_key"])
    other_tok = copy.deepcopy(tokenizer)
    other_tok.add_tokens(["<new>"])
    keys.add(pipeline.build(cfg, train_cfg(), other_tok, ONE_RANK).stats["data_key"])
    write_jsonl(path, CHATS * 21)  # the data changed: size and modification time
    keys.add(pipeline.build(cfg, train_cfg(), tokenizer, ONE_RANK).stats["data_key"])
    assert len(keys) == 6


def test_each_rank_reads_a_disjoint_part_of_the_same_global_batch(tokenizer, tmp_path):
    cfg = data_cfg(name="demo_instruct", format="chat", cache_dir=str(tmp_path / "cache"))
    t = train_cfg(seq_len=256, global_batch=8, micro_batch=2)
    one = pipeline.build(cfg, t, tokenizer, ONE_RANK).train
    ranks = [pipeline.build(cfg, t, tokenizer, DistEnv(r, r, 2, 2, 1, "x", 0, "t", "cpu")).train for r in (0, 1)]
    for step in (0, 7, one.steps_per_epoch + 3):
        parts = [set(b.rank_indices(step).tolist()) for b in ranks]
        assert not parts[0] & parts[1]
        assert parts[0] | parts[1] == set(one.indices(step).tolist())  # the same global batch as on 1 rank
    # streaming: each rank reads its own shard of the stream
    stream_cfg = replace(cfg, streaming=True, stream_window=50)
    seen = []
    for r in (0, 1):
        batches = pipeline.build(stream_cfg, t, tokenizer, DistEnv(r, r, 2, 2, 1, "x", 0, "t", "cpu")).train
        rows = [b["input_ids"][i] for step in range(5) for b in batches.micro_batches(step) for i in range(2)]
        seen.append({tuple(row[row != tokenizer.pad_token_id].tolist()) for row in rows})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


@pytest.fixture
def process_group():
    """A real one-process gloo group: checkpoints and the loop's all-reduces run as in a job."""
    import torch.distributed as dist

    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Recorder:
    """Our own batches, with every micro batch a step hands to the loop written down."""

    def __init__(self, batches, log: dict):
        self.batches, self.log = batches, log

    def micro_batches(self, step):
        out = list(self.batches.micro_batches(step))
        self.log[step] = [{k: v.clone() for k, v in b.items()} for b in out]
        return iter(out)

    def __getattr__(self, name):
        return getattr(self.batches, name)


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streaming"])
def test_resuming_mid_epoch_yields_the_batches_of_the_uninterrupted_run(streaming, tokenizer, tmp_path, process_group):
    from tuneforge.trainers import loop
    from tuneforge.trainers.backends.ddp import DDPEngine
    from tuneforge.trainers.checkpoint import Checkpoints
    from tuneforge.trainers.logging import RunLogger

    path = write_jsonl(
        tmp_path / "chats.jsonl",
        [json.loads(line) for line in bundled_data.bundled("demo_instruct").read_text().splitlines()[:60]],
    )
    cfg = data_cfg(
        format="chat", path=str(path), cache_dir=str(tmp_path / "cache"), streaming=streaming, stream_window=25
    )
    t = train_cfg(
        seq_len=128, global_batch=4, micro_batch=2, max_steps=16, warmup_steps=2, checkpoint_every=0, lr=3e-3, seed=3
    )

    def run(run_dir, log, stop_after=None):
        tc = t
        run_data = pipeline.build(cfg, tc, tokenizer, ONE_RANK)
        engine = DDPEngine(tiny_llama("sdpa", vocab=len(tokenizer)), DDPConfig(), tc, ONE_RANK)
        trainer = loop.Trainer(
            engine,
            Recorder(run_data.train, log),
            tc,
            DebugConfig(stop_after=stop_after),
            ONE_RANK,
            StopFlag(),
            Checkpoints(run_dir, 0, 2),
            RunLogger(LoggerConfig(name="none"), run_dir, {}, enabled=True),
            Throughput(None, None, "none", None),
        )
        return run_data, trainer.train()

    full: dict = {}
    run_data, result = run(tmp_path / "full", full)
    if not streaming:  # the run crosses an epoch boundary, and the resume point is mid-epoch
        assert run_data.train.steps_per_epoch < 16 and 7 % run_data.train.steps_per_epoch
    else:  # it reads several windows and starts the stream over
        assert run_data.train.state["epoch"] >= 1
    resumed: dict = {}
    _, stopped = run(tmp_path / "resumed", resumed, stop_after=7)
    assert stopped["stopped"] == "stop_after" and sorted(resumed) == list(range(7))
    _, result_resumed = run(tmp_path / "resumed", resumed)
    assert sorted(resumed) == list(range(16))
    for step in range(16):
        for a, b in zip(full[step], resumed[step], strict=True):
            for key in a:
                assert torch.equal(a[key], b[key]), (step, key)
    assert result_resumed["loss"] == pytest.approx(result["loss"], abs=1e-6)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step_7" / "rank" / "rank_0.json").read_text())
    assert state["data"]["seed"] == 3 and state["data"]["position"] == 7  # the sampler's seed and position


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_chat_finetune_on_demo_instruct_through_the_cli(tiny_base, tmp_path, capsys):
    """2 ranks finetune the tiny base on the bundled chats: the validation loss is logged and falls;
    a requeued job (the same command again) reuses the token cache."""
    run = tmp_path / "chat"
    common = [
        "model=hf",
        f"model.name_or_path={tiny_base}",
        "method=full",
        "data=demo_instruct",
        *QUICK,
        "train.seq_len=256",
        "train.max_steps=16",
        "train.eval_every=4",
        "train.eval_batches=2",
        "cluster.tasks_per_node=2",
        f"run.dir={run}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    tuneforge(*common, "debug.stop_after=8")
    assert json.loads((run / "summary.json").read_text())["data_cache"] == "built"
    tuneforge(*common)  # resumes at step 8: the cache is found, not rebuilt
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_cache"] == "hit" and summary["train_fill"] > 0.85 and summary["validation_examples"] == 31
    logs = "".join(p.read_text() for p in (run / "slurm").glob("*_0_log.out"))
    assert "data: cache built" in logs and "data: cache hit" in logs
    curve = losses(run)
    assert len(curve) == 16 and curve[-1] < curve[0]
    evals = [m["eval_loss"] for m in metrics(run) if "eval_loss" in m]
    assert len(evals) == 4 and evals[-1] < evals[0]
    tok = __import__("transformers").AutoTokenizer.from_pretrained(run / "final")
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE  # the template it was trained with ships with it


NODE_CPUS_RANK = """
import json, os, sys
import torch.distributed as dist
from transformers import AutoTokenizer
from tuneforge.conf.schema import DataConfig, TrainConfig
from tuneforge.data import pipeline, prepare
from tuneforge.trainers.distributed import DistEnv

rank, port, corpus, tokenizer, cache, log = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:]
os.sched_setaffinity(0, {rank})  # as Slurm binds each task of a node to its own share
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
encode_chunk = prepare._encode_chunk

def logged(encoder, recs):  # in the workers rank 0 forks
    with open(log, "a") as f:
        f.write(json.dumps([os.getpid(), sorted(os.sched_getaffinity(0))]) + "\\n")
    return encode_chunk(encoder, recs)

prepare._encode_chunk = logged
cfg = DataConfig(path=corpus, cache_dir=cache, validation_fraction=0)
env = DistEnv(rank, rank, 2, 2, 1, "127.0.0.1", port, "t", "cpu")
data = pipeline.build(cfg, TrainConfig(seq_len=64, global_batch=4, micro_batch=2), AutoTokenizer.from_pretrained(tokenizer), env)
print(json.dumps({"rank": rank, "own": sorted(os.sched_getaffinity(0)), "cache": data.stats["data_cache"]}))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_the_cache_is_tokenised_on_the_cpus_of_every_rank_of_the_node(tokenizer, tmp_path):
    """Two ranks of a node, each bound to one CPU (as Slurm binds tasks): rank 0 builds the cache with
    a worker per CPU of both (the other rank offers its CPU while it waits), not only on its own."""
    import subprocess
    import sys

    tokenizer.save_pretrained(tmp_path / "tokenizer")
    docs = [row["text"] for _, row in records.read_rows(bundled_data.bundled("demo_corpus"), data_cfg())]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{i}: {docs[i % len(docs)]}" for i in range(3 * prepare.ENCODE_CHUNK)))
    port, log = free_port(), tmp_path / "workers.jsonl"
    args = [str(corpus), str(tmp_path / "tokenizer"), str(tmp_path / "cache"), str(log)]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", NODE_CPUS_RANK, str(rank), str(port), *args], stdout=subprocess.PIPE, text=True
        )
        for rank in (0, 1)
    ]
    outs = [json.loads(r.communicate(timeout=600)[0].strip().splitlines()[-1]) for r in ranks]
    assert [r.returncode for r in ranks] == [0, 0]
    assert [(o["own"], o["cache"]) for o in outs] == [([0], "built"), ([1], "built")]
    workers = {pid: tuple(cpus) for pid, cpus in map(json.loads, log.read_text().splitlines())}
    assert len(workers) == 2 and set(workers.values()) == {(0, 1)}, workers


@pytest.mark.slow
def test_a_job_tokenising_on_forked_workers_trains_on_the_same_rows(tmp_path):
    """Rank 0 of a 2-rank job (its process group up) forks data.prepare_workers processes to build a cache
    of several chunks: the cache and the losses are those of a one-process build."""
    docs = [row["text"] for _, row in records.read_rows(bundled_data.bundled("demo_corpus"), data_cfg())]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{i}: {docs[i % len(docs)]}" for i in range(2 * prepare.ENCODE_CHUNK + 100)))
    curves, caches = {}, {}
    for workers in (1, 2):
        run = tmp_path / f"workers{workers}"
        tuneforge(
            *TINY,
            *QUICK,
            "train.max_steps=4",
            "data=text_files",
            f"data.path={corpus}",
            f"data.prepare_workers={workers}",
            f"data.cache_dir={tmp_path / f'cache{workers}'}",
            "cluster.tasks_per_node=2",
            f"run.dir={run}",
        )
        summary = json.loads((run / "summary.json").read_text())
        assert summary["data_cache"] == "built"
        caches[workers] = Path(summary["data_cache_dir"])
        curves[workers] = losses(run)
    assert caches[1].name == caches[2].name  # the worker count is not part of the key
    for name in packing.ROW_FIELDS:
        np.testing.assert_array_equal(
            np.load(caches[1] / "train" / f"{name}.npy"), np.load(caches[2] / "train" / f"{name}.npy")
        )
    assert curves[1] == curves[2] and len(curves[1]) == 4
