"""Time to first step: the default job and a LoRA job from a saved base, with a warm data cache, phase by phase.

    python benchmarks/startup.py            # 3 rounds of both jobs (after one warm-up run of each)
    python benchmarks/startup.py --quick    # 1 round: CI runs it so it cannot rot

Each job is the plain CLI in a fresh process (`python -m tuneforge.launch.cli ...`), as a user runs it:

  default  `tuneforge train.max_steps=2 run.dir=<dir>`: the shipped defaults (a tiny Llama pretrained
           from scratch on the bundled corpus, its tokenizer trained in the run, 2 CPU ranks, no compile)
  lora     `model=hf model.name_or_path=<the default job's final/> method=lora train.max_steps=2`: a
           LoRA finetune of a saved base loaded by path

The first run of each fills the token cache (a miss); the timed ones find it (a hit). The figures are
the run's own (trainers/startup.py, summary.json): the phases from the start of rank 0's process to
the end of its first step; and what the launcher took before that process started (composing and
validating the config, the preflight, submitit starting the ranks), from the command's start.

The last line printed is one JSON object: per job, the median time to the first step's start and end
(from rank 0's process start and from the command's start), the launcher's share, and the median of
every phase.
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round (CI)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work-dir", help="where the runs go (default: a new temp dir)")
    args = p.parse_args()
    rounds = 1 if args.quick else args.rounds
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tuneforge-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "WANDB_MODE": "offline",
    }
    say(f"load {load()}; work dir {work}")
    jobs = {"default": [], "lora": []}
    base = work / "warm-default" / "final"
    for r in range(-1, rounds):  # round -1: warm-up (fills the token cache; the default job's final/ is the base)
        for job in jobs:
            run_dir = work / (f"warm-{job}" if r < 0 else f"{job}-{r}")
            figures = run(job, run_dir, base, env)
            phases = ", ".join(f"{p['phase']} {p['seconds']:.2f}" for p in figures["phases"])
            say(
                f"{'warm-up' if r < 0 else f'round {r + 1}'} {job}: first step starts {figures['first_step_start_s']:.2f} s "
                f"after the process start ({figures['command_to_first_step_start_s']:.2f} s after the command), "
                f"ends {figures['time_to_first_step_s']:.2f} s; launcher {figures['launcher_s']:.2f} s; {phases}"
            )
            if r >= 0:
                jobs[job].append(figures)
    result = {"load": load(), "rounds": rounds}
    for job, runs in jobs.items():
        med = lambda key: round(statistics.median(x[key] for x in runs), 3)  # noqa: E731
        names = [p["phase"] for p in runs[0]["phases"]]
        result[job] = {
            "first_step_start_s": med("first_step_start_s"),
            "time_to_first_step_s": med("time_to_first_step_s"),
            "launcher_s": med("launcher_s"),
            "command_to_first_step_start_s": med("command_to_first_step_start_s"),
            "phases_s": {
                n: round(statistics.median(p["seconds"] for x in runs for p in x["phases"] if p["phase"] == n), 3)
                for n in names
            },
            "data_cache": [x["data_cache"] for x in runs],
        }
    for job in jobs:
        e = result[job]
        print(
            f"{job}: first step starts {e['first_step_start_s']:.2f} s after rank 0's process start "
            f"({e['command_to_first_step_start_s']:.2f} s after the command: launcher {e['launcher_s']:.2f} s), "
            f"ends {e['time_to_first_step_s']:.2f} s; data cache {','.join(e['data_cache'])}"
        )
        print("  " + ", ".join(f"{n} {s:.2f} s" for n, s in e["phases_s"].items()))
    print(json.dumps(result), flush=True)
    return 0


def run(job: str, run_dir: Path, base: Path, env: dict) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["train.max_steps=2", f"run.dir={run_dir}"]
    if job == "lora":
        args += ["model=hf", f"model.name_or_path={base}", "method=lora"]
    began = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "tuneforge.launch.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"{job} run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    launcher = summary["process_started_at"] - began
    data = next(p for p in summary["startup_phases"] if p["phase"] == "data")
    return {
        "phases": summary["startup_phases"],
        "first_step_start_s": summary["first_step_start_s"],
        "time_to_first_step_s": summary["time_to_first_step_s"],
        "launcher_s": round(launcher, 3),
        "command_to_first_step_start_s": round(launcher + summary["first_step_start_s"], 3),
        "data_cache": data["detail"].rsplit("cache ", 1)[-1],
    }


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
