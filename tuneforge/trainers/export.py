"""Hugging Face model directories: `final/` at the end of a run, and `tuneforge export` from a checkpoint.

Both write the same thing the same way (`save_model_dir`): the model's config, its full weights as
safetensors, and the tokenizer, into a temp directory renamed into place. `final/` takes the weights
from the live engine (`engine.full_state_dict()`, collective); export reads them from a checkpoint's
engine/ folder in one process (`backends.read_full_state_dict`), so it works from any backend and
any world size, on a machine without the cluster.

For PEFT methods `final/` holds the adapter (PeftModel.save_pretrained writes only the adapter) and the
tokenizer; `export_adapter_run` merges it into the base model for `tuneforge export`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from tuneforge import fsutil, layout
from tuneforge.conf.schema import Config, ModelConfig


def write_final(engine, tokenizer, out_dir: Path, is_main: bool, max_shard_size: str = "5GB") -> None:
    """Collective: gather the full weights, then rank 0 writes <out_dir> atomically (temp + rename).
    A sharded model (FSDP2, ZeRO-3; not an adapter) is gathered and written one tensor at a time
    (trainers/sharded/export.py): rank 0 never holds more than one tensor beyond the file being written."""
    import torch.distributed as dist

    from tuneforge.trainers.sharded import glue as sharded

    if sharded.exports_sharded(engine) and not hasattr(engine.module, "peft_config"):
        from tuneforge.trainers.sharded.export import write_model_dir

        return write_model_dir(engine.module, out_dir, tokenizer, is_main, max_shard_size)
    state_dict = engine.full_state_dict()
    if is_main:
        save_model_dir(engine.module, tokenizer, out_dir, state_dict, max_shard_size)
    dist.barrier()


def save_model_dir(
    module, tokenizer, out_dir: Path, state_dict: Optional[dict] = None, max_shard_size: str = "5GB"
) -> None:
    """<out_dir>: config + safetensors (+ tokenizer), replaced atomically; files of at most `max_shard_size`."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    weights_dtype = _weights_dtype(state_dict) if state_dict is not None else None
    # (save_pretrained empties state_dict)
    module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size=max_shard_size)
    if weights_dtype is not None and (tmp / "config.json").is_file():  # a PEFT model writes adapter_config.json
        _set_config_dtype(tmp / "config.json", weights_dtype)
    tokenizer.save_pretrained(tmp)
    inference_ready(tmp)
    fsutil.replace_dir(tmp, out_dir)


def run_tokenizer(tokenizer, data_cfg):
    """The tokenizer as the run used it: a chat run's carries the chat template it rendered its data with
    (data.chat_template, the tokenizer's own, or the default), so that every model dir it writes (final/,
    exports of any checkpoint) renders chats as training did (`apply_chat_template`, lm_eval)."""
    from tuneforge.conf.schema import source_views
    from tuneforge.data.tokenize import chat_template

    if any(view.format == "chat" for view in source_views(data_cfg)):  # a mixture with a chat source too
        tokenizer.chat_template = chat_template(data_cfg, tokenizer)
    return tokenizer


#: tokenizers without a length of their own say this (transformers' VERY_LARGE_INTEGER)
_UNSET_LENGTH = int(1e29)


def inference_ready(model_dir: Path) -> None:
    """What a written model dir needs for inference, whatever wrote it: use_cache true in config.json
    (training turns the KV cache off), and the tokenizer's model_max_length set (the model's
    max_position_embeddings when the tokenizer had none)."""
    import json

    model_dir = Path(model_dir)
    config_path, tok_path = model_dir / "config.json", model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config and config.get("use_cache") is not True:
        config["use_cache"] = True
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    positions = config.get("max_position_embeddings") or (config.get("text_config") or {}).get(
        "max_position_embeddings"
    )
    if not tok_path.is_file() or not positions:
        return
    tok = json.loads(tok_path.read_text())
    length = tok.get("model_max_length")
    if not isinstance(length, (int, float)) or length >= _UNSET_LENGTH:
        tok["model_max_length"] = int(positions)
        tok_path.write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n")


def _weights_dtype(state_dict: dict) -> Optional[str]:
    """The most common floating dtype of the weights, as config.json spells it ("float32")."""
    floating = [t.dtype for t in state_dict.values() if hasattr(t, "is_floating_point") and t.is_floating_point()]
    return str(max(set(floating), key=floating.count)).split(".")[1] if floating else None


