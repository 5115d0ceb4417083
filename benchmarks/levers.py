"""What each speed lever of tuneforge's trainer is worth, measured in ONE process, step by step.

    python benchmarks/levers.py                       # every variant below, 45M Llama, seq 512, batch 4
    python benchmarks/levers.py --variants eager,fused,compiled --steps 8

Each variant is a full training step (forward, token-summed loss, backward, clip, AdamW) built from
tuneforge's own pieces (optim.make_optimizer, compile.compile_blocks, compile.loss_function). The
variants' steps are interleaved (A B C A B C ...), so load from neighbours on a shared machine hits
all of them alike; the report is the median over steps of each variant's speed relative to the
first variant at the same position, on the wall clock and on a CPU-time basis (tokens per CPU second
of the process x its threads: a shared machine's load inflates it far less). Not a test.

Variants (each adds to the one before unless noted):
  amp        fp32 weights + bf16 autocast, foreach AdamW (what HF Trainer's bf16=True does)
  eager      bf16 weights, foreach AdamW, eager model and loss
  fused      + fused AdamW (optim.make_optimizer)
  blocks     + compiled transformer blocks
  compiled   + compiled loss (= train.compile=true)
  clip       + optim.clip_grad_norm instead of torch.nn.utils.clip_grad_norm_
  ddp1       clip, wrapped in DistributedDataParallel with one rank (what the DDP backend did at world size 1)
  mathattn   clip, with transformers' "eager" attention (matmuls + softmax, compiled) instead of sdpa
  ampmath    amp, with transformers' "eager" attention (is it a better baseline than amp's sdpa?)

The allocator lever (trainers/allocator.py) is process-wide, so it is not a variant: compare a run
with --malloc against one without (separate processes; alternate them a few times).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALL = ("amp", "eager", "fused", "blocks", "compiled", "clip", "ddp1", "mathattn", "ampmath")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default=",".join(ALL))
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--profile", action="store_true", help="after timing, print each variant's top ops (torch.profiler)")
    p.add_argument("--malloc", action="store_true", help="keep freed memory in the process (trainers/allocator.py)")
    args = p.parse_args()
    if args.malloc:
        from tuneforge.trainers.allocator import keep_freed_memory

        print(f"allocator: keep freed memory: {keep_freed_memory()}", file=sys.stderr)

    import torch
    from transformers import LlamaConfig

    variants = args.variants.split(",")
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
        use_cache=False,
    )
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    steps = {}
    for name in variants:
        t0 = time.perf_counter()
        steps[name] = build_step(name, config)
        for _ in range(2):
            steps[name](ids)
        print(f"{name}: built and warmed up in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    speed = {name: [] for name in variants}  # tokens/s on the wall clock
    cpu_speed = {name: [] for name in variants}  # tokens per CPU second x threads (load inflates it less)
    threads = torch.get_num_threads()
    for i in range(args.steps):
        for name in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name](ids)
            speed[name].append(ids.numel() / (time.perf_counter() - t0))
            cpu_speed[name].append(ids.numel() / (time.process_time() - c0) * threads)
        print(
            f"step {i + 1}: " + ", ".join(f"{n} {speed[n][-1]:.0f} ({cpu_speed[n][-1]:.0f})" for n in variants),
            file=sys.stderr,
            flush=True,
        )
    base = variants[0]
    print(
        f"{'variant':>10}  {'tok/s':>7}  {'vs ' + base:>8}  {'vs prev':>7}  |  {'CPU-time basis:':>15}  "
        f"{'tok/s':>7}  {'vs ' + base:>8}  {'vs prev':>7}"
    )
    for k, name in enumerate(variants):
        prev = variants[max(0, k - 1)]
        cells = []
        for table in (speed, cpu_speed):
            cells.append(
                f"{statistics.median(table[name]):>7.0f}  "
                f"{statistics.median(a / b for a, b in zip(table[name], table[base])):>8.2f}  "
                f"{statistics.median(a / b for a, b in zip(table[name], table[prev])):>7.2f}"
            )
        print(f"{name:>10}  {cells[0]}  |  {'':>15}  {cells[1]}")
    if args.profile:
        from torch.profiler import profile

        for name in variants:
            with profile() as prof:
                steps[name](ids)
            print(f"\n== {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    return 0


def build_step(name: str, config):
    """One training step of variant `name`, as a function of the input ids."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.trainers.compile import compile_blocks, loss_function
    from tuneforge.trainers.optim import clip_grad_norm, make_optimizer

    amp = name in ("amp", "ampmath")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        copy.deepcopy(config),
        dtype=torch.float32 if amp else torch.bfloat16,
        attn_implementation="eager" if name in ("mathattn", "ampmath") else "sdpa",
    )
    train = argparse.Namespace(lr=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.0)
    level = {"mathattn": ALL.index("clip"), "ampmath": 0}.get(name, ALL.index(name))
    if level >= ALL.index("fused"):
        optimizer = make_optimizer(model, train)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=True)
    if level >= ALL.index("blocks"):
        compile_blocks(model)
    loss_fn = loss_function(compiled=level >= ALL.index("compiled"))
    forward = model
    if name == "ddp1":
        forward = _ddp_one_rank(model)

    def step(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(forward(input_ids=ids).logits, ids)
        (loss / ids.numel()).backward()
        if level >= ALL.index("clip"):
            clip_grad_norm(list(model.parameters()), 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _ddp_one_rank(model):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29581")
        dist.init_process_group("gloo", rank=0, world_size=1)
    return DistributedDataParallel(model)


if __name__ == "__main__":
    sys.exit(main())
