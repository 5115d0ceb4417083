"""The only file of trainers/sharded/ that reads tuneforge's configs: turns them into the plain arguments
of the builders and exporters. The hooks in task.py, backends/, model.py and export.py call these.

Which runs load sharded (`sharded_backend`): backend=fsdp and the DeepSpeed options of stage 3 (zero3,
zero3_offload), for every method but QLoRA (bitsandbytes quantises while transformers loads: that path
keeps a 4-bit copy of the whole base per rank and no full-precision one) and AdaLoRA (refused on those
backends). A model given by path is read from its safetensors; a model built from its config
(model=tiny, method=pretrain) gets init.py's initialisation, which every backend uses (also ddp and
zero1/2, through `dense_pretrain_model`). `model.new_tokens` grows the embeddings while filling
(resize.py), as trainers/vocab.py does on a whole model. TUNEFORGE_SHARDED_LOAD=0 turns sharded loading
off (the old path: every rank loads the whole model, then the backend shards it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from tuneforge.compat.transformers import renames_checkpoint_on_load
from tuneforge.conf import methods
from tuneforge.conf.backends import backend


def enabled() -> bool:
    return os.environ.get(methods.SHARDED_LOAD_ENV, "1") != "0"


def sharded_backend(backend_cfg, method_cfg, model_type: Optional[str] = None) -> Optional[str]:
    """ "fsdp", "zero3", or None (the run loads the whole model on every rank): conf/methods.py `loads_sharded`,
    unless transformers renames the family's checkpoint while loading (compat/transformers.py)."""
    if not methods.loads_sharded(method_cfg.name, backend_cfg):
        return None
    if model_type and renames_checkpoint_on_load(model_type):
        return None
    return "fsdp" if backend(backend_cfg).family == "fsdp" else "zero3"


def weights_dir(model_cfg, method_cfg) -> Optional[str]:
    """The local directory whose safetensors are read, or None to initialise at random."""
    from tuneforge.trainers.model import builds_from_config

    if builds_from_config(model_cfg, method_cfg):
        return None
    path = Path(str(model_cfg.name_or_path)).expanduser()
    if path.is_dir():
        return str(path)
    import torch.distributed as dist
    from huggingface_hub import snapshot_download  # a hub id: the files every rank reads, downloaded once

    patterns = ["*.json", "*.safetensors"]
    if dist.get_rank() == 0:
        snapshot_download(str(model_cfg.name_or_path), allow_patterns=patterns)
    dist.barrier()
    return snapshot_download(str(model_cfg.name_or_path), allow_patterns=patterns, local_files_only=True)


