"""The benchmarks run (in their short modes), so they cannot rot. Never asserts on speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_throughput_quick_prints_its_figures_as_one_json_line(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("tuneforge_tokens_per_s", "hf_trainer_tokens_per_s", "ratio", "mfu_bf16"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert result["ratio"] == pytest.approx(
        result["tuneforge_tokens_per_s"] / result["hf_trainer_tokens_per_s"], rel=1e-2
    )
    # tuneforge's own step records carry MFU and peak memory
    records = [json.loads(line) for line in (tmp_path / "tuneforge-0" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] > 0 and r["peak_memory_mb"] > 0 for r in records)


@pytest.mark.slow
def test_gpu_check_plan_composes_every_combination(tmp_path):
    """Without a GPU, --plan composes and validates the 9 combinations; the ones this checkout
    lacks are reported as unavailable instead of crashing the script."""
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--plan"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "GPU_CHECK_DIR": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    assert {(r["backend"], r["method"]) for r in rows} == {
        (b, m) for b in ("ddp", "fsdp", "zero3") for m in ("full", "lora", "qlora")
    }
    assert next(r for r in rows if (r["backend"], r["method"]) == ("ddp", "full"))["status"].startswith("ok")
    assert all(r["status"].startswith(("ok", "unavailable: ")) for r in rows)


@pytest.mark.slow
def test_mixture_quick_reports_shares_and_the_cost_of_mixing(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mixture.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "TUNEFORGE_DATA_CACHE": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["shares"]) == {
        f"{m}_{mode}"
        for m in ("cricket75_general25", "cricket95_general5", "three_sources")
        for mode in ("cached", "streaming")
    }
    for figures in result["shares"].values():
        assert sum(figures["realised"]) == pytest.approx(1.0, abs=1e-4) and len(figures["realised"]) == len(
            figures["weights"]
        )
    assert result["train_tokens_per_s"]["single"] > 0 and result["train_tokens_per_s"]["mixture"] > 0
