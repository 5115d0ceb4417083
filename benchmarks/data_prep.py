"""Data preparation at corpus scale: tuneforge's token cache against datasets.map + concatenate-and-chunk.

    python benchmarks/data_prep.py                      # a 20 MB text corpus and a 20 MB JSONL corpus
    python benchmarks/data_prep.py --sizes 20,100,300   # larger corpora (minutes each; the stream up to 100 MB)
    python benchmarks/data_prep.py --quick              # 1 MB: CI runs it so it cannot rot

The corpora are the bundled documents (demo_corpus and general_corpus), shuffled and numbered, written
end to end until the size is reached: a .txt file (one document per paragraph) and a .jsonl file
({"text": ...} per line). Both sides use the same BPE tokenizer (8000 tokens, trained on the bundled
corpus, a fast tokenizer), seq 512, each in a fresh process with a cold cache:

  tuneforge  `pipeline.build` (data.path=<corpus>, data.validation_fraction=0): read and check, tokenise,
             pack into rows (documents end to end, position ids restarting) and write the token cache,
             as rank 0 does at a job's start
  datasets   `load_dataset("text", sample_by="paragraph")` or `load_dataset("json")`, then
             `.map(tokenize, batched=True, num_proc=<cores>)` (EOS after each document) and
             `.map(concatenate and chunk into 512-token rows, batched=True, num_proc=<cores>)`: the
             recipe of transformers' run_clm.py, with a fresh HF_DATASETS_CACHE
  stream     data.streaming=true: the reader a streaming run trains from (windows of data.stream_window
             rows read, checked, tokenised and packed as the trainer asks for them, no cache), pulled
             step by step (8 rows of 512) until the corpus was read once; its tokens/s is what a
             trainer consuming fewer never waits on

Figures: MB of corpus per second (wall clock, from the start of the work to the rows written, imports
left out) and the peak memory of the process and its workers together: RSS (sampled every 20 ms;
pages forked workers share with their parent count once per process) and PSS (every 100 ms; shared
pages divided among the processes that share them: the memory the machine gave), with the process's
RSS before the work began.

The last line printed is one JSON object: per size and format, each side's MB/s, peak RSS and PSS and rows
(the stream's tokens/s), and the ratio of MB/s (tuneforge / datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ, VOCAB = 512, 8000
STREAM_BATCH = 8  # rows per step the streaming reader hands the trainer (one rank)


def main() -> int:
    args = parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    sizes = [1] if args.quick else [int(s) for s in args.sizes.split(",")]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tuneforge-data-prep-"))
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    tokenizer = make_tokenizer(work)
    say(f"load {load()}; {cores} cores; tokenizer {tokenizer}; work dir {work}")
    result: dict = {"cores": cores, "seq": SEQ, "vocab": VOCAB, "load_before": load(), "sizes": {}}
    for mb in sizes:
        for fmt in ("txt", "jsonl"):
            corpus = make_corpus(work, mb, fmt)
            row = {}
            for side in ("tuneforge", "datasets", "stream") if mb <= args.stream_up_to else ("tuneforge", "datasets"):
                spec = {"side": side, "corpus": str(corpus), "tokenizer": str(tokenizer), "cores": cores}
                spec["cache"] = tempfile.mkdtemp(prefix=f"cache-{side}-", dir=work)
                row[side] = measure(spec)
                row[side]["mb_per_s"] = round(corpus.stat().st_size / 1e6 / row[side]["seconds"], 2)
                say(
                    f"{mb} MB {fmt} {side}: {row[side]['seconds']:.1f} s, {row[side]['mb_per_s']:.2f} MB/s, "
                    f"peak RSS {row[side]['peak_rss_mb']:.0f} MB (before {row[side]['rss_before_mb']:.0f}), "
                    f"peak PSS {row[side]['peak_pss_mb']:.0f} MB, "
                    f"{row[side]['rows']} rows; load {load()}"
                )
            row["ratio_mb_per_s"] = round(row["tuneforge"]["mb_per_s"] / row["datasets"]["mb_per_s"], 3)
            result["sizes"][f"{mb}MB_{fmt}"] = row
    result["load_after"] = load()
    print(
        f"\n{'corpus':>12}  {'tuneforge MB/s':>14}  {'datasets MB/s':>13}  {'ratio':>5}  {'peak RSS MB tf / ds':>20}"
        f"  {'peak PSS MB tf / ds':>20}"
        f"  {'stream MB/s':>11}  {'stream tok/s':>12}"
    )
    for name, row in result["sizes"].items():
        tf, ds, st = row["tuneforge"], row["datasets"], row.get("stream", {"mb_per_s": float("nan"), "tokens_per_s": 0})
        print(
            f"{name:>12}  {tf['mb_per_s']:>14.2f}  {ds['mb_per_s']:>13.2f}  {row['ratio_mb_per_s']:>5.2f}  "
            f"{tf['peak_rss_mb']:>9.0f} / {ds['peak_rss_mb']:<9.0f}  {tf['peak_pss_mb']:>9.0f} / {ds['peak_pss_mb']:<9.0f}"
            f"  {st['mb_per_s']:>11.2f}  {st['tokens_per_s']:>12,}"
        )
    print(json.dumps(result), flush=True)
    return 0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a 1 MB corpus (CI)")
    p.add_argument("--sizes", default="20", help="corpus sizes in MB, comma-separated (default 20)")
    p.add_argument("--stream-up-to", type=int, default=100, help="measure the streaming reader up to this size (MB)")
    p.add_argument("--work-dir", help="where corpora, caches and the tokenizer go (default: a new temp dir)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def bundled_docs() -> list:
    from tuneforge.data import bundled

    docs = []
    for name in ("demo_corpus", "general_corpus"):
        docs += [p.strip() for p in bundled(name).read_text().split("\n\n") if p.strip()]
    return docs


def make_tokenizer(work: Path) -> Path:
    out = work / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        from tuneforge.trainers.model import train_tokenizer

        train_tokenizer(bundled_docs(), VOCAB, min_frequency=2).save_pretrained(out)
    return out


def make_corpus(work: Path, mb: int, fmt: str) -> Path:
    path = work / f"corpus_{mb}MB.{fmt}"
    if path.is_file():
        return path
    docs, rng, target, size, i = bundled_docs(), random.Random(0), mb * 10**6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            rng.shuffle(docs)
            for doc in docs:
                text = f"Document {i}. {doc}"
                line = json.dumps({"text": text}) + "\n" if fmt == "jsonl" else text + "\n\n"
                f.write(line)
                size += len(line.encode())
                i += 1
                if size >= target:
                    break
    return path


def measure(spec: dict) -> dict:
    """Run one side in a fresh process; its figures, and the peak RSS of it and its workers."""
    import psutil

    env = {**os.environ, "HF_DATASETS_CACHE": spec["cache"], "TOKENIZERS_PARALLELISM": "true"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = peak_pss = 0
    parent, ticks = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            family = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in family))
            if ticks % 5 == 0:  # (reading smaps costs more)
                peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in family))
        except psutil.Error:
            pass
        ticks += 1
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{spec['side']} failed ({proc.returncode}):\n{err[-3000:]}")
    figures = json.loads(out.strip().splitlines()[-1])
    return {**figures, "peak_rss_mb": round(peak / 2**20, 1), "peak_pss_mb": round(peak_pss / 2**20, 1)}


def worker(spec: dict) -> int:
    import psutil
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    before = psutil.Process().memory_info().rss / 2**20
    extra = {}
    if spec["side"] in ("tuneforge", "stream"):
        from tuneforge.data import pipeline
        from tuneforge.launch.compose import compose
        from tuneforge.trainers.distributed import DistEnv

        cfg = compose(
            [
                "model=hf",
                f"model.name_or_path={spec['tokenizer']}",
                f"data.path={spec['corpus']}",
                "data.format=text",
                "data.validation_fraction=0",
                f"data.cache_dir={spec['cache']}",
                f"data.streaming={spec['side'] == 'stream'}",
                f"train.seq_len={SEQ}",
                f"train.global_batch={STREAM_BATCH}",
                f"train.micro_batch={STREAM_BATCH}",
            ]
        )
        one_rank = DistEnv(0, 0, 1, 1, 1, "127.0.0.1", 0, "benchmark", "cpu")
        start = time.perf_counter()
        data = pipeline.build(cfg.data, cfg.train, tokenizer, one_rank)
        if spec["side"] == "tuneforge":
            rows = data.stats["train_rows"]
        else:  # the reader as the trainer pulls from it, step by step, until the corpus was read once
            rows = tokens = 0
            while data.train.state["epoch"] == 0:
                for batch in data.train.micro_batches(data.train.state["position"]):
                    rows += len(batch["input_ids"])
                    tokens += int((batch["labels"] != -100).sum())
            extra["tokens_per_s"] = round(tokens / (time.perf_counter() - start))
        seconds = time.perf_counter() - start
    else:
        import datasets

        datasets.disable_progress_bars()
        eos, cores = tokenizer.eos_token_id, spec["cores"]
        start = time.perf_counter()
        if spec["corpus"].endswith(".jsonl"):
            ds = datasets.load_dataset("json", data_files=spec["corpus"], split="train")
        else:
            ds = datasets.load_dataset("text", data_files=spec["corpus"], sample_by="paragraph", split="train")

        def tokenize(batch):
            ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            return {"input_ids": [x + [eos] for x in ids]}

        def chunk(batch):
            flat = [i for x in batch["input_ids"] for i in x]
            n = len(flat) // SEQ * SEQ
            return {"input_ids": [flat[i : i + SEQ] for i in range(0, n, SEQ)]}

        ds = ds.map(tokenize, batched=True, num_proc=cores, remove_columns=ds.column_names)
        ds = ds.map(chunk, batched=True, num_proc=cores)
        seconds = time.perf_counter() - start
        rows = len(ds)
    print(json.dumps({"seconds": round(seconds, 3), "rows": rows, "rss_before_mb": round(before, 1), **extra}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
