"""Throughput: tuneforge's trainer against transformers' Trainer, side by side, with MFU.

    python benchmarks/throughput.py             # 45M-param Llama, seq 512, batch 4, 3 rounds (~10 min on 2 idle cores)
    python benchmarks/throughput.py --quick     # tiny model, a few steps, 1 round: CI runs it so it cannot rot

Both sides train the same Llama-architecture model (built from config, same seed), on the same packed
rows of the bundled corpus, with the same batch, sequence length, dtype (bf16 weights), optimizer
(AdamW, fused, betas 0.9/0.95, eps 1e-8), LR schedule (cosine, 1 warm-up step), gradient clipping
(1.0), no evaluation and no saving during the timed steps, in fresh processes with the same threads:

  A  tuneforge through its real code path: the CLI (`python -m tuneforge.launch.cli ...
     cluster=local cluster.tasks_per_node=1`) in a subprocess; step times from the run's metrics.jsonl.
     Its settings for a CPU: train.compile=true and model.attn_implementation=eager (compiled, the
     plain matmul + softmax attention beats the CPU flash-attention kernel by ~1.09x at seq 512; the
     same eager attention makes HF Trainer 0.96x slower, so HF keeps its default, sdpa).
  B  transformers.Trainer in a subprocess (this file with --hf-worker); step times between
     consecutive `on_step_end` callbacks (data loading, step, logging: all of a step). Two settings:
     "amp"   TrainingArguments(bf16=True): fp32 weights, bf16 autocast, the way HF users train in bf16
             and the baseline of the issue's goal (`ratio`, `hf_trainer_tokens_per_s`);
     "bf16"  the model loaded in bf16 (bf16 weights, no autocast): the same parameter dtype as
             tuneforge's train.dtype=bf16 (`ratio_vs_hf_bf16_weights`). --quick runs "amp" only.

Runs alternate A B(amp) B(bf16) A B B ... over the rounds (the machine is shared: absolute times drift, ratios of
neighbouring runs much less). The first --warmup steps of every run are left out (compilation).

MFU = tokens/s x FLOPs per token / ceiling. FLOPs per token = 6N + 12 x layers x hidden x seq, N the
weights that enter a matmul (an untied input embedding is a lookup and is not counted). The ceiling
is measured in this run, between the training runs: the best bf16 (and fp32) GEMM throughput at
the model's own matmul shapes (q/k/v/o, MLP up/down, lm_head, at the tokens of one step), best of
several tries over all rounds.

Every figure comes twice: on the wall clock (tokens/s as a user sees them) and on a CPU-time basis
(tokens per CPU second of the training process x its threads, suffix `_cpu_basis`). On a shared machine
the neighbours' load stretches wall time by up to 5x from one minute to the next, while the CPU time a
step needs changes far less; the ceiling is a best-of figure, measured when the cores were free, so
the CPU-time MFU is the one to compare with it.

The last line printed is one JSON object (tuneforge_tokens_per_s, hf_trainer_tokens_per_s, ratio,
mfu_bf16, their _cpu_basis twins, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FULL = dict(
    hidden=512,
    layers=4,
    heads=8,
    kv_heads=8,
    intermediate=1408,
    vocab=32000,
    seq=512,
    batch=4,
    steps=12,
    warmup=3,
    rounds=3,
    compile=True,
    attn="eager",
)
QUICK = dict(
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=4,
    intermediate=128,
    vocab=512,
    seq=128,
    batch=2,
    steps=5,
    warmup=2,
    rounds=1,
    compile=False,
    attn="sdpa",
)
LR, BETAS, EPS, CLIP, SEED = 3e-4, (0.9, 0.95), 1e-8, 1.0, 0


def main() -> int:
    args = parse_args()
    if args.hf_worker:
        return hf_worker(json.loads(Path(args.hf_worker).read_text()))
    spec = {**(QUICK if args.quick else FULL)}
    spec.update({k: v for k, v in vars(args).items() if k in spec and v is not None})
    spec["hf_modes"] = (args.hf_modes or ("amp" if args.quick else "amp,bf16")).split(",")
    if spec["hf_modes"][0] != "amp" or not set(spec["hf_modes"]) <= {"amp", "bf16"}:
        raise SystemExit("--hf-modes: amp first (the baseline), then optionally bf16")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tuneforge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }

    spec.update(prepare_data(spec, work))
    model_facts = describe_model(spec)
    say(
        f"model: {model_facts['params_total'] / 1e6:.1f}M params ({model_facts['matmul_params'] / 1e6:.1f}M in "
        f"matmuls), seq {spec['seq']}, batch {spec['batch']}, {spec['steps']} steps ({spec['warmup']} warm-up), "
        f"compile={spec['compile']}, tuneforge attention {spec['attn']}, {spec['rounds']} round(s); work dir {work}"
    )

    ceilings = {"bf16": 0.0, "fp32": 0.0}
    rounds = []
    for r in range(spec["rounds"]):
        measure_ceilings(spec, ceilings, tries=2 if args.quick else 5)
        row = {"tuneforge": run_tuneforge(spec, work / f"tuneforge-{r}", env)}
        for mode in spec["hf_modes"]:
            row[f"hf_{mode}"] = run_hf_trainer(spec, work / f"hf-{mode}-{r}", env, mode)
        rounds.append(row)
        tf = row["tuneforge"]
        say(
            f"round {r + 1}: tuneforge {tf['tokens_per_s']:.0f} tok/s (CPU-time basis {tf['tokens_per_s_cpu']:.0f}); "
            + "; ".join(
                f"HF Trainer {m} {row[f'hf_{m}']['tokens_per_s']:.0f} ({row[f'hf_{m}']['tokens_per_s_cpu']:.0f}), "
                f"ratio {tf['tokens_per_s'] / row[f'hf_{m}']['tokens_per_s']:.2f} "
                f"({tf['tokens_per_s_cpu'] / row[f'hf_{m}']['tokens_per_s_cpu']:.2f})"
                for m in spec["hf_modes"]
            )
        )
    measure_ceilings(spec, ceilings, tries=2 if args.quick else 5)
    dry_run = time_dry_run(env)

    result = summarise(spec, model_facts, rounds, ceilings, dry_run, args.quick)
    print_table(result, rounds)
    print(json.dumps(result), flush=True)
    return 0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few steps, 1 round (CI)")
    p.add_argument("--work-dir", help="where runs and data go (default: a new temp dir)")
    for key in (
        "hidden",
        "layers",
        "heads",
        "kv_heads",
        "intermediate",
        "vocab",
        "seq",
        "batch",
        "steps",
        "warmup",
        "rounds",
    ):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, dest=key)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train.compile for tuneforge (default: on, off with --quick)",
    )
    p.add_argument(
        "--attn",
        choices=("eager", "sdpa"),
        help="tuneforge's model.attn_implementation "
        "(default: eager, sdpa with --quick); HF Trainer always runs its default, sdpa",
    )
    p.add_argument("--hf-modes", help="HF Trainer settings to run: amp,bf16 (default; --quick: amp)")
    p.add_argument("--hf-worker", help=argparse.SUPPRESS)
    return p.parse_args()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- set-up
def prepare_data(spec: dict, work: Path) -> dict:
    """A BPE tokenizer trained on the bundled corpus (capped by the corpus: the model's vocab is
    max(vocab, len(tokenizer)), as in tuneforge), and the packed rows both trainers read."""
    import torch

    from tuneforge import data as bundled
    from tuneforge.trainers.model import train_tokenizer

    corpus = bundled.bundled("demo_corpus")
    docs = [p.strip() for p in corpus.read_text().split("\n\n") if p.strip()]
    tokenizer_dir = work / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        train_tokenizer(docs, spec["vocab"], min_frequency=2).save_pretrained(tokenizer_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [
        i
        for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]
        for i in (*encoded, tokenizer.eos_token_id)
    ]
    rows = torch.tensor(ids[: len(ids) // spec["seq"] * spec["seq"]]).view(-1, spec["seq"])  # documents end to end
    torch.save(rows, work / "rows.pt")
    return {
        "tokenizer": str(tokenizer_dir),
        "rows": str(work / "rows.pt"),
        "vocab": max(spec["vocab"], len(tokenizer)),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }


def llama_config(spec: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=max(512, spec["seq"]),
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=spec["bos"],
        eos_token_id=spec["eos"],
        pad_token_id=spec["pad"],
        use_cache=False,
    )


def describe_model(spec: dict) -> dict:
    """Parameter counts and FLOPs per token, from the model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge import arch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config(spec))
    shape = arch.shape_from_config(model.config.to_dict())  # the trainer's and the preflight's count
    return {
        "params_total": sum(p.numel() for p in model.parameters()),
        "matmul_params": shape.matmul_params(),
        "flops_per_token": arch.flops_per_token(shape, spec["seq"]),
        "shapes": list(shape.gemm_shapes(spec["batch"] * spec["seq"])),
    }


