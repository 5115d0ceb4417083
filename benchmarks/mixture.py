"""Weighted mixtures (data.sources): the realised token share of each source against its weight over a
long run, cached and streaming, and what mixing costs in tokens/s against a single source.

    python benchmarks/mixture.py [--steps 5000] [--stream-steps 1000] [--rounds 5] [--train-steps 16] [--quick]

Sources: the bundled cricket corpus (text), the bundled general corpus (text) and the bundled cricket
conversations (chat), tokenised with the tokenizer the default run trains (BPE, 1024), seq_len 64,
global batch 8, built by data/pipeline.py as a run builds them (a temporary cache).

- shares: the target tokens each source contributed over `--steps` global batches (cached) and
  `--stream-steps` (streaming), against weight / sum of weights, for three mixtures; also the worst
  deviation over the first 10 and 100 steps (the choice keeps it within one row at every point).
- sampler: target tokens/s of producing the batches alone (no model), single source vs mixtures.
- training: tokens/s (tokens the model reads) of whole optimizer steps (batches, forward, backward,
  AdamW) of the default tiny Llama on CPU, the cricket corpus alone vs cricket 75% + general text 25%
  (both text: full rows, the same compute per row; a mixture with chat rows would read as slower in
  target tokens only because its rows hold fewer targets), steps of the two interleaved (A B B A A B ...)
  for `--rounds` rounds so that a burst of load on a shared machine hits both; medians, and the median
  time the sampler takes per step.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

MIXTURES = {
    "cricket75_general25": (("demo_corpus", 0.75), ("general_corpus", 0.25)),
    "cricket95_general5": (("demo_corpus", 0.95), ("general_corpus", 0.05)),
    "three_sources": (("demo_corpus", 0.7), ("general_corpus", 0.2), ("demo_instruct", 0.1)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000, help="global batches read per mixture, cached")
    parser.add_argument("--stream-steps", type=int, default=1000, help="global batches read per mixture, streaming")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=50, help="optimizer steps per source setting and round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--quick", action="store_true", help="short everything (CI: the script runs)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.stream_steps, args.rounds, args.train_steps = 200, 50, 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)

    from tuneforge import data as bundled_data
    from tuneforge.conf.schema import DataConfig, SourceConfig, TrainConfig
    from tuneforge.data import pipeline, records
    from tuneforge.trainers.distributed import DistEnv
    from tuneforge.trainers.model import train_tokenizer

    one_rank = DistEnv(0, 0, 1, 1, 1, "localhost", 0, "bench", "cpu")
    texts = [row["text"] for _, row in records.read_rows(bundled_data.bundled("demo_corpus"), DataConfig())]
    tokenizer = train_tokenizer(texts, 1024, 2)
    tokenizer.pad_token = tokenizer.eos_token
    cache = tempfile.mkdtemp(prefix="tuneforge-bench-mixture-")
    t = TrainConfig(seq_len=64, global_batch=8, micro_batch=4, max_steps=args.steps)
    formats = {"demo_instruct": "chat"}

    def data_cfg(mixture, streaming=False) -> DataConfig:
        sources = [SourceConfig(name=n, weight=w, format=formats.get(n)) for n, w in mixture]
        return DataConfig(name="bench", cache_dir=cache, streaming=streaming, stream_window=500, sources=sources)

    def single_cfg(streaming=False) -> DataConfig:
        return DataConfig(name="demo_corpus", cache_dir=cache, streaming=streaming, stream_window=500)

    def read(batches, steps):
        """Target tokens per source over `steps` batches, the worst share error after 10 and 100, tokens/s."""
        names = getattr(batches, "source_names", ("demo_corpus",))
        tokens, worst, counted = np.zeros(len(names)), {}, 0
        start = time.perf_counter()
        for step in range(steps):
            for batch in batches.micro_batches(step):
                counted += int((batch["labels"][:, 1:] != -100).sum())
            tokens += getattr(batches, "source_tokens", [0])
            if step + 1 in (10, 100):
                worst[step + 1] = tokens / max(tokens.sum(), 1)
        return tokens, worst, counted / (time.perf_counter() - start)

    result: dict = {
        "steps": args.steps,
        "stream_steps": args.stream_steps,
        "global_batch": t.global_batch,
        "seq_len": 64,
    }
    shares, sampler = {}, {}
    for mode, steps in (("cached", args.steps), ("streaming", args.stream_steps)):
        streaming = mode == "streaming"
        single = pipeline.build(single_cfg(streaming), replace(t, max_steps=steps), tokenizer, one_rank).train
        sampler[f"single_{mode}"] = round(read(single, steps)[2])
        for label, mixture in MIXTURES.items():
            weights = np.array([w for _, w in mixture]) / sum(w for _, w in mixture)
            built = pipeline.build(data_cfg(mixture, streaming), replace(t, max_steps=steps), tokenizer, one_rank)
            tokens, early, speed = read(built.train, steps)
            realised = tokens / tokens.sum()
            shares[f"{label}_{mode}"] = {
                "weights": [round(float(w), 4) for w in weights],
                "realised": [round(float(s), 5) for s in realised],
                "max_relative_error": round(float(np.max(np.abs(realised / weights - 1))), 5),
                **{
                    f"max_relative_error_after_{n}": round(float(np.max(np.abs(s / weights - 1))), 4)
                    for n, s in early.items()
                },
                "rows": built.stats.get("train_rows"),
            }
            sampler[f"{label}_{mode}"] = round(speed)
            print(
                f"{mode:9s} {label:20s} weights {shares[f'{label}_{mode}']['weights']} realised "
                f"{shares[f'{label}_{mode}']['realised']} (max rel. error {shares[f'{label}_{mode}']['max_relative_error']:.4%})"
                f"; sampler {speed:,.0f} target tok/s",
                flush=True,
            )
        print(f"{mode:9s} single source        sampler {sampler[f'single_{mode}']:,} target tok/s", flush=True)
    result["shares"], result["sampler_target_tokens_per_s"] = shares, sampler
    result["max_relative_error"] = max(s["max_relative_error"] for s in shares.values())

    # whole training steps: one text source vs a mixture of two, interleaved
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.trainers.optim import counted_tokens, token_loss_sum

    total = args.rounds * args.train_steps + 2
    samplers = {
        "single": pipeline.build(single_cfg(), replace(t, max_steps=total), tokenizer, one_rank).train,
        "mixture": pipeline.build(
            data_cfg(MIXTURES["cricket75_general25"]), replace(t, max_steps=total), tokenizer, one_rank
        ).train,
    }
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        use_cache=False,
    )
    models = {}
    for name in samplers:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))

    def step(name: str, i: int):
        """(tokens read per second, seconds the sampler took) of optimizer step i."""
        model, optim = models[name]
        start = time.perf_counter()
        batches = list(samplers[name].micro_batches(i))
        sampled = time.perf_counter() - start
        n = sum(counted_tokens(b["labels"]) for b in batches)
        read = sum(int(b["input_ids"].numel()) for b in batches)
        for batch in batches:
            labels = batch.pop("labels")
            (token_loss_sum(model(**batch).logits, labels) / n).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return read / (time.perf_counter() - start), sampled

    for i in range(2):  # warm up
        step("single", i), step("mixture", i)
    speeds: dict = {"single": [], "mixture": []}
    sampling: dict = {"single": [], "mixture": []}
    i = 2
    for _ in range(args.rounds):
        for _ in range(args.train_steps):
            for name in list(speeds) if i % 2 else reversed(list(speeds)):  # A B, B A: no order effect
                speed, sampled = step(name, i)
                speeds[name].append(speed)
                sampling[name].append(sampled)
            i += 1
    train = {name: round(statistics.median(v)) for name, v in speeds.items()}
    result["train_tokens_per_s"] = train
    result["sampler_ms_per_step"] = {name: round(1000 * statistics.median(v), 3) for name, v in sampling.items()}
    result["mixing_cost"] = round(1 - train["mixture"] / train["single"], 4)
    print(
        f"training steps (tiny Llama, CPU, {t.global_batch} x {t.seq_len} tokens): cricket alone {train['single']:,} "
        f"tok/s, cricket 75% + general 25% {train['mixture']:,} tok/s ({result['mixing_cost']:+.1%} cost); sampler "
        f"{result['sampler_ms_per_step']['single']} vs {result['sampler_ms_per_step']['mixture']} ms per step",
        flush=True,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
