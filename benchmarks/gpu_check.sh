#!/usr/bin/env bash
# GPU check: DDP, FSDP2 and DeepSpeed ZeRO-3 x full, LoRA and QLoRA finetuning of a ~1B-parameter
# Llama (built from config, random weights, saved and loaded by path) on ONE GPU, bf16, NCCL, through
# the real CLI. Prints tokens/s, MFU and peak memory per combination as a table, and writes it as
# markdown under benchmarks/results/ (commit that file with the date and the GPU in its name).
#
#   bash benchmarks/gpu_check.sh            # from a fresh checkout; torch with CUDA already installed
#   bash benchmarks/gpu_check.sh --plan     # no GPU needed: compose + validate every combination (tiny, CPU)
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # no GPU needed: the whole script with a tiny model on CPU
#
# Environment knobs: SKIP_INSTALL=1 (deps already there; --plan and the smoke test never install),
# COMPILE=1 (train.compile=true), PEAK_TFLOPS=<dense bf16 TFLOP/s> (else looked up from the GPU name,
# else measured by each run), GPU_CHECK_BUDGET_S (default 450 s from the start, install included:
# combinations not started by then are reported as skipped), GPU_CHECK_DIR (default a new temp dir).
# Designed to finish in under 8 minutes on one H100-class GPU: 9 runs of 15 steps each.
# A combination that the config refuses (e.g. a backend or method this checkout lacks, or a pairing
# the validator forbids) is reported as "unavailable: <reason>"; one that fails at run time as
# "failed: <last error line>"; neither stops the others.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PLAN=0
[[ "${1:-}" == "--plan" ]] && PLAN=1
START_S=$(date +%s)

if [[ $PLAN == 0 && -z "${SKIP_INSTALL:-}" && "${GPU_CHECK_SMOKE:-}" != 1 ]]; then
  echo "== pip install -e '.[deepspeed,qlora]'"
  python -m pip install -q -e '.[deepspeed,qlora]' || { echo "install failed" >&2; exit 1; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

python - "$PLAN" "$START_S" <<'PY'
import datetime, json, os, re, shutil, signal, statistics, subprocess, sys, tempfile, time
from pathlib import Path

PLAN, START = sys.argv[1] == "1", float(sys.argv[2])
SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"  # tiny model on the CPU: checks this script, not a GPU
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", 450))
WORK = Path(os.environ.get("GPU_CHECK_DIR") or tempfile.mkdtemp(prefix="tuneforge-gpu-check-"))
BACKENDS, METHODS = ("ddp", "fsdp", "zero3"), ("full", "lora", "qlora")
STEPS, WARMUP, SEQ, MICRO = (6, 2, 64, 2) if SMOKE else (15, 5, 2048, 4)
ARCH = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
            intermediate_size=5504, vocab_size=32000, max_position_embeddings=SEQ)
if SMOKE or PLAN:  # --plan validates the combinations on a tiny model of the same family (weights and all)
    ARCH.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=128, vocab_size=512)
# Dense bf16 TFLOP/s per GPU (datasheets, without sparsity), matched on the device name in order.
PEAKS = [("H100 PCIe", 756.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0),
         ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0)]