def measure_ceilings(spec: dict, ceilings: dict, tries: int) -> None:
    """Best GEMM TFLOP/s at the model's shapes, kept over every call (best of all tries)."""
    import torch

    from tuneforge.trainers import metrics

    shapes = describe_model(spec)["shapes"]
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        found = metrics.gemm_ceiling(shapes, dtype, tries=tries, budget_s=10.0)["tflops"]
        ceilings[name] = max(ceilings[name], found)


# ----------------------------------------------------------------------------------- A: tuneforge
def tuneforge_overrides(spec: dict, run_dir: Path) -> list:
    return [
        "model=tiny",
        f"model.vocab_size={spec['vocab']}",
        f"model.hidden_size={spec['hidden']}",
        f"model.intermediate_size={spec['intermediate']}",
        f"model.num_layers={spec['layers']}",
        f"model.num_heads={spec['heads']}",
        f"model.num_kv_heads={spec['kv_heads']}",
        f"model.max_position_embeddings={max(512, spec['seq'])}",
        f"model.tokenizer={spec['tokenizer']}",
        f"model.attn_implementation={spec['attn']}",
        "method=pretrain",
        "backend=ddp",
        "data=demo_corpus",
        "logger=none",
        "cluster=local",
        "cluster.tasks_per_node=1",
        f"train.seq_len={spec['seq']}",
        f"train.micro_batch={spec['batch']}",
        f"train.global_batch={spec['batch']}",
        f"train.max_steps={spec['steps']}",
        "train.warmup_steps=1",
        "train.schedule=cosine",
        f"train.lr={LR}",
        f"train.beta1={BETAS[0]}",
        f"train.beta2={BETAS[1]}",
        "train.weight_decay=0.0",
        f"train.grad_clip={CLIP}",
        "train.dtype=bf16",
        f"train.compile={str(spec['compile']).lower()}",
        "train.checkpoint_every=0",
        f"train.seed={SEED}",
        f"run.dir={run_dir}",
    ]


