"""The task every rank runs: distributed env -> build -> train -> close. Setup in dependency order."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict


def run(cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    from tuneforge.slurm.env import close_distributed, init_distributed
    from tuneforge.trainers import backends, data, metrics, model
    from tuneforge.trainers.checkpoint import Checkpoints
    from tuneforge.trainers.export import write_final
    from tuneforge.trainers.logging import RunLogger
    from tuneforge.trainers.loop import Trainer
    from tuneforge.trainers.methods import apply_method

    cfg = OmegaConf.create(cfg_dict)
    run_dir, t = Path(cfg.run.dir), cfg.train
    dist_env = init_distributed(cfg.cluster)
    logger = None
    try:
        docs = data.read_documents(cfg.data)
        tokenizer = model.load_tokenizer(cfg.model, cfg.method, lambda: docs, run_dir, dist_env)
        rows = data.pack_documents(docs, tokenizer, t.seq_len)
        batches = data.GlobalBatches(rows, t.global_batch, t.micro_batch, t.seed, dist_env.rank, dist_env.world_size)
        net = model.load_model(cfg.model, cfg.method, tokenizer, t.dtype, dist_env.device, t.seed)
        net, method_hooks = apply_method(net, cfg.method, total_steps=t.max_steps, seed=t.seed)
        counts = model.count_parameters(net)
        if dist_env.is_main:
            print(f"parameters: {counts['params_trainable']:,} trainable of {counts['params_total']:,}", flush=True)
        engine = backends.prepare(net, cfg.backend, t, dist_env)
        logger = RunLogger(cfg.logger, run_dir, cfg_dict, enabled=dist_env.is_main)
        logger.summary({**counts, "world_size": dist_env.world_size, "num_nodes": dist_env.num_nodes,
                        "master_addr": dist_env.master_addr, "rows": len(rows), "job_id": dist_env.job_id})
        flops = metrics.flops_per_token(net.config, counts["params_trainable"], counts["params_total"], t.seq_len)
        trainer = Trainer(engine, batches, t, dist_env, Checkpoints(run_dir, dist_env.rank, t.keep_checkpoints),
                          logger, flops, hooks=method_hooks)
        result = trainer.train()
        if result["stopped"] is None:
            write_final(engine, tokenizer, run_dir / "final", dist_env.is_main)
        result["peak_memory_mb"] = metrics.peak_memory_mb(dist_env.device)
        logger.summary(result)
        return {**result, "rank": dist_env.rank, "world_size": dist_env.world_size}
    finally:
        if logger is not None:
            logger.close()
        close_distributed()
