"""The task every rank runs: distributed env -> build -> train -> close. Setup in dependency order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict


def run(cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    from tuneforge.conf.schema import PEFT_METHODS
    from tuneforge.slurm.env import close_distributed, init_distributed
    from tuneforge.trainers import backends, data, data_sources, metrics, model
    from tuneforge.trainers.checkpoint import Checkpoints
    from tuneforge.trainers.export import write_final
    from tuneforge.trainers.logging import RunLogger
    from tuneforge.trainers.loop import Trainer
    from tuneforge.trainers.methods import apply_method
    from tuneforge.trainers.tokenize import chat_template

    cfg = OmegaConf.create(cfg_dict)
    run_dir, t = Path(cfg.run.dir), cfg.train
    dist_env = init_distributed(cfg.cluster)
    if dist_env.device == "cpu":
        from tuneforge.trainers.allocator import keep_freed_memory

        keep_freed_memory()  # big tensors reused, not page-faulted back every step
    logger, finished = None, False
    try:
        tokenizer = model.load_tokenizer(cfg.model, cfg.method, lambda: data_sources.texts(cfg.data), run_dir, dist_env)
        if cfg.data.format == "chat":  # saved with final/: inference renders chats as training did
            tokenizer.chat_template = chat_template(cfg.data, tokenizer)
        # flash attention reads packed examples from the position ids of a single row only
        flatten = cfg.model.attn_implementation.startswith("flash")
        run_data = data.build(cfg.data, t, tokenizer, dist_env, flatten_packed=flatten)
        dtype = backends.model_dtype(cfg.backend, t.dtype, peft=cfg.method.name in PEFT_METHODS)
        net = model.load_model(cfg.model, cfg.method, tokenizer, dtype, dist_env.device, t.seed)
        net, method_hooks = apply_method(net, cfg.method, total_steps=t.max_steps, seed=t.seed)
        counts = {**model.count_parameters(net), **metrics.matmul_parameters(net)}
        if dist_env.is_main:
            print(f"parameters: {counts['params_trainable']:,} trainable of {counts['params_total']:,}", flush=True)
        if t.compile:  # before the backend wraps the blocks: its hooks stay outside the compiled graphs
            from tuneforge.trainers.compile import compile_blocks

            compile_blocks(net)
        engine = backends.prepare(net, cfg.backend, t, dist_env)
        preflight = run_dir / "preflight.json"  # the launcher's estimate, logged with the config (W&B)
        run_config = {**cfg_dict, "preflight": json.loads(preflight.read_text())} if preflight.is_file() else cfg_dict
        logger = RunLogger(cfg.logger, run_dir, run_config, enabled=dist_env.is_main)
        logger.summary(
            {
                **counts,
                "world_size": dist_env.world_size,
                "num_nodes": dist_env.num_nodes,
                "master_addr": dist_env.master_addr,
                "job_id": dist_env.job_id,
                **run_data.stats,
            }
        )
        flops = metrics.flops_per_token(
            net.config, counts["matmul_params_trainable"], counts["matmul_params_total"], t.seq_len
        )
        peak = metrics.device_peak_tflops(
            cfg.cluster.peak_tflops, net.config, t.micro_batch * t.seq_len, dist_env.device, run_dir, dist_env.is_main
        )
        logger.summary({**peak, "flops_per_token": flops})
        trainer = Trainer(
            engine,
            run_data.train,
            t,
            dist_env,
            Checkpoints(run_dir, dist_env.rank, t.keep_checkpoints),
            logger,
            flops,
            eval_batches=run_data.validation,
            hooks=method_hooks,
            peak_tflops=peak["peak_tflops"],
        )
        result = trainer.train()
        if result["stopped"] is None:
            write_final(engine, tokenizer, run_dir / "final", dist_env.is_main)
        result["peak_memory_mb"] = metrics.peak_memory_mb(dist_env.device)
        result["peak_memory_mb_per_rank"] = metrics.gather_per_rank(result["peak_memory_mb"])
        logger.summary(result)
        finished = True
        return {**result, "rank": dist_env.rank, "world_size": dist_env.world_size}
    finally:
        if logger is not None:
            logger.close()
        engine = trainer = net = None  # noqa: F841 (their gloo work goes before the process group)
        close_distributed(finished)