def step_records(run_dir: Path) -> list:
    """The training steps of a run's metrics.jsonl (not step 0's evaluation, train.eval_on_start)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "step_time_s" in r]


def run_tuneforge(spec: dict, run_dir: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "tuneforge.launch.cli", *tuneforge_overrides(spec, run_dir)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        logs = sorted((run_dir / "slurm").glob("*_log.err"))
        tail = logs[-1].read_text()[-3000:] if logs else ""
        raise SystemExit(f"tuneforge run failed ({out.returncode}):\n{out.stderr[-2000:]}\n{tail}")
    records = step_records(run_dir)
    timed = [r for r in records if r["step"] > spec["warmup"]]
    tokens = len(timed) * spec["batch"] * spec["seq"]
    return {
        "tokens_per_s": tokens / sum(r["step_time_s"] for r in timed),
        "tokens_per_s_cpu": tokens / sum(r["cpu_time_s"] for r in timed) * _threads(),
        "own_mfu": statistics.median(r["mfu"] for r in timed) if all("mfu" in r for r in timed) else None,
        "compile_step_s": records[0]["step_time_s"],
        "loss": records[-1]["loss"],
        "peak_memory_mb": max(r.get("peak_memory_mb", 0.0) for r in records),
    }


# ----------------------------------------------------------------------------------- B: HF Trainer
def run_hf_trainer(spec: dict, out_dir: Path, env: dict, mode: str) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_file = out_dir / "spec.json"
    spec_file.write_text(json.dumps({**spec, "out_dir": str(out_dir), "hf_mode": mode}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", str(spec_file)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"HF Trainer run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    times = json.loads(out.stdout.strip().splitlines()[-1])
    step_s, cpu_s = times["step_s"][spec["warmup"] :], times["cpu_s"][spec["warmup"] :]
    tokens = len(step_s) * spec["batch"] * spec["seq"]
    return {
        "tokens_per_s": tokens / sum(step_s),
        "tokens_per_s_cpu": tokens / sum(cpu_s) * _threads(),
        "loss": times["loss"],
        "peak_memory_mb": times["peak_memory_mb"],
    }


def hf_worker(spec: dict) -> int:
    """transformers.Trainer on the same model, data and settings; prints the step times as JSON."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from tuneforge.trainers.metrics import peak_memory_mb

    rows = torch.load(spec["rows"])

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i]}  # the model shifts the labels itself

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.last, self.step_s, self.cpu_s = None, [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            now = (time.perf_counter(), time.process_time())
            self.step_s.append(now[0] - self.last[0])
            self.cpu_s.append(now[1] - self.last[1])
            self.last = now

    amp = spec["hf_mode"] == "amp"  # fp32 weights + bf16 autocast; else bf16 weights, no autocast
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(
        llama_config(spec), dtype=torch.float32 if amp else torch.bfloat16, attn_implementation="sdpa"
    )
    args = TrainingArguments(
        output_dir=spec["out_dir"],
        use_cpu=True,
        bf16=amp,
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=LR,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=EPS,
        weight_decay=0.0,
        optim="adamw_torch_fused",
        max_grad_norm=CLIP,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        logging_steps=spec["steps"],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=SEED,
        data_seed=SEED,
    )
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[timer])
    result = trainer.train()
    print(
        json.dumps(
            {
                "step_s": timer.step_s,
                "cpu_s": timer.cpu_s,
                "loss": result.training_loss,
                "peak_memory_mb": peak_memory_mb("cpu"),
            }
        )
    )
    return 0


