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
    steps = [r for r in records if r["step"] > 0]  # step 0: the evaluation before training (train.eval_on_start)
    assert steps and all(r["mfu"] > 0 and r["peak_memory_mb"] > 0 for r in steps)


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


@pytest.mark.slow
def test_adapters_quick_compares_lora_and_qlora_with_hf_peft_and_full_training(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "adapters.py"), "--quick", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for method in ("lora", "qlora"):
        entry = result["methods"][method]
        for key in ("tuneforge_tokens_per_s", "hf_peft_tokens_per_s", "ratio", "mfu_bf16_cpu_basis"):
            assert entry[key] > 0, (method, key)
        assert entry["ratio"] == pytest.approx(
            entry["tuneforge_tokens_per_s"] / entry["hf_peft_tokens_per_s"], rel=1e-2
        )
        # the same adapter on the same rows: as many trainable weights, and the same loss curve up to
        # bf16 rounding and the two sides' different dropout masks
        assert entry["params_trainable"]["tuneforge"] == entry["params_trainable"]["hf"]
        assert len(entry["loss_tuneforge"]) == len(entry["loss_hf"]) == result["steps"]
        assert entry["loss_max_rel_diff"] < 0.02
    assert result["lora_vs_full"] > 0 and result["full_tokens_per_s"] > 0


@pytest.mark.slow
def test_startup_quick_reports_the_phases_of_both_jobs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--quick", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for job in ("default", "lora"):
        entry = result[job]
        assert entry["data_cache"] == ["hit"]  # the warm-up run filled it
        assert 0 < entry["first_step_start_s"] <= entry["time_to_first_step_s"]
        assert list(entry["phases_s"])[0] == "imports" and list(entry["phases_s"])[-1] == "first step"
    assert "method" in result["lora"]["phases_s"] and "method" not in result["default"]["phases_s"]


@pytest.mark.slow
def test_data_prep_quick_measures_every_side_on_text_and_jsonl(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "data_prep.py"), "--quick", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["sizes"]) == {"1MB_txt", "1MB_jsonl"}
    for row in result["sizes"].values():
        for side in ("tuneforge", "datasets", "stream"):
            assert row[side]["mb_per_s"] > 0 and row[side]["peak_rss_mb"] > 0 and row[side]["rows"] > 0
        # the same tokens end to end: tuneforge packs (rows padded at the end), datasets drops the remainder
        assert abs(row["tuneforge"]["rows"] - row["datasets"]["rows"]) <= 0.05 * row["datasets"]["rows"] + 1
        # the streaming reader packs windows alone (a row cut at each window's end): a few more rows
        assert row["stream"]["tokens_per_s"] > 0
        assert row["tuneforge"]["rows"] <= row["stream"]["rows"] <= 1.05 * row["tuneforge"]["rows"] + 8
