"""Hugging Face model directories from a trained engine: `final/` at the end of a run, and export."""
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
