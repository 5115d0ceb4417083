"""Packing vs padding on the bundled instruction data: row fill and effective training tokens/s.

    python benchmarks/packing.py [--seq-len 256] [--micro-batch 4] [--rounds 5] [--steps 8] [--threads 2]

The conversations of data=demo_instruct are rendered with the default chat template, tokenised with
the tokenizer the default run trains on the bundled corpus, and arranged two ways:
  packed: examples packed into rows of seq_len (position ids restart per example), as data.packing=true;
  padded: one example per row, each micro batch padded to its longest row, as data.packing=false.
Fill = real tokens / row tokens. Effective tokens/s = real tokens per second of forward+backward on
the default tiny Llama (fp32, CPU), over the same examples in both modes. The two modes alternate
for `rounds` rounds and the medians are reported (timings on a shared machine vary a lot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="micro batches timed per mode and round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge import data as bundled_data
    from tuneforge.conf.schema import DataConfig
    from tuneforge.data import packing, records
    from tuneforge.data.batches import Collate
    from tuneforge.data.tokenize import Encoder
    from tuneforge.trainers.model import train_tokenizer
    from tuneforge.trainers.optim import token_loss_sum

    corpus = DataConfig(name="demo_corpus")
    texts = [row["text"] for _, row in records.read_rows(bundled_data.bundled("demo_corpus"), corpus)]
    tokenizer = train_tokenizer(texts, 1024, 2)
    chat = DataConfig(name="demo_instruct", format="chat")
    rows = [row for _, row in records.read_rows(bundled_data.bundled("demo_instruct"), chat)]
    examples = Encoder(chat, tokenizer, args.seq_len).encode(rows)
    pad_id = tokenizer.pad_token_id
    arranged = {
        "packed": (packing.pack(examples, args.seq_len, pad_id, split_long=False), Collate(packed=True)),
        "padded": (packing.pad(examples, args.seq_len, pad_id, split_long=False), Collate(packed=False)),
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
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.train()

    def batches(mode):
        rows_, collate = arranged[mode]
        order = torch.randperm(len(rows_), generator=torch.Generator().manual_seed(0)).numpy()
        for start in range(0, len(order) - args.micro_batch + 1, args.micro_batch):
            picked = rows_.take(order[start : start + args.micro_batch])
            yield collate(picked), int(picked.lengths.sum())

    def timed(mode) -> float:
        real, elapsed = 0, 0.0
        for i, (batch, real_tokens) in enumerate(batches(mode)):
            if i == args.steps:
                break
            labels = batch.pop("labels")
            start = time.perf_counter()
            token_loss_sum(model(**batch).logits, labels).backward()
            elapsed += time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            real += real_tokens
        return real / elapsed

    def batch_fill(mode) -> float:  # real tokens / tokens the model computes, over all micro batches
        real = total = 0
        for batch, real_tokens in batches(mode):
            real, total = real + real_tokens, total + batch["input_ids"].numel()
        return real / total

    timed("packed"), timed("padded")  # warm up
    speeds = {"packed": [], "padded": []}
    for _ in range(args.rounds):
        for mode in speeds:
            speeds[mode].append(timed(mode))
    result = {
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "examples": len(examples),
        **{f"{mode}_rows": len(arranged[mode][0]) for mode in arranged},
        **{f"{mode}_fill": round(arranged[mode][0].fill, 4) for mode in arranged},
        "padded_to_longest_fill": round(batch_fill("padded"), 4),  # padded rows trimmed to each micro batch's longest
        **{f"{mode}_effective_tokens_per_s": round(statistics.median(speeds[mode])) for mode in speeds},
    }
    result["speedup"] = round(result["packed_effective_tokens_per_s"] / result["padded_effective_tokens_per_s"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
