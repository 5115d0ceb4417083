"""Host memory of every rank while a model is loaded, wrapped by its backend and trained for one step.

    PYTHONPATH=. python benchmarks/load_memory.py make --out /tmp/llama05b          # a ~0.5B Llama, 2 GB fp32
    PYTHONPATH=. python benchmarks/load_memory.py run --model /tmp/llama05b --world 4 \\
        --case fsdp:full:sharded fsdp:lora:sharded zero3:full:sharded zero3:lora:sharded ddp:lora:old

A case is backend:method:path. backend: ddp | fsdp | zero3; method: full | lora | dora | ia3 | loha | lokr |
qlora; path: "sharded" (trainers/sharded/: the model is built sharded, each rank reads its own bytes),
"old" (every rank loads the whole model, then the backend shards it: tuneforge before sharded loading),
"hf" (zero3 only: transformers' own ZeRO-3 loading, HfDeepSpeedConfig alive before from_pretrained).
Append ":load" to stop after loading, ":prep" after the backend has wrapped the model (a case whose step
would not fit this machine).

Each case starts `--world` gloo processes on this machine. Every rank samples its RSS every 0.1 s
(trainers/sharded/memory.py) from before `import torch` on; the baseline is its RSS once torch and
transformers are imported. Reported per rank, as growth over that baseline: the peak while loading
(model built, filled, sharded), while the backend wraps it (optimizer made), and through the first
training step; the bytes it read from the checkpoint; the seconds from process start to the end of the
first step. The goal for loading: growth <= 1.25 x (model bytes / world size) + one transformer block.
Model bytes are those of the model as loaded (fp32 here, as FSDP2 and DeepSpeed keep it). 1 thread per
rank; `--malloc` picks glibc's behaviour (default: the trainer's, trainers/allocator.py). On CPU the
step's peak depends on it more than on anything else: FSDP2 and DeepSpeed allocate and free their
gathered blocks every block; when glibc keeps freed blocks in its heap (the trainer's setting, or its
default dynamic threshold), they are not reused well and RSS climbs through the forward (measured on
the 0.5B Llama, 2 ranks, frozen base: +1.5 GiB with glibc's default, +0.5 GiB with a fixed 1 MiB mmap
threshold, the root's 0.37 GiB of gathered weights included).

Prints a table, then one JSON line with every figure. Memory only: timings on a shared 2-core machine are
not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30


# ------------------------------------------------------------------------------------------ the model
def make_model(
    out: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, max_shard_size: str
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "bytes_fp32": params * 4, "dir": out}


def model_figures(model_dir: str) -> dict:
    """Parameters, fp32 bytes and the bytes of one block, from the config alone."""
    import torch
    from transformers import AutoConfig

    from tuneforge.trainers.sharded.meta import build_meta_model

    model = build_meta_model(AutoConfig.from_pretrained(model_dir), torch.float32)
    params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    return {"params": params, "model_bytes": params * 4, "block_bytes": block * 4}


# ----------------------------------------------------------------------------------------- one rank
def worker(args) -> None:
    from tuneforge.trainers.sharded.memory import RssSampler

    def over_cap(rss):  # this rank would take the machine down: record where, and stop it
        last = list(sampler.marks)[-1]
        Path(args.result).write_text(
            json.dumps(
                {
                    "case": args.case,
                    "error": f"RSS {rss / GiB:.2f} GiB over the cap {args.rss_cap_gib} GiB after '{last}'",
                }
            )
        )
        os._exit(75)

    sampler = RssSampler(cap_bytes=int(args.rss_cap_gib * GiB), on_cap=over_cap).start()
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    sampler.mark("imported")
    from tuneforge.conf import backends, methods, schema
    from tuneforge.trainers import backends as engines
    from tuneforge.trainers import model as model_mod
    from tuneforge.trainers.allocator import keep_freed_memory
    from tuneforge.trainers.distributed import DistEnv
    from tuneforge.trainers.methods import apply_method
    from tuneforge.trainers.sharded import glue

    if args.malloc == "trainer":
        keep_freed_memory()
    elif args.malloc == "mmap1m":  # a fixed 1 MiB mmap threshold: every big buffer is mapped and unmapped
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (also stops glibc's dynamic raising)
    torch.set_num_threads(1)
    backend, method, path = args.case.split(":")[:3]
    load_only = args.case.endswith(":load")
    prepare_only = args.case.endswith(":prep")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    # the libraries the case needs, and the process group: a second baseline ("ready")
    import transformers.models.llama.modeling_llama  # noqa: F401

    if method != "full":
        import peft  # noqa: F401
    if backend == "zero3":
        from tuneforge.trainers.backends.deepspeed import import_deepspeed

        import_deepspeed("cpu").init_distributed(dist_init_required=False)
    sampler.mark("ready")
    env = DistEnv(rank, rank, world, 1, "127.0.0.1", int(os.environ["MASTER_PORT"]), "bench", "cpu")
    model_cfg = schema.ModelConfig(kind="hf", name_or_path=args.model, attn_implementation="sdpa")
    method_cfg = methods.METHODS[method].schema()
    if backend == "ddp":
        backend_cfg = backends.DDPConfig()
    elif backend == "fsdp":
        backend_cfg = backends.FSDPConfig()
    else:  # buckets of 50M elements: DeepSpeed's 500M default would allocate 2 GB per rank on its own
        backend_cfg = backends.DeepSpeedConfig(
            name="zero3", stage=3, reduce_bucket_size=50_000_000, prefetch_bucket_size=50_000_000
        )
    train_cfg = schema.TrainConfig(
        global_batch=world, micro_batch=1, seq_len=args.seq_len, dtype="fp32", max_steps=1, warmup_steps=0
    )
    peft = methods.is_peft(method_cfg.name)
    dtype = backends.model_dtype(backend_cfg, "fp32", peft=peft)
    stats = None
    keep = None
    if path == "sharded" and glue.sharded_backend(backend_cfg, method_cfg):
        net, hooks, stats, _ = glue.load_sharded(model_cfg, method_cfg, backend_cfg, train_cfg, env, None, dtype, 0)
    else:
        if path == "hf":  # transformers' ZeRO-3 loading: zero.Init inside from_pretrained
            from tuneforge.conf import ds_config
            from tuneforge.trainers.backends.deepspeed import import_deepspeed

            import_deepspeed("cpu")
            from transformers.integrations.deepspeed import HfDeepSpeedConfig

            keep = HfDeepSpeedConfig(ds_config.merged(backend_cfg, train_cfg, world))  # noqa: F841 (kept alive)
        net = model_mod.load_model(model_cfg, method_cfg, None, dtype, "cpu", 0)
        net, hooks = apply_method(net, method_cfg, total_steps=1, seed=0)
    sampler.mark("loaded")
    result = {
        "rank": rank,
        "case": args.case,
        "baseline": sampler.at("imported"),
        "load_peak": sampler.peak("imported", "loaded") - sampler.at("imported"),
        "load_peak_anon": sampler.peak("imported", "loaded", anon=True) - sampler.samples[sampler.marks["imported"]][2],
        "ready_overhead": sampler.at("ready") - sampler.at("imported"),
        "load_peak_over_ready": sampler.peak("ready", "loaded") - sampler.at("ready"),
        "bytes_read": stats.bytes_read if stats else None,
        "load_s": sampler.time_of("loaded") - sampler.time_of("imported"),
    }
    if not load_only:
        engine = engines.prepare(net, backend_cfg, train_cfg, env)
        sampler.mark("prepared")
        result.update(prepare_peak=sampler.peak("imported", "prepared") - sampler.at("imported"))
    if not (load_only or prepare_only):
        ids = torch.randint(0, net.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(rank))
        with engine.accumulate(True):
            loss = engine.model(input_ids=ids).logits.float().mean()
            sampler.mark("forward")
            engine.backward(loss)
            sampler.mark("backward")
        engine.step(1e-4, 1.0)
        sampler.mark("stepped")
        base = sampler.at("imported")
        result.update(
            prepare_peak=sampler.peak("imported", "prepared") - base,
            forward_peak=sampler.peak("prepared", "forward") - base,
            backward_peak=sampler.peak("forward", "backward") - base,
            step_peak=sampler.peak("imported", "stepped") - base,
            first_step_s=sampler.time_of("stepped"),
            loss=float(loss),
        )
    sampler.stop()
    Path(args.result).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_case(case: str, opts) -> list:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp(prefix="load_memory-"))
    procs = []
    for rank in range(opts.world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(opts.world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
        }
        if case.split(":")[2] == "old":
            env["TUNEFORGE_SHARDED_LOAD"] = "0"
        log = open(out / f"rank{rank}.log", "w")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "worker",
                    "--case",
                    case,
                    "--model",
                    opts.model,
                    "--seq-len",
                    str(opts.seq_len),
                    "--result",
                    str(out / f"rank{rank}.json"),
                    "--rss-cap-gib",
                    str(opts.rss_cap_gib),
                    "--malloc",
                    opts.malloc,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    deadline = time.monotonic() + opts.timeout
    while any(p.poll() is None for p in procs):  # a rank that fails leaves the others waiting: stop them
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.5)
    codes = [p.returncode for p in procs]
    if any(codes):
        for rank, code in enumerate(codes):
            if code == 75:  # a rank stopped at the RSS cap
                return [json.loads((out / f"rank{rank}.json").read_text())]
        tail = (out / f"rank{codes.index(max(codes))}.log").read_text()[-3000:]
        return [{"case": case, "error": f"exit codes {codes}", "log_tail": tail}]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(opts.world)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="save a random Llama as a Hugging Face directory")
    make.add_argument("--out", required=True)
    make.add_argument("--hidden", type=int, default=1536)
    make.add_argument("--intermediate", type=int, default=4096)
    make.add_argument("--layers", type=int, default=16)
    make.add_argument("--heads", type=int, default=12)
    make.add_argument("--kv-heads", type=int, default=4)
    make.add_argument("--vocab", type=int, default=32000)
    make.add_argument("--max-shard-size", default="1GB")
    run = sub.add_parser("run", help="measure cases")
    run.add_argument("--model", required=True)
    run.add_argument("--world", type=int, default=4)
    run.add_argument("--case", nargs="+", required=True)
    run.add_argument("--seq-len", type=int, default=64)
    run.add_argument("--timeout", type=int, default=1800)
    run.add_argument("--rss-cap-gib", type=float, default=4.0, help="a rank above this RSS stops the case")
    run.add_argument(
        "--malloc",
        choices=["trainer", "glibc", "mmap1m"],
        default="trainer",
        help="trainer: trainers/allocator.py's setting (freed memory kept, mmap above 1 GiB); glibc: "
        "its defaults (dynamic mmap threshold up to 32 MiB); mmap1m: a fixed 1 MiB mmap threshold",
    )
    w = sub.add_parser("worker")
    w.add_argument("--case", required=True)
    w.add_argument("--model", required=True)
    w.add_argument("--seq-len", type=int, default=64)
    w.add_argument("--result", required=True)
    w.add_argument("--rss-cap-gib", type=float, default=4.0)
    w.add_argument("--malloc", default="trainer")
    opts = parser.parse_args()
    if opts.command == "worker":
        worker(opts)
        return 0
    if opts.command == "make":
        print(
            json.dumps(
                make_model(
                    opts.out,
                    opts.hidden,
                    opts.intermediate,
                    opts.layers,
                    opts.heads,
                    opts.kv_heads,
                    opts.vocab,
                    opts.max_shard_size,
                )
            )
        )
        return 0
    figures = model_figures(opts.model)
    goal = 1.25 * figures["model_bytes"] / opts.world + figures["block_bytes"]
    results = {}
    for case in opts.case:
        results[case] = run_case(case, opts)
    header = (
        f"model {figures['params'] / 1e9:.3f}B params, {figures['model_bytes'] / GiB:.2f} GiB fp32, block "
        f"{figures['block_bytes'] / GiB:.3f} GiB; {opts.world} ranks; load goal {goal / GiB:.2f} GiB growth per rank"
    )
    print(header + f"; malloc {opts.malloc}")
    print(
        "GiB per rank (max over ranks) over the baseline (torch + transformers imported); 'ready': over the RSS once "
        "the case's libraries are imported and the process group is up"
    )
    print(
        f"{'case':28} {'load':>6} {'anon':>6} {'goal':>5} {'ready':>6} {'load-r':>6} {'+prep':>6} {'+fwd':>6} "
        f"{'+bwd':>6} {'+step':>6} {'read/rank':>10} {'1st step s':>10}"
    )
    for case, ranks in results.items():
        if "error" in ranks[0]:
            print(f"{case:28} FAILED {ranks[0]['error']}")
            continue
        load = max(r["load_peak"] for r in ranks)
        anon = max(r["load_peak_anon"] for r in ranks)
        read = [r["bytes_read"] for r in ranks]
        read_text = f"{max(read) / GiB:.2f}" if all(x is not None for x in read) else "whole"
        prep = max(r.get("prepare_peak", 0) for r in ranks)
        step = max(r.get("step_peak", 0) for r in ranks)
        first = max(r.get("first_step_s", 0) for r in ranks)
        fwd = max(r.get("forward_peak", 0) for r in ranks)
        bwd = max(r.get("backward_peak", 0) for r in ranks)
        ready = max(r["ready_overhead"] for r in ranks)
        over_ready = max(r["load_peak_over_ready"] for r in ranks)
        print(
            f"{case:28} {load / GiB:6.2f} {anon / GiB:6.2f} {'ok' if load <= goal else 'over':>5} {ready / GiB:6.2f} "
            f"{over_ready / GiB:6.2f} {prep / GiB:6.2f} {fwd / GiB:6.2f} {bwd / GiB:6.2f} {step / GiB:6.2f} "
            f"{read_text:>10} {first:10.1f}"
        )
    print(
        json.dumps(
            {"model": figures, "world": opts.world, "malloc": opts.malloc, "goal_bytes": goal, "results": results}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
