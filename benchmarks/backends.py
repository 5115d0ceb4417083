"""Step time and peak memory per rank of every backend on 2 CPU ranks, relative to DDP at equal global batch.

    PYTHONPATH=. python benchmarks/backends.py                      # 6 backends, 1 round, ~5-10 min on 2 cores
    PYTHONPATH=. python benchmarks/backends.py --rounds 3 --hidden 512 --layers 8

Each backend runs through the real CLI (cluster=local: 2 gloo processes, fp32, same seed, data and
global batch). Step time is the median `step_time_s` of metrics.jsonl after the warm-up steps (the
forward, backward, gradient reduction and optimizer step; not checkpointing); peak memory is each
rank's peak resident set size from summary.json (`peak_memory_mb_per_rank`), which includes
~0.4 GB of Python, torch and transformers per process. Backends are run in a rotated order each
round, and the ratio to DDP is taken within a round: neighbours share this machine, so compare
ratios, never absolute times. This prints a table; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BACKENDS = ["ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload"]


def run_backend(backend: str, run_dir: Path, opts) -> dict:
    command = [
        sys.executable,
        "-m",
        "tuneforge.launch.cli",
        "logger=none",
        "cluster=local",
        "model=tiny",
        "method=pretrain",
        f"model.hidden_size={opts.hidden}",
        f"model.intermediate_size={opts.hidden * 8 // 3 // 64 * 64}",
        f"model.num_layers={opts.layers}",
        f"model.num_heads={max(1, opts.hidden // 64)}",
        f"model.num_kv_heads={max(1, opts.hidden // 64)}",
        f"train.seq_len={opts.seq_len}",
        f"train.max_steps={opts.steps}",
        "train.warmup_steps=2",
        "train.checkpoint_every=0",
        f"train.global_batch={opts.global_batch}",
        f"train.micro_batch={opts.global_batch // 2}",
        f"backend={backend}",
        f"run.dir={run_dir}",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{backend} failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step_time_s" in r]  # the training steps (not step 0's evaluation)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "step_s": statistics.median(r["step_time_s"] for r in records[opts.warmup :]),
        "memory_mb": summary["peak_memory_mb_per_rank"],
        "params": summary["params_total"],
        "wall_s": time.perf_counter() - started,
        "final_loss": records[-1]["loss"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=BACKENDS)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="where the runs go; default: a temp dir")
    opts = parser.parse_args()
    if "ddp" not in opts.backends:
        opts.backends = ["ddp"] + opts.backends
    root = opts.out or Path(tempfile.mkdtemp(prefix="tuneforge-bench-"))
    results = {b: [] for b in opts.backends}
    ratios = {b: [] for b in opts.backends}
    for round_ in range(opts.rounds):
        order = opts.backends[round_ % len(opts.backends) :] + opts.backends[: round_ % len(opts.backends)]
        for backend in order:
            result = run_backend(backend, root / f"r{round_}" / backend, opts)
            results[backend].append(result)
            print(
                f"round {round_ + 1}/{opts.rounds} {backend:14s} step {result['step_s'] * 1e3:7.1f} ms  "
                f"wall {result['wall_s']:5.1f} s",
                file=sys.stderr,
                flush=True,
            )
        for backend in opts.backends:
            ratios[backend].append(results[backend][-1]["step_s"] / results["ddp"][-1]["step_s"])
    params = results["ddp"][0]["params"]
    print(
        f"\n{params / 1e6:.1f}M-param Llama (hidden {opts.hidden}, {opts.layers} layers), seq {opts.seq_len}, "
        f"global batch {opts.global_batch}, 2 CPU ranks, fp32, {opts.rounds} round(s), "
        f"median of steps {opts.warmup + 1}-{opts.steps}"
    )
    print(f"{'backend':14s} {'step ms':>8s} {'vs ddp':>7s} {'peak MB r0':>11s} {'peak MB r1':>11s} {'loss@end':>9s}")
    for backend in opts.backends:
        step_ms = statistics.median(r["step_s"] for r in results[backend]) * 1e3
        memory = [max(r["memory_mb"][rank] for r in results[backend]) for rank in (0, 1)]
        print(
            f"{backend:14s} {step_ms:8.1f} {statistics.median(ratios[backend]):6.2f}x "
            f"{memory[0]:11.0f} {memory[1]:11.0f} {results[backend][-1]['final_loss']:9.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
