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
    if dist_env.device == "cpu":
        from tuneforge.trainers.allocator import keep_freed_memory

        keep_freed_memory()  # big tensors reused, not page-faulted back every step
    logger = None
    try:
        docs = data.read_documents(cfg.data)
        tokenizer = model.load_tokenizer(cfg.model, cfg.method, lambda: docs, run_dir, dist_env)
        rows = data.pack_documents(docs, tokenizer, t.seq_len)
        batches = data.GlobalBatches(rows, t.global_batch, t.micro_batch, t.seed, dist_env.rank, dist_env.world_size)
        net = model.load_model(cfg.model, cfg.method, tokenizer, t.dtype, dist_env.device, t.seed)
        net = apply_method(net, cfg.method)
        counts = {**model.count_parameters(net), **metrics.matmul_parameters(net)}
        if t.compile:  # before the backend wraps the blocks: its hooks stay outside the compiled graphs
            from tuneforge.trainers.compile import compile_blocks

            compile_blocks(net)
        engine = backends.prepare(net, cfg.backend, t, dist_env)
        logger = RunLogger(cfg.logger, run_dir, cfg_dict, enabled=dist_env.is_main)
        logger.summary({**counts, "world_size": dist_env.world_size, "num_nodes": dist_env.num_nodes,
                        "master_addr": dist_env.master_addr, "rows": len(rows), "job_id": dist_env.job_id})
        flops = metrics.flops_per_token(net.config, counts["matmul_params_trainable"], counts["matmul_params_total"],
                                        t.seq_len)
        peak = metrics.device_peak_tflops(cfg.cluster.peak_tflops, net.config, t.micro_batch * t.seq_len,
                                          dist_env.device, run_dir, dist_env.is_main)
        logger.summary({**peak, "flops_per_token": flops})
        trainer = Trainer(engine, batches, t, dist_env, Checkpoints(run_dir, dist_env.rank, t.keep_checkpoints),
                          logger, flops, peak_tflops=peak["peak_tflops"])
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
