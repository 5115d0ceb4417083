"""PEFT throughput: tuneforge's LoRA, DoRA and QLoRA against transformers' Trainer + peft, with loss curves.

    python benchmarks/adapters.py                      # 45.6M Llama by path, lora,dora,qlora + full, 3 rounds
    python benchmarks/adapters.py --methods lora --rounds 5 --steps 16
    python benchmarks/adapters.py --threads 1          # one thread per process (a loaded machine: see below)
    python benchmarks/adapters.py --quick              # tiny model, a few steps, 1 round: CI runs it so it cannot rot
    python benchmarks/adapters.py --rounds 1 --work-dir W --record W/rounds.json   # x3: one round per sitting

Both sides finetune the same saved base model (the Llama of throughput.py: hidden 512, 4 layers, vocab
32000, random weights saved in bf16 with save_pretrained, loaded by path), with the same adapter
(rank 8, alpha 16, dropout 0.05, on every linear layer of the decoder: tuneforge's default and peft's
"all-linear"), on the same packed rows in the same order (the rows tuneforge's data pipeline makes of
the bundled corpus, position ids restarting at every document, taken from its token cache), batch 4 x
seq 512, AdamW (fused, lr 1e-3, betas 0.9/0.95, eps 1e-8, no weight decay), cosine schedule to 0 with
no warm-up (the one schedule both write the same way), gradient clipping 1.0, no evaluation, no saving
during the timed steps; each run in a fresh process:

  A  tuneforge through the CLI (`model=hf model.name_or_path=<base> method=<m> train.dtype=bf16
     train.compile=true model.attn_implementation=eager cluster.tasks_per_node=1`); step times and
     losses from the run's metrics.jsonl.
  B  transformers.Trainer on `get_peft_model(AutoModelForCausalLM.from_pretrained(<base>,
     dtype=bfloat16), LoraConfig(...))` with TrainingArguments(bf16=True): a bf16 base, fp32 adapters,
     bf16 autocast, the way HF users run LoRA. QLoRA on both sides: BitsAndBytesConfig(nf4, double
     quantisation, compute and storage in bf16) and prepare_model_for_kbit_training. Step times between
     consecutive `on_step_end` callbacks; the loss of every step as training_step returns it.
  F  tuneforge `method=full` on the same base and settings (not a ratio against HF: the yardstick of the
     adapters' speed, since LoRA skips the frozen weights' gradients, about a third of the FLOPs).

Runs alternate A(lora) B(lora) A(dora) B(dora) A(qlora) B(qlora) F, round after round; the first
--warmup steps of every run are left out (compilation). Figures on the wall clock and on a CPU-time
basis (tokens per CPU second x threads), as in throughput.py. Loss curves: the per-step losses of the
two sides of the first round, and their largest difference; dropout draws different masks on the two
sides, so the curves agree to bf16 rounding plus that noise (--dropout 0 removes it).

On a machine shared with other work, a 2-thread process waits for its second thread at every parallel
op, a few ms each; an adapter step has ~10x more small ops than a full step and suffers most.
`--threads 1` measures what the code does per core, the fairer comparison on a loaded machine.

The last line printed is one JSON object: per method, tuneforge's and HF's tokens/s, the median ratio
and the per-round ratios, the loss difference; and lora_vs_full (tuneforge LoRA tokens/s over
tuneforge full training's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # noqa: E402  (the model, tokenizer and ceiling of the full-training benchmark)

METHODS = ("lora", "dora", "qlora")
FULL = dict(throughput.FULL)  # the full-training benchmark's ~45M Llama, rows and rounds
QUICK = {**throughput.QUICK, "steps": 4, "warmup": 1}
RANK, ALPHA, DROPOUT, LR, BETAS, EPS, CLIP, SEED = 8, 16.0, 0.05, 1e-3, (0.9, 0.95), 1e-8, 1.0, 0


def main() -> int:
    args = parse_args()
    if args.hf_worker:
        return hf_worker(json.loads(Path(args.hf_worker).read_text()))
    spec = {**(QUICK if args.quick else FULL)}
    spec.update({k: v for k, v in vars(args).items() if k in spec and v is not None})
    spec["dropout"] = DROPOUT if args.dropout is None else args.dropout
    spec["threads"] = args.threads
    methods = (args.methods or ("lora,qlora" if args.quick else ",".join(METHODS))).split(",")
    if not set(methods) <= set(METHODS):
        raise SystemExit(f"--methods: some of {','.join(METHODS)}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tuneforge-peft-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if args.threads:
        env["SLURM_CPUS_PER_TASK"] = str(args.threads)  # tuneforge's threads per CPU rank (slurm/env.py)
    spec.update(prepare(spec, work))
    say(
        f"base: {spec['base']} ({spec['params'] / 1e6:.1f}M params), seq {spec['seq']}, batch {spec['batch']}, "
        f"{spec['steps']} steps ({spec['warmup']} warm-up), r={RANK} alpha={ALPHA} dropout={spec['dropout']}, "
        f"compile={spec['compile']}, threads={args.threads or 'default'}, methods {','.join(methods)}"
        f"{' + full' if args.full else ''}, {spec['rounds']} round(s); load {load()}"
    )
    ceilings = {"bf16": 0.0, "fp32": 0.0}
    rounds, record = [], Path(args.record) if args.record else None
    if record is not None and record.is_file():  # earlier rounds of the same measurement (--record)
        kept = json.loads(record.read_text())
        if kept["key"] != record_key(spec, methods, args):
            raise SystemExit(f"--record {record}: its rounds were measured with other settings")
        rounds, ceilings = kept["rounds"], kept["ceilings"]
        say(f"--record: {len(rounds)} round(s) measured before, {spec['rounds']} more now")
    for r in range(len(rounds), len(rounds) + spec["rounds"]):
        throughput.measure_ceilings(spec, ceilings, tries=2 if args.quick else 5)
        row = {"load": load()}
        for m in methods:
            row[m] = {"tuneforge": run_tuneforge(spec, m, work / f"tf-{m}-{r}", env)}
            row[m]["hf"] = run_hf(spec, m, work / f"hf-{m}-{r}", env)
            tf, hf = row[m]["tuneforge"], row[m]["hf"]
            say(
                f"round {r + 1} {m}: tuneforge {tf['tokens_per_s']:.0f} tok/s ({tf['tokens_per_s_cpu']:.0f} CPU basis), "
                f"HF+peft {hf['tokens_per_s']:.0f} ({hf['tokens_per_s_cpu']:.0f}), ratio "
                f"{tf['tokens_per_s'] / hf['tokens_per_s']:.2f} ({tf['tokens_per_s_cpu'] / hf['tokens_per_s_cpu']:.2f})"
            )
        if args.full:
            row["full"] = {"tuneforge": run_tuneforge(spec, "full", work / f"tf-full-{r}", env)}
            say(f"round {r + 1} full: tuneforge {row['full']['tuneforge']['tokens_per_s']:.0f} tok/s")
        rounds.append(row)
        if record is not None:
            key = record_key(spec, methods, args)
            record.write_text(json.dumps({"key": key, "rounds": rounds, "ceilings": ceilings}))
    result = summarise(spec, methods, rounds, ceilings, args)
    print_report(result, rounds, methods)
    print(json.dumps(result), flush=True)
    return 0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few steps, 1 round (CI)")
    p.add_argument("--work-dir", help="where the base, runs and data go (default: a new temp dir)")
    p.add_argument("--methods", help=f"some of {','.join(METHODS)} (default: all; --quick: lora,qlora)")
    p.add_argument("--full", action=argparse.BooleanOptionalAction, default=True, help="also tuneforge method=full")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: tuneforge's default)")
    p.add_argument("--dropout", type=float, help=f"adapter dropout (default {DROPOUT})")
    for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "seq", "batch", "steps"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, dest=key)
    p.add_argument("--warmup", type=int, help="steps left out of the timing")
    p.add_argument("--rounds", type=int)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--attn", choices=("eager", "sdpa"), help="tuneforge's attention (HF keeps sdpa)")
    p.add_argument(
        "--record",
        help="a JSON file of the rounds measured so far: its rounds are kept, the new ones appended and the "
        "figures taken over all (a long measurement in several sittings, same --work-dir and settings)",
    )
    p.add_argument("--hf-worker", help=argparse.SUPPRESS)
    return p.parse_args()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def record_key(spec: dict, methods: list, args) -> dict:
    """What rounds measured together must share (--record)."""
    keys = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "seq", "batch", "steps", "warmup")
    return {
        **{k: spec[k] for k in keys},
        "methods": list(methods),
        "full": args.full,
        "threads": args.threads,
        "dropout": spec["dropout"],
        "compile": spec["compile"],
        "attn": spec["attn"],
    }


# ----------------------------------------------------------------------------------- set-up
def prepare(spec: dict, work: Path) -> dict:
    """The saved base (tokenizer included) and the batches tuneforge's pipeline gives, step by step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    found = throughput.prepare_data(spec, work)
    spec = {**spec, **found}
    base = work / "base"
    if not (base / "config.json").is_file():
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(throughput.llama_config(spec), dtype=torch.bfloat16)
        model.save_pretrained(base)
        AutoTokenizer.from_pretrained(spec["tokenizer"]).save_pretrained(base)
    params = throughput.describe_model(spec)["params_total"]
    batches = work / "batches.pt"
    if not batches.is_file():
        torch.save(pipeline_batches({**spec, "base": str(base)}, base), batches)
    return {**found, "base": str(base), "batches": str(batches), "params": params}