def load_sharded(model_cfg, method_cfg, backend_cfg, train_cfg, dist_env, tokenizer, dtype: str, old_vocab: int):
    """(model, method hooks, LoadStats, new rows) for a run that `sharded_backend` says loads sharded.

    `old_vocab`: the tokenizer's size before model.new_tokens were added (trainers/vocab.py); the
    embeddings get rows for the added tokens, the mean of the old rows, as `vocab.resize_model` gives them."""
    from tuneforge.conf import ds_config
    from tuneforge.trainers import model as model_mod
    from tuneforge.trainers.methods import apply_method
    from tuneforge.trainers.sharded import resize

    kind = sharded_backend(backend_cfg, method_cfg)
    config = model_mod.model_config(model_cfg, tokenizer)
    weights = weights_dir(model_cfg, method_cfg)
    peft = methods.is_peft(method_cfg.name)
    torch_dtype = model_mod.DTYPES[dtype]
    added = 0
    if weights is not None and tokenizer is not None and len(tokenizer) > old_vocab:
        from tuneforge.trainers.sharded.meta import build_meta_model
        from tuneforge.trainers.sharded.safetensors_io import ShardedCheckpoint

        checkpoint = ShardedCheckpoint(weights)
        skeleton = build_meta_model(config, torch_dtype, trust_remote_code=model_cfg.trust_remote_code)
        from tuneforge.trainers.sharded.fill import checkpoint_key

        keys = [checkpoint_key(skeleton, checkpoint, n) for n in resize.embedding_names(skeleton)]
        device = dist_env.device if dist_env.device.startswith("cuda") else "cpu"
        means = resize.row_means(
            checkpoint, keys, old_vocab, torch_dtype, dist_env.rank, dist_env.world_size, device=device
        )
        added = len(tokenizer) - old_vocab
        weights = resize.ResizedRows(checkpoint, means, old_vocab, len(tokenizer))
        config = resize.resized_config(config, len(tokenizer))

    def wrap(model):
        return apply_method(model, method_cfg, total_steps=train_cfg.max_steps, seed=train_cfg.seed)

    common = dict(
        weights=weights,
        seed=train_cfg.seed,
        wrap=wrap if peft else None,
        attn_implementation=model_mod.attn_implementation(model_cfg, config),
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if kind == "fsdp":
        from tuneforge.trainers.backends.fsdp import shard_model
        from tuneforge.trainers.sharded.fsdp import build_fsdp_model

        def shard(model):
            if train_cfg.compile:  # before fully_shard renames the block classes; hooks stay outside the graphs
                from tuneforge.trainers.compile import compile_blocks

                compile_blocks(model)
            shard_model(model, backend_cfg, train_cfg, dist_env)

        # under CPU offload the shards live in host memory (FSDP2 moves each unit to the GPU for compute)
        device = "cpu" if backend_cfg.cpu_offload else dist_env.device
        net, hooks, stats = build_fsdp_model(
            config, dtype=torch_dtype, device=device, buffer_device=dist_env.device, shard=shard, **common
        )
    elif kind == "zero3":
        from tuneforge.trainers.backends.deepspeed import import_deepspeed
        from tuneforge.trainers.sharded.zero3 import build_zero3_model

        import_deepspeed(dist_env.device)
        # the parameter dtype is DeepSpeed's (bf16/fp16 when train.dtype says so), as the engine casts it
        net, hooks, stats = build_zero3_model(
            config, ds_config=ds_config.merged(backend_cfg, train_cfg, dist_env.world_size), **common
        )
        if train_cfg.compile:
            from tuneforge.trainers.compile import compile_blocks

            compile_blocks(net)
    else:
        raise ValueError(f"backend {backend_cfg.name} does not load sharded")
    if not peft:
        net, hooks = apply_method(net, method_cfg, total_steps=train_cfg.max_steps, seed=train_cfg.seed)
    net.config.use_cache = False
    if dist_env.is_main:
        mib = 2**20
        source = (
            f"read {stats.bytes_read / mib:.1f} of {stats.checkpoint_bytes / mib:.1f} MiB"
            if weights is not None
            else f"initialised {stats.bytes_generated / mib:.1f} MiB"
        )
        print(f"sharded load ({kind}): rank 0 {source} in {stats.seconds:.1f} s", flush=True)
    return net, hooks, stats, added


def dense_pretrain_model(
    config, dtype: torch.dtype, seed: int, attn_implementation=None, trust_remote_code=False, device: str = "cpu"
) -> torch.nn.Module:
    """A whole model with init.py's initial values (pretraining on ddp, zero1/2, or world size 1)."""
    from tuneforge.trainers.sharded.init import dense_initialized
    from tuneforge.trainers.sharded.meta import build_meta_model

    model = build_meta_model(config, dtype, attn_implementation, trust_remote_code)
    return dense_initialized(model, seed, device=device)


def exports_sharded(engine) -> bool:
    """Whether `engine` holds sharded weights (FSDP2, ZeRO-3): final/ is then written tensor by tensor."""
    from tuneforge.trainers.sharded.export import is_sharded_model

    model_type = getattr(getattr(engine.module, "config", None), "model_type", None)
    return is_sharded_model(engine.module) and not (model_type and renames_checkpoint_on_load(model_type))


def exports_offline_sharded(backend_cfg, method_cfg, model_type: Optional[str] = None) -> bool:
    """`tuneforge export` of a full (or pretraining) run's checkpoint saved by fsdp or DeepSpeed: read
    tensor by tensor instead of building the whole model and its whole state dict (not for a family
    whose checkpoint names transformers converts: save_pretrained writes those back)."""
    if model_type and renames_checkpoint_on_load(model_type):
        return False
    return enabled() and not methods.is_peft(method_cfg.name) and backend(backend_cfg).family in ("fsdp", "deepspeed")


def export_checkpoint_sharded(
    model_cfg, backend_cfg, engine_dir, out_dir, tokenizer, old_vocab: int, max_shard_size: str = "5GB"
) -> None:
    """One process: <engine_dir> (DCP or ZeRO) -> a Hugging Face directory, one block (DCP) or one
    tensor (ZeRO) in memory at a time. `old_vocab`: as for `load_sharded` (the config gets the run's rows)."""
    from tuneforge.trainers import model as model_mod
    from tuneforge.trainers.sharded import export, resize
    from tuneforge.trainers.sharded.meta import build_meta_model

    config = model_mod.model_config(model_cfg, tokenizer)
    if model_cfg.kind == "hf" and len(tokenizer) > old_vocab:
        config = resize.resized_config(config, len(tokenizer))
    skeleton = build_meta_model(config, torch.float32, trust_remote_code=model_cfg.trust_remote_code)
    if backend(backend_cfg).family == "fsdp":
        entries = export.dcp_entries(engine_dir)
        read = lambda ordered: export.dcp_tensors(engine_dir, ordered)  # noqa: E731
    else:
        from tuneforge.trainers.backends.deepspeed import TAG, import_deepspeed

        import_deepspeed()
        entries = export.zero_entries(engine_dir, TAG)
        read = lambda ordered: export.zero_tensors(engine_dir, TAG, ordered)  # noqa: E731
    export.export_offline(skeleton, entries, read, out_dir, tokenizer, max_shard_size=max_shard_size)