# ----------------------------------------------------------------------------------- report
def time_dry_run(env: dict) -> dict:
    """Wall and CPU time of `tuneforge --dry-run cluster=slurm` (the submit path must stay under ~1 s on
    an idle machine; CPU time is the figure a busy machine does not inflate)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tuneforge.launch.cli", "--dry-run", "cluster=slurm", "cluster.cpus_per_task=1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"wall_s": wall, "cpu_s": cpu}


def summarise(spec, facts, rounds, ceilings, dry_run, quick) -> dict:
    """Medians over rounds. Wall-clock figures (tokens/s as a user sees them) and CPU-time figures
    (tokens per CPU second x threads: what the code does with the cores it gets, which a shared
    machine's load changes far less; the ceiling is a best-of figure too, so `mfu_bf16_cpu_basis` is
    the steadier MFU)."""
    flops, result = facts["flops_per_token"], {}
    for basis, suffix in (("tokens_per_s", ""), ("tokens_per_s_cpu", "_cpu_basis")):
        tf = statistics.median(r["tuneforge"][basis] for r in rounds)
        ratios = {m: [r["tuneforge"][basis] / r[f"hf_{m}"][basis] for r in rounds] for m in spec["hf_modes"]}
        hf = {m: statistics.median(r[f"hf_{m}"][basis] for r in rounds) for m in spec["hf_modes"]}
        result.update(
            {
                f"tuneforge_tokens_per_s{suffix}": round(tf, 1),
                f"hf_trainer_tokens_per_s{suffix}": round(hf["amp"], 1),
                f"ratio{suffix}": round(statistics.median(ratios["amp"]), 3),
                f"ratios{suffix}": [round(x, 3) for x in ratios["amp"]],
                f"mfu_bf16{suffix}": round(tf * flops / 1e12 / ceilings["bf16"], 4),
                f"hf_mfu_bf16{suffix}": round(hf["amp"] * flops / 1e12 / ceilings["bf16"], 4),
            }
        )
        if "bf16" in spec["hf_modes"]:
            result.update(
                {
                    f"hf_trainer_bf16_weights_tokens_per_s{suffix}": round(hf["bf16"], 1),
                    f"ratio_vs_hf_bf16_weights{suffix}": round(statistics.median(ratios["bf16"]), 3),
                    f"ratios_vs_hf_bf16_weights{suffix}": [round(x, 3) for x in ratios["bf16"]],
                    f"hf_bf16_weights_mfu_bf16{suffix}": round(hf["bf16"] * flops / 1e12 / ceilings["bf16"], 4),
                }
            )
    result["mfu_fp32"] = round(result["tuneforge_tokens_per_s"] * flops / 1e12 / ceilings["fp32"], 4)
    own = [r["tuneforge"]["own_mfu"] for r in rounds if r["tuneforge"]["own_mfu"] is not None]
    result.update(
        {
            "tuneforge_own_mfu": round(statistics.median(own), 4) if own else None,
            "ceiling_bf16_tflops": round(ceilings["bf16"], 4),
            "ceiling_fp32_tflops": round(ceilings["fp32"], 4),
            "flops_per_token": flops,
            "params": facts["params_total"],
            "matmul_params": facts["matmul_params"],
            "tuneforge_peak_memory_mb": round(max(r["tuneforge"]["peak_memory_mb"] for r in rounds)),
            "hf_peak_memory_mb": {
                m: round(max(r[f"hf_{m}"]["peak_memory_mb"] for r in rounds)) for m in spec["hf_modes"]
            },
            "dry_run_s": round(dry_run["wall_s"], 2),
            "dry_run_cpu_s": round(dry_run["cpu_s"], 2),
            "model": {k: spec[k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")},
            "seq": spec["seq"],
            "batch": spec["batch"],
            "steps": spec["steps"],
            "warmup": spec["warmup"],
            "compile": spec["compile"],
            "attn": spec["attn"],
            "hf_modes": spec["hf_modes"],
            "quick": quick,
            "threads": _threads(),
        }
    )
    return result


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def print_table(result: dict, rounds: list) -> None:
    modes = result["hf_modes"]
    for basis, suffix, title in (
        ("tokens_per_s", "", "tokens/s (wall clock)"),
        ("tokens_per_s_cpu", "_cpu_basis", "tokens/s on a CPU-time basis (tokens / CPU s x threads)"),
    ):
        print(f"\n{title}")
        head = "".join(f"  {'HF ' + m:>10}  {'ratio':>6}" for m in modes)
        print(f"{'round':>6}  {'tuneforge':>10}{head}")
        for i, r in enumerate(rounds, 1):
            tf = r["tuneforge"][basis]
            print(
                f"{i:>6}  {tf:>10.0f}"
                + "".join(f"  {r[f'hf_{m}'][basis]:>10.0f}  {tf / r[f'hf_{m}'][basis]:>6.2f}" for m in modes)
            )
        medians = f"  {result[f'hf_trainer_tokens_per_s{suffix}']:>10.0f}  {result[f'ratio{suffix}']:>6.2f}"
        if "bf16" in modes:
            medians += (
                f"  {result[f'hf_trainer_bf16_weights_tokens_per_s{suffix}']:>10.0f}  "
                f"{result[f'ratio_vs_hf_bf16_weights{suffix}']:>6.2f}"
            )
        print(f"{'median':>6}  {result[f'tuneforge_tokens_per_s{suffix}']:>10.0f}{medians}")
        hf_bf16 = (
            f", HF bf16 weights {100 * result[f'hf_bf16_weights_mfu_bf16{suffix}']:.1f}%" if "bf16" in modes else ""
        )
        print(
            f"MFU vs the bf16 ceiling: tuneforge {100 * result[f'mfu_bf16{suffix}']:.1f}%, "
            f"HF amp {100 * result[f'hf_mfu_bf16{suffix}']:.1f}%{hf_bf16}"
        )
    print(
        f"\nceiling (best GEMM at the model's shapes, best of all tries): bf16 {result['ceiling_bf16_tflops']:.3f} "
        f"TFLOP/s, fp32 {result['ceiling_fp32_tflops']:.3f} TFLOP/s; {result['flops_per_token'] / 1e6:.0f} MFLOP per token"
    )
    own = "n/a" if result["tuneforge_own_mfu"] is None else f"{100 * result['tuneforge_own_mfu']:.1f}%"
    print(f"tuneforge's own metrics.jsonl MFU (against its own ~1 s ceiling measured at start): {own}")
    print(
        f"peak memory (RSS, MB): tuneforge {result['tuneforge_peak_memory_mb']}, HF Trainer {result['hf_peak_memory_mb']}"
    )
    print(f"tuneforge --dry-run: {result['dry_run_s']:.2f} s wall, {result['dry_run_cpu_s']:.2f} s CPU")


if __name__ == "__main__":
    sys.exit(main())