def pipeline_batches(spec: dict, base: Path) -> list:
    """The micro batches (one per step) tuneforge's data pipeline gives this run: the same rows, in the
    same order, that the HF side trains on (and the token cache the tuneforge runs then find built)."""
    from transformers import AutoTokenizer

    from tuneforge.data import pipeline
    from tuneforge.launch.compose import compose
    from tuneforge.trainers.distributed import DistEnv

    cfg = compose(tuneforge_overrides(spec, "lora", base / "unused-run-dir"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    one_rank = DistEnv(0, 0, 1, 1, 1, "127.0.0.1", 0, "benchmark", "cpu")
    data = pipeline.build(cfg.data, cfg.train, tokenizer, one_rank)
    return [next(iter(data.train.micro_batches(step))) for step in range(spec["steps"])]


# ----------------------------------------------------------------------------------- A: tuneforge
def tuneforge_overrides(spec: dict, method: str, run_dir: Path) -> list:
    adapter = (
        [f"method.r={RANK}", f"method.alpha={ALPHA}", f"method.dropout={spec['dropout']}"] if method != "full" else []
    )
    return [
        "model=hf",
        f"model.name_or_path={spec['base']}",
        f"model.attn_implementation={spec['attn']}",
        f"method={method}",
        *adapter,
        "backend=ddp",
        "data=demo_corpus",
        "logger=none",
        "cluster=local",
        "cluster.tasks_per_node=1",
        f"train.seq_len={spec['seq']}",
        f"train.micro_batch={spec['batch']}",
        f"train.global_batch={spec['batch']}",
        f"train.max_steps={spec['steps']}",
        "train.warmup_steps=0",
        "train.schedule=cosine",
        "train.min_lr_ratio=0",
        f"train.lr={LR}",
        f"train.beta1={BETAS[0]}",
        f"train.beta2={BETAS[1]}",
        "train.weight_decay=0.0",
        f"train.grad_clip={CLIP}",
        "train.dtype=bf16",
        f"train.compile={str(spec['compile']).lower()}",
        "train.checkpoint_every=0",
        "train.eval_every=0",
        "train.log_every=1",
        f"train.seed={SEED}",
        f"run.dir={run_dir}",
    ]


def run_tuneforge(spec: dict, method: str, run_dir: Path, env: dict) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # a run dir with a checkpoint would resume, not train
    cmd = [sys.executable, "-m", "tuneforge.launch.cli", *tuneforge_overrides(spec, method, run_dir)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        logs = sorted((run_dir / "slurm").glob("*_log.err"))
        tail = logs[-1].read_text()[-3000:] if logs else ""
        raise SystemExit(f"tuneforge {method} run failed ({out.returncode}):\n{out.stderr[-2000:]}\n{tail}")
    records = throughput.step_records(run_dir)
    timed = [r for r in records if r["step"] > spec["warmup"]]
    tokens = len(timed) * spec["batch"] * spec["seq"]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "tokens_per_s": tokens / sum(r["step_time_s"] for r in timed),
        "tokens_per_s_cpu": tokens / sum(r["cpu_time_s"] for r in timed) * threads(spec),
        "losses": [r["loss"] for r in records],
        "own_mfu": statistics.median(r["mfu"] for r in timed) if all("mfu" in r for r in timed) else None,
        "params_trainable": summary.get("params_trainable"),
        "peak_memory_mb": max(r.get("peak_memory_mb", 0.0) for r in records),
    }


# ----------------------------------------------------------------------------------- B: HF Trainer + peft
def run_hf(spec: dict, method: str, out_dir: Path, env: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_file = out_dir / "spec.json"
    spec_file.write_text(json.dumps({**spec, "out_dir": str(out_dir), "method": method}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", str(spec_file)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"HF Trainer + peft {method} run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    times = json.loads(out.stdout.strip().splitlines()[-1])
    step_s, cpu_s = times["step_s"][spec["warmup"] :], times["cpu_s"][spec["warmup"] :]
    tokens = len(step_s) * spec["batch"] * spec["seq"]
    return {
        "tokens_per_s": tokens / sum(step_s),
        "tokens_per_s_cpu": tokens / sum(cpu_s) * threads(spec),
        "losses": times["losses"],
        "params_trainable": times["params_trainable"],
        "peak_memory_mb": times["peak_memory_mb"],
    }


def hf_worker(spec: dict) -> int:
    """transformers.Trainer + peft on the same base, batches and settings; prints step times and losses."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from tuneforge.trainers.metrics import peak_memory_mb

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    rows = [
        {key: value[i] for key, value in batch.items()}
        for batch in torch.load(spec["batches"])
        for i in range(spec["batch"])
    ]

    class Rows(torch.utils.data.Dataset):  # the pipeline's rows, in the order tuneforge trains on them
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    class InOrder(Trainer):
        losses: list = []

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.losses.append(float(loss))
            return loss

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

    method = spec["method"]
    load = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if method == "qlora":
        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,
        )
        load["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(spec["base"], **load)
    model.config.use_cache = False
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(SEED)
    adapter = LoraConfig(
        task_type="CAUSAL_LM",
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=spec["dropout"],
        target_modules="all-linear",
        use_dora=method == "dora",
    )
    model = get_peft_model(model, adapter)
    args = TrainingArguments(
        output_dir=spec["out_dir"],
        use_cpu=True,
        bf16=True,
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
        warmup_steps=0,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        logging_steps=spec["steps"],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=SEED,
        data_seed=SEED,
    )
    timer = StepTimer()
    trainer = InOrder(
        model=model, args=args, train_dataset=Rows(), data_collator=default_data_collator, callbacks=[timer]
    )
    trainer.train()
    print(
        json.dumps(
            {
                "step_s": timer.step_s,
                "cpu_s": timer.cpu_s,
                "losses": trainer.losses,
                "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "peak_memory_mb": peak_memory_mb("cpu"),
            }
        )
    )
    return 0


# ----------------------------------------------------------------------------------- report
def threads(spec: dict) -> int:
    if spec.get("threads"):
        return spec["threads"]
    import torch

    return torch.get_num_threads()


def summarise(spec: dict, methods: list, rounds: list, ceilings: dict, args) -> dict:
    from tuneforge import arch

    shape = arch.shape_from_config(throughput.llama_config(spec).to_dict())
    result: dict = {"methods": {}}
    for m in methods:
        tf = [r[m]["tuneforge"] for r in rounds]
        hf = [r[m]["hf"] for r in rounds]
        first_tf, first_hf = tf[0]["losses"], hf[0]["losses"]
        diffs = [abs(a - b) for a, b in zip(first_tf, first_hf)]
        flops = arch.flops_per_token(shape, spec["seq"], tf[0]["params_trainable"])
        entry = {}
        for basis, suffix in (("tokens_per_s", ""), ("tokens_per_s_cpu", "_cpu_basis")):
            ratios = [a[basis] / b[basis] for a, b in zip(tf, hf)]
            entry.update(
                {
                    f"tuneforge_tokens_per_s{suffix}": round(statistics.median(x[basis] for x in tf), 1),
                    f"hf_peft_tokens_per_s{suffix}": round(statistics.median(x[basis] for x in hf), 1),
                    f"ratio{suffix}": round(statistics.median(ratios), 3),
                    f"ratios{suffix}": [round(x, 3) for x in ratios],
                }
            )
        entry.update(
            {
                "mfu_bf16_cpu_basis": round(
                    entry["tuneforge_tokens_per_s_cpu_basis"] * flops / 1e12 / ceilings["bf16"], 4
                ),
                "flops_per_token": flops,
                "params_trainable": {"tuneforge": tf[0]["params_trainable"], "hf": hf[0]["params_trainable"]},
                "loss_tuneforge": [round(x, 5) for x in first_tf],
                "loss_hf": [round(x, 5) for x in first_hf],
                "loss_max_abs_diff": round(max(diffs), 5),
                "loss_max_rel_diff": round(max(d / abs(b) for d, b in zip(diffs, first_hf)), 5),
                "peak_memory_mb": {
                    "tuneforge": round(max(x["peak_memory_mb"] for x in tf)),
                    "hf": round(max(x["peak_memory_mb"] for x in hf)),
                },
            }
        )
        result["methods"][m] = entry
    if args.full:
        full = [r["full"]["tuneforge"] for r in rounds]
        result["full_tokens_per_s"] = round(statistics.median(x["tokens_per_s"] for x in full), 1)
        result["full_tokens_per_s_cpu_basis"] = round(statistics.median(x["tokens_per_s_cpu"] for x in full), 1)
        if "lora" in methods:
            for basis, suffix in (("tokens_per_s", ""), ("tokens_per_s_cpu", "_cpu_basis")):
                ratios = [r["lora"]["tuneforge"][basis] / r["full"]["tuneforge"][basis] for r in rounds]
                result[f"lora_vs_full{suffix}"] = round(statistics.median(ratios), 3)
                result[f"lora_vs_full_ratios{suffix}"] = [round(x, 3) for x in ratios]
    result.update(
        {
            "ceiling_bf16_tflops": round(ceilings["bf16"], 4),
            "loads": [r["load"] for r in rounds],
            "model": {k: spec[k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")},
            **{k: spec[k] for k in ("seq", "batch", "steps", "warmup", "compile", "attn", "dropout")},
            "rank": RANK,
            "alpha": ALPHA,
            "threads": threads(spec),
            "quick": args.quick,
        }
    )
    return result


def print_report(result: dict, rounds: list, methods: list) -> None:
    for basis, suffix, title in (
        ("tokens_per_s", "", "tokens/s (wall clock)"),
        ("tokens_per_s_cpu", "_cpu_basis", "tokens/s on a CPU-time basis (tokens / CPU s x threads)"),
    ):
        print(f"\n{title}")
        print(
            f"{'round':>6}  {'load':>16}" + "".join(f"  {m + ' tf':>9}  {'HF+peft':>8}  {'ratio':>5}" for m in methods)
        )
        for i, r in enumerate(rounds, 1):
            cells = "".join(
                f"  {r[m]['tuneforge'][basis]:>9.0f}  {r[m]['hf'][basis]:>8.0f}  "
                f"{r[m]['tuneforge'][basis] / r[m]['hf'][basis]:>5.2f}"
                for m in methods
            )
            full = f"   full {r['full']['tuneforge'][basis]:.0f}" if "full" in r else ""
            print(f"{i:>6}  {r['load']:>16}{cells}{full}")
        med = result["methods"]
        print(
            f"{'median':>6}  {'':>16}"
            + "".join(
                f"  {med[m][f'tuneforge_tokens_per_s{suffix}']:>9.0f}  {med[m][f'hf_peft_tokens_per_s{suffix}']:>8.0f}  "
                f"{med[m][f'ratio{suffix}']:>5.2f}"
                for m in methods
            )
            + (f"   full {result[f'full_tokens_per_s{suffix}']:.0f}" if "full_tokens_per_s" in result else "")
        )
        if f"lora_vs_full{suffix}" in result:
            print(f"tuneforge LoRA / tuneforge full training: {result[f'lora_vs_full{suffix}']:.2f}")
    for m in methods:
        e = result["methods"][m]
        print(
            f"\n{m}: loss per step (round 1), largest difference {e['loss_max_abs_diff']:.4f} "
            f"({100 * e['loss_max_rel_diff']:.2f}%); trainable {e['params_trainable']}; MFU (CPU basis) "
            f"{100 * e['mfu_bf16_cpu_basis']:.1f}%; peak RSS MB {e['peak_memory_mb']}"
        )
        print("  tuneforge " + " ".join(f"{x:.4f}" for x in e["loss_tuneforge"]))
        print("  HF+peft   " + " ".join(f"{x:.4f}" for x in e["loss_hf"]))


if __name__ == "__main__":
    sys.exit(main())
