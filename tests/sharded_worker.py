"""One rank of a test of trainers/sharded/ (started N times by tests/test_sharded.py with RANK etc. set).

    python tests/sharded_worker.py <json: {"task", "backend", "method", "model", "dtype", "seed", "out"}>

Rank 0 writes what the test compares into <out>/result.pt; every rank writes <out>/rank<r>.json (its
LoadStats). The reference (a one-process from_pretrained) is computed by the test in its own process:
under ZeRO-3 transformers' global DeepSpeed config would partition it too.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

PROBE = torch.arange(48).view(2, 24)


def peft_config(method: str):
    import peft

    common = {"task_type": "CAUSAL_LM", "target_modules": "all-linear"}
    # random (not identity) adapter inits, so that a wrong adapter value changes the logits
    return {
        "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **common),
        "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, **common),
        "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False),
        "loha": lambda: peft.LoHaConfig(r=4, alpha=8, init_weights=False, **common),
        "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, init_weights=False, **common),
    }[method]()


def wrap_for(method: str, seed: int):
    if method in ("full", "pretrain"):
        return None

    def wrap(model):
        import peft

        torch.manual_seed(seed)
        return peft.get_peft_model(model, copy.deepcopy(peft_config(method)))

    return wrap


def ds_config(world: int) -> dict:
    return {
        "train_batch_size": 2 * world,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }


def main() -> None:
    args = json.loads(sys.argv[1])
    out = Path(args["out"])
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path("~/.cache/tuneforge/torch_extensions").expanduser()))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from transformers import AutoConfig

    from tuneforge.trainers.distributed import close_process_group
    from tuneforge.trainers.sharded import export

    dtype = getattr(torch, args.get("dtype", "float32"))
    config = AutoConfig.from_pretrained(args["model"])
    weights = None if args["method"] == "pretrain" else args["model"]
    wrap = wrap_for(args["method"], args.get("seed", 0))
    engine = None
    if args["task"] == "memory":  # RSS growth while loading, after a warm-up build of a 1-layer model
        memory_task(args, config, dtype, weights, out, rank, world)
        close_process_group(finished=True)
        return
    if args["backend"] == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        from tuneforge.trainers.sharded.fsdp import build_fsdp_model, shard_blocks

        mesh = init_device_mesh("cpu", (world,))
        model, _, stats = build_fsdp_model(
            config,
            dtype=dtype,
            shard=shard_blocks(mesh, ["LlamaDecoderLayer"]),
            weights=weights,
            seed=args.get("seed", 0),
            wrap=wrap,
        )
        forward = model
    elif args["backend"] == "zero3":
        import deepspeed

        from tuneforge.trainers.sharded.zero3 import build_zero3_model

        model, _, stats = build_zero3_model(
            config, ds_config=ds_config(world), weights=weights, seed=args.get("seed", 0), wrap=wrap
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(world), dist_init_required=False
        )
        forward = engine
    else:  # dense: world size 1 reference of the initialisation
        from tuneforge.trainers.sharded.init import dense_initialized
        from tuneforge.trainers.sharded.meta import build_meta_model

        model, stats = dense_initialized(build_meta_model(config, dtype), args.get("seed", 0)), None
        forward = model
    (out / f"rank{rank}.json").write_text(json.dumps(stats.__dict__ if stats else {}))
    forward.eval()
    with torch.no_grad():
        logits = forward(input_ids=PROBE).logits.float()
    result = {"logits": logits}
    if args.get("state"):  # every tensor, gathered one at a time (export.gather_state_dict)
        result["state"] = export.gather_state_dict(model, lambda n, t: True, rank == 0, dtype=None)
        result["tied"] = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        result["buffers"] = {n: b.clone() for n, b in model.named_buffers()}
    if args.get("export"):
        export.write_model_dir(model, out / "exported", is_main=rank == 0, max_shard_size=args["export"])
    if rank == 0:
        torch.save(result, out / "result.pt")
    engine = forward = model = None
    close_process_group(finished=True)  # as a job's task ends (barrier, collect, destroy)


def memory_task(args, config, dtype, weights, out: Path, rank: int, world: int) -> None:
    """Every module the build imports is imported by a first build of a tiny model of the same family
    (random init, a few hundred KB: nothing that the real build could reuse); then the real build is
    sampled (RSS every 10 ms)."""
    from tuneforge.trainers.sharded.memory import RssSampler

    def build(cfg, source):
        if args["backend"] == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            from tuneforge.trainers.sharded.fsdp import build_fsdp_model, shard_blocks

            mesh = init_device_mesh("cpu", (world,))
            return build_fsdp_model(cfg, dtype=dtype, shard=shard_blocks(mesh, ["LlamaDecoderLayer"]), weights=source)
        from tuneforge.trainers.sharded.zero3 import build_zero3_model

        return build_zero3_model(cfg, ds_config=ds_config(world), weights=source)

    small = copy.deepcopy(config)
    for key, value in dict(num_hidden_layers=1, vocab_size=256, hidden_size=64, intermediate_size=128).items():
        setattr(small, key, value)
    small.num_attention_heads, small.num_key_value_heads, small.head_dim = 4, 2, 16
    warm = build(small, None)
    warm = None  # noqa: F841
    dist.barrier()
    sampler = RssSampler(interval=0.01).start()
    model, _, stats = build(config, weights)
    sampler.mark("loaded")
    sampler.stop()
    dist.barrier()
    growth = sampler.peak("start", "loaded") - sampler.at("start")
    (out / f"rank{rank}.json").write_text(json.dumps({**stats.__dict__, "rss_growth": growth}))
    if rank == 0:
        torch.save({}, out / "result.pt")
    del model


if __name__ == "__main__":
    main()
