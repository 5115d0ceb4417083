"""Hugging Face model directories from a trained engine: `final/` at the end of a run, and export.

For PEFT methods `final/` holds the adapter (PeftModel.save_pretrained writes only the adapter) and the
tokenizer; `export_adapter_run` merges it into the base model for `tuneforge export`."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_final(engine, tokenizer, out_dir: Path, is_main: bool) -> None:
    """Collective: gather the full weights, then rank 0 writes <out_dir> atomically (temp + rename)."""
    import torch.distributed as dist

    state_dict = engine.full_state_dict()
    if is_main:
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    dist.barrier()


# ------------------------------------------------------------------------------ PEFT runs: tuneforge export
ADAPTER_CONFIG = "adapter_config.json"


class ExportError(ValueError):
    """A run directory that has nothing to export at the requested step."""


def adapter_dir(run_dir: Path, step=None) -> Path:
    """The adapter of a PEFT run: final/ (or the latest checkpoint's before the run ends), or step N's."""
    run_dir = Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    if step is None:
        if (run_dir / "final" / ADAPTER_CONFIG).is_file():
            return run_dir / "final"
        pointer = checkpoints / "latest"
        if pointer.is_file():
            return checkpoints / pointer.read_text().strip() / "adapter"
        raise ExportError(f"{run_dir}: no final/ and no checkpoint yet")
    path = checkpoints / f"step_{step}" / "adapter"
    if not (path / ADAPTER_CONFIG).is_file():
        steps = sorted(int(p.parent.parent.name[5:]) for p in checkpoints.glob(f"step_*/adapter/{ADAPTER_CONFIG}"))
        raise ExportError(f"{run_dir}: no adapter for step {step}; checkpoints with one: {steps or 'none'}")
    return path


def is_adapter_run(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / "final" / ADAPTER_CONFIG).is_file() or any(
        (run_dir / "checkpoints").glob(f"step_*/adapter/{ADAPTER_CONFIG}"))


def export_adapter_run(run_dir: Path, step=None, out=None) -> str:
    """Merge a PEFT run's adapter into its base model and write a Hugging Face model directory (with the
    tokenizer) to `out`; for an adapter that cannot be merged, copy the adapter there instead. Returns the
    one-line account of what was written. Default `out`: <run dir>/export/final (or /step_N)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    source = adapter_dir(run_dir, step)
    out = Path(out) if out else run_dir / "export" / (source.name if source.name == "final" else source.parent.name)
    config = PeftConfig.from_pretrained(str(source))
    method = _run_method(run_dir) or str(config.peft_type).lower()
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    base_path = config.base_model_name_or_path
    tokenizer_source = source if (source / "tokenizer_config.json").is_file() else base_path

    merged, why_not = None, None
    if config.is_prompt_learning:
        why_not = "its virtual tokens are not weights of the base model"
    else:
        # QLoRA's base is reloaded unquantized: the merged model is full precision, not 4-bit.
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
        model = PeftModel.from_pretrained(base, str(source))
        try:
            merged = model.merge_and_unload()
        except (AttributeError, NotImplementedError, ValueError) as e:
            why_not = f"peft cannot merge it ({e})"
    if merged is None:
        shutil.copytree(source, tmp)
        _replace(tmp, out)
        return (f"method={method} cannot be merged into the base model: {why_not}. Wrote the adapter only, to {out} "
                f"(load it with PeftModel.from_pretrained(<{base_path}>, '{out}'))")
    merged.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(tmp))
    _replace(tmp, out)
    note = " (into the full-precision base: the 4-bit one is not merged into)" if method == "qlora" else ""
    return f"merged the method={method} adapter of {source} into {base_path}{note}: wrote a Hugging Face model to {out}"


def _replace(tmp: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _run_method(run_dir: Path):
    try:
        from omegaconf import OmegaConf

        return OmegaConf.load(run_dir / "config.yaml").method.name
    except Exception:  # noqa: BLE001 - a copied adapter dir without the run's config: peft's type is shown
        return None