def _set_config_dtype(config_path: Path, dtype: str) -> None:
    """save_pretrained records the module's dtype; the weights may be fp32 masters of a bf16 module
    (DeepSpeed casts the module). from_pretrained's dtype="auto" reads this field: make it the weights'."""
    import json

    config = json.loads(config_path.read_text())
    if config.get("dtype") != dtype:
        config["dtype"] = dtype
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_checkpoint(cfg: Config, step_dir: Path, out_dir: Path, max_shard_size: Optional[str] = None) -> None:
    """The model of checkpoint <step_dir> as a Hugging Face directory <out_dir>, in this process.

    The model is built as the run built it (same config, dtype and method), then the checkpoint's
    full weights are loaded into it: a name or shape that does not match fails here, not at load time.
    A full run's FSDP2 or DeepSpeed checkpoint is read one block (DCP) or one tensor (ZeRO) at a time
    instead (trainers/sharded/export.py). Files of at most `max_shard_size` (default: run.max_shard_size).
    """
    max_shard_size = max_shard_size or cfg.run.max_shard_size
    import torch
    from transformers import AutoTokenizer

    from tuneforge.conf.backends import model_dtype
    from tuneforge.conf.methods import is_peft
    from tuneforge.trainers import backends, model, vocab
    from tuneforge.trainers.methods import apply_method

    run_dir = Path(step_dir).parent.parent
    tokenizer = AutoTokenizer.from_pretrained(
        _tokenizer_source(cfg.model, run_dir), trust_remote_code=cfg.model.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    run_tokenizer(tokenizer, cfg.data)
    old_vocab = vocab.extend_tokenizer(tokenizer, cfg.model)  # the run's model.new_tokens, as the task added them
    from tuneforge.trainers.sharded import glue as sharded

    model_type = model.model_config(cfg.model, tokenizer).model_type
    if sharded.exports_offline_sharded(cfg.backend, cfg.method, model_type):  # never the whole model in memory
        return sharded.export_checkpoint_sharded(
            cfg.model, cfg.backend, Path(step_dir) / "engine", out_dir, tokenizer, old_vocab, max_shard_size
        )
    dtype = model_dtype(cfg.backend, cfg.train.dtype, peft=is_peft(cfg.method.name))
    net = model.load_model(cfg.model, cfg.method, tokenizer, dtype, "cpu", cfg.train.seed)
    if not model.builds_from_config(cfg.model, cfg.method):
        vocab.resize_model(net, tokenizer, old_vocab)
    net, _ = apply_method(net, cfg.method, total_steps=cfg.train.max_steps, seed=cfg.train.seed)
    state = backends.read_full_state_dict(cfg.backend, Path(step_dir) / "engine", net)
    with torch.no_grad():
        result = net.load_state_dict(state, strict=False)
    if result.unexpected_keys or result.missing_keys:
        raise RuntimeError(
            f"checkpoint {step_dir} does not fit the run's model: unexpected "
            f"{result.unexpected_keys[:3]}, missing {result.missing_keys[:3]}"
        )
    save_model_dir(net, tokenizer, out_dir, max_shard_size=max_shard_size)


def _tokenizer_source(model_cfg: ModelConfig, run_dir: Path) -> str:
    """Where the run's tokenizer lives, in model.load_tokenizer's order: model.tokenizer, the loaded
    model's own, else the one trained on the corpus into <run dir>/tokenizer."""
    source = model_cfg.tokenizer or (model_cfg.name_or_path if model_cfg.kind == "hf" else None)
    if source:
        return source
    if not (run_dir / "tokenizer" / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{run_dir / 'tokenizer'}: the run's trained tokenizer is missing")
    return str(run_dir / "tokenizer")


# ------------------------------------------------------------------------------ PEFT runs: tuneforge export
ADAPTER_CONFIG = "adapter_config.json"


class ExportError(ValueError):
    """A run directory that has nothing to export at the requested step."""


def adapter_dir(run_dir: Path, step=None) -> Path:
    """The adapter of a PEFT run: final/ (or the latest checkpoint's before the run ends), or step N's."""
    run_dir = Path(run_dir)
    if step is None:
        if (run_dir / layout.FINAL / ADAPTER_CONFIG).is_file():
            return run_dir / layout.FINAL
        latest = layout.latest(run_dir)
        if latest is not None:
            return latest / layout.ADAPTER
        raise ExportError(f"{run_dir}: no final/ and no checkpoint yet")
    path = layout.step_dir(run_dir, step) / layout.ADAPTER
    problem = layout.verify(path.parent)
    if problem and path.parent.is_dir():
        raise ExportError(
            f"{run_dir}: checkpoint step_{step} {problem}; complete ones: {layout.steps(run_dir) or 'none'}"
        )
    if not (path / ADAPTER_CONFIG).is_file():
        steps = [layout.step_of(p) for p in layout.steps(run_dir) if (p / layout.ADAPTER / ADAPTER_CONFIG).is_file()]
        raise ExportError(f"{run_dir}: no adapter for step {step}; checkpoints with one: {steps or 'none'}")
    return path


def is_adapter_run(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / "final" / ADAPTER_CONFIG).is_file() or any(
        (run_dir / "checkpoints").glob(f"step_*/adapter/{ADAPTER_CONFIG}")
    )


def export_adapter_run(run_dir: Path, step=None, out=None, max_shard_size: str = "5GB") -> str:
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
        fsutil.replace_dir(tmp, out)
        return (
            f"method={method} cannot be merged into the base model: {why_not}. Wrote the adapter only, to {out} "
            f"(load it with PeftModel.from_pretrained(<{base_path}>, '{out}'))"
        )
    merged.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    run_cfg = _run_config(run_dir)
    if run_cfg is not None:
        run_tokenizer(tokenizer, run_cfg.data)
    tokenizer.save_pretrained(str(tmp))
    inference_ready(tmp)
    fsutil.replace_dir(tmp, out)
    note = " (into the full-precision base: the 4-bit one is not merged into)" if method == "qlora" else ""
    return f"merged the method={method} adapter of {source} into {base_path}{note}: wrote a Hugging Face model to {out}"


def _run_config(run_dir: Path):
    """The run's config.yaml as a Config, or None for a copied adapter dir without it."""
    if not (Path(run_dir) / "config.yaml").is_file():
        return None
    from tuneforge.conf.schema import load

    return load(Path(run_dir) / "config.yaml")


def _run_method(run_dir: Path):
    try:
        from omegaconf import OmegaConf

        return OmegaConf.load(run_dir / "config.yaml").method.name
    except Exception:  # noqa: BLE001 - a copied adapter dir without the run's config: peft's type is shown
        return None