def build_base(out: Path) -> None:
    """A ~1B Llama (random init) and a BPE tokenizer trained on the bundled corpus, by path.
    --plan and the smoke test build it tiny, on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from tuneforge import data as bundled
    from tuneforge.trainers.model import train_tokenizer

    if (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        return
    docs = [p.strip() for p in bundled.bundled("demo_corpus").read_text().split("\n\n") if p.strip()]
    tok = train_tokenizer(docs, ARCH["vocab_size"], min_frequency=2)
    config = LlamaConfig(**ARCH, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    with torch.device("cpu" if SMOKE or PLAN else "cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    if not (SMOKE or PLAN):
        torch.cuda.empty_cache()


def gpu_facts():
    if PLAN or SMOKE:
        return "(plan only)" if PLAN else "(smoke test on CPU)", os.environ.get("PEAK_TFLOPS")
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False)")
    name = torch.cuda.get_device_name(0)
    peak = os.environ.get("PEAK_TFLOPS") or next((str(v) for k, v in PEAKS if k in name), None)
    return name, peak


def overrides(base: Path, backend: str, method: str, peak) -> list:
    run_dir = WORK / "runs" / f"{backend}-{method}"
    extra = [f"cluster.peak_tflops={peak}"] if peak else []
    if os.environ.get("COMPILE") == "1":
        extra.append("train.compile=true")
    return ["model=hf", f"model.name_or_path={base}", f"method={method}", f"backend={backend}",
            "data=demo_corpus", "logger=none", "cluster=local", "cluster.tasks_per_node=1",
            f"cluster.gpus_per_node={0 if SMOKE or PLAN else 1}", "train.dtype=bf16", f"train.seq_len={SEQ}", f"train.micro_batch={MICRO}",
            f"train.global_batch={MICRO}", f"train.max_steps={STEPS}", "train.warmup_steps=2",
            "train.checkpoint_every=0", "train.lr=1e-4", f"run.dir={run_dir}", *extra]


def cli(args, timeout=None):
    """The CLI in its own process group: on a time-out the training process it started dies with it."""
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge.launch.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def reason(text: str) -> str:
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    problems = [l for l in lines if not l.startswith("tuneforge:")]
    return (problems[0] if problems else (lines[-1] if lines else "?"))[:110]


def run_one(backend, method, base, peak) -> dict:
    args = overrides(base, backend, method, peak)
    dry = cli(["--dry-run", *args], timeout=60)
    if dry.returncode:
        return {"status": "unavailable: " + reason(dry.stderr)}
    if PLAN:
        return {"status": "ok (composes and validates)"}
    left = BUDGET_S - (time.time() - START)
    if left < 30:
        return {"status": "skipped: time budget spent"}
    t0 = time.time()
    run_dir = WORK / "runs" / f"{backend}-{method}"
    try:
        out = cli(args, timeout=min(240.0, left))
    except subprocess.TimeoutExpired:
        return {"status": f"failed: timed out after {time.time() - t0:.0f} s"}
    finally:  # GBs of checkpoint and export per run: the disk would not hold nine of them
        for heavy in ("checkpoints", "final"):
            shutil.rmtree(run_dir / heavy, ignore_errors=True)
    if out.returncode:
        logs = sorted((run_dir / "slurm").glob("*_0_log.err"))
        text = logs[-1].read_text() if logs else out.stderr
        errors = [l for l in text.splitlines() if re.search(r"(Error|error:|Exception)", l)]
        return {"status": "failed: " + (errors[-1].strip()[:110] if errors else reason(out.stderr)),
                "wall_s": time.time() - t0}
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > WARMUP] or records[-1:]
    step_s = statistics.median(r["step_time_s"] for r in timed)
    mfu = [r["mfu"] for r in timed if "mfu" in r]
    return {"status": "ok", "tokens_per_s": MICRO * SEQ / step_s, "step_s": step_s,
            "mfu": statistics.median(mfu) if mfu else None,
            "peak_memory_gb": max(r.get("peak_memory_mb", 0.0) for r in records) / 1024,
            "loss": records[-1]["loss"], "wall_s": time.time() - t0}


def main():
    base = WORK / "base-1b"
    name, peak = gpu_facts()
    build_base(base)
    print(f"== GPU: {name}; peak {peak or 'measured by each run'} TFLOP/s bf16; work dir {WORK}", flush=True)
    rows = []
    for method in METHODS:
        for backend in BACKENDS:
            result = run_one(backend, method, base, peak)
            rows.append({"backend": backend, "method": method, **result})
            print(f"   {backend:>5} x {method:<5} {result['status']}"
                  + (f"  ({result['wall_s']:.0f} s)" if "wall_s" in result else ""), flush=True)
    header = "| backend | method | tokens/s | MFU | peak memory (GB) | step (s) | status |"
    lines = [header, "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        ok = r["status"] == "ok"
        lines.append(f"| {r['backend']} | {r['method']} | {r['tokens_per_s']:.0f} | "
                     f"{'-' if r.get('mfu') is None else format(r['mfu'], '.1%')} | {r['peak_memory_gb']:.1f} | "
                     f"{r['step_s']:.3f} | ok |" if ok else f"| {r['backend']} | {r['method']} | - | - | - | - | {r['status']} |")
    title = (f"~1B Llama (hidden 2048, 16 layers, vocab 32000), seq {SEQ}, micro batch {MICRO}, bf16, 1 GPU "
             f"({name}), {STEPS} steps, median of steps after {WARMUP}; MFU vs {peak or 'a measured'} TFLOP/s bf16"
             f"{', train.compile=true' if os.environ.get('COMPILE') == '1' else ''}")
    table = "\n".join(lines)
    print("\n" + title + "\n" + table, flush=True)
    if not (PLAN or SMOKE):
        day = datetime.date.today().isoformat()
        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
        out = Path("benchmarks/results") / f"gpu_check_{day}_{slug}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# GPU check, {day}, {name}\n\n{title}\n\n{table}\n")
        print(f"\nwritten to {out} (commit it)")
    print(json.dumps({"gpu": name, "peak_tflops": peak, "rows": rows}))


main()
PY
