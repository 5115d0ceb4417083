"""The task every rank runs: process group -> build -> train -> close. Setup in dependency order.

It is handed everything it does not build: the typed config, the distributed environment and the stop
flag (slurm/job.py makes both from submitit; slurm/ imports them from here, its only door into the
trainers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from tuneforge.conf.schema import Config, to_container
from tuneforge.trainers.distributed import DistEnv, StopFlag

__all__ = ["DistEnv", "StopFlag", "probe", "run"]

Phase = Callable[..., None]  # phase(name, detail="")


def _started(startup, logger, is_main: bool) -> None:
    from tuneforge.trainers.startup import describe

    values = startup.first_step_done()
    if values:
        logger.summary(values)
        if is_main:
            print(describe(values), flush=True)


def run(cfg: Config, dist_env: DistEnv, stop: StopFlag, phase: Optional[Phase] = None) -> Dict[str, Any]:
    """Train on this rank; `phase(name, detail)` is told each start-up step as it begins (the launcher shows them).

    The same announcements time the start-up (trainers/startup.py): printed and written to summary.json
    when the first step ends."""
    from tuneforge.trainers.startup import StartUp

    phase = StartUp(phase)  # before the imports below: they are part of the `imports` phase
    from tuneforge.conf import methods
    from tuneforge.conf.backends import model_dtype
    from tuneforge.data import pipeline, sources
    from tuneforge.trainers import backends, metrics, model, vocab
    from tuneforge.trainers.checkpoint import Checkpoints
    from tuneforge.trainers.distributed import close_process_group, init_process_group
    from tuneforge.trainers.export import run_tokenizer, write_final
    from tuneforge.trainers.logging import RunLogger
    from tuneforge.trainers.loop import Trainer
    from tuneforge.trainers.methods import apply_method
    from tuneforge.trainers.sharded import glue as sharded

    run_dir, t = Path(cfg.run.dir), cfg.train
    phase("process group", f"{dist_env.world_size} rank(s)")
    init_process_group(dist_env, cfg.cluster.collective_timeout_s)
    if dist_env.device == "cpu":
        from tuneforge.trainers.allocator import keep_freed_memory

        keep_freed_memory()  # big tensors reused, not page-faulted back every step
    logger = trainer = engine = net = None
    finished = False
    try:
        phase("tokenizer")
        tokenizer = model.load_tokenizer(cfg.model, cfg.method, lambda: sources.texts(cfg.data), run_dir, dist_env)
        old_vocab = vocab.extend_tokenizer(tokenizer, cfg.model)  # model.new_tokens: before any text is tokenised
        run_tokenizer(tokenizer, cfg.data)  # a chat run's template, saved with final/ and every export
        # flash attention reads packed examples from the position ids of a single row only
        flatten = cfg.model.attn_implementation.startswith("flash")
        phase("data", cfg.data.name)
        run_data = pipeline.build(cfg.data, t, tokenizer, dist_env, flatten_packed=flatten)
        if "data_cache" in run_data.stats:
            phase.note(f"cache {run_data.stats['data_cache']}")
        peft = methods.is_peft(cfg.method.name)
        phase("model", cfg.model.name_or_path or f"{cfg.model.kind}, built from its config")
        dtype, added = model_dtype(cfg.backend, t.dtype, peft), 0
        model_type = model.model_config(cfg.model, tokenizer).model_type
        built_sharded = sharded.sharded_backend(cfg.backend, cfg.method, model_type)
        if built_sharded:  # no rank ever holds the whole model (trainers/sharded/)
            if peft:
                phase("method", cfg.method.name)  # applied as the model loads
            net, method_hooks, _, added = sharded.load_sharded(
                cfg.model, cfg.method, cfg.backend, t, dist_env, tokenizer, dtype, old_vocab
            )
            model.check_packing(cfg.data, net.config)
        else:
            net = model.load_model(cfg.model, cfg.method, tokenizer, dtype, dist_env.device, t.seed)
            if not model.builds_from_config(cfg.model, cfg.method):  # a built model has the new rows already
                added = vocab.resize_model(net, tokenizer, old_vocab)
            model.check_packing(cfg.data, net.config)
            if peft:
                phase("method", cfg.method.name)
            net, method_hooks = apply_method(net, cfg.method, total_steps=t.max_steps, seed=t.seed)
        if added and dist_env.is_main:
            print(f"vocabulary: {added} new token(s), embeddings resized to {len(tokenizer)}", flush=True)
        counts = model.count_parameters(net)
        sampler = _sampler(cfg, tokenizer, net, dist_env)  # before the backend shards the model
        if dist_env.is_main:
            attention = getattr(net.config, "_attn_implementation", None)
            print(
                f"parameters: {counts['params_trainable']:,} trainable of {counts['params_total']:,}; "
                f"attention: {attention}",
                flush=True,
            )
        if t.compile and not built_sharded:  # before the backend wraps the blocks: its hooks stay outside the graphs
            from tuneforge.trainers.compile import compile_blocks

            phase("compile", "wraps the blocks; their graphs are built in the first step")
            compile_blocks(net)
        phase("backend", cfg.backend.name)
        engine = backends.prepare(net, cfg.backend, t, dist_env)
        preflight = run_dir / "preflight.json"  # the launcher's estimate, logged with the config (W&B)
        run_config = to_container(cfg)
        if preflight.is_file():
            run_config["preflight"] = json.loads(preflight.read_text())
        phase("logger", cfg.logger.name)
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
        phase("GEMM ceiling")  # measured by the ranks together, for the MFU
        speed = metrics.Throughput.of(
            net, counts["params_trainable"] if peft else None, cfg.cluster, t, dist_env, run_dir
        )
        logger.summary(speed.summary())
        trainer = Trainer(
            engine,
            run_data.train,
            t,
            cfg.debug,
            dist_env,
            stop,
            Checkpoints(run_dir, dist_env.rank, t.keep_checkpoints),
            logger,
            speed,
            eval_batches=run_data.validation,
            hooks=method_hooks,
            after_first_step=lambda: _started(phase, logger, dist_env.is_main),
            sampler=sampler,
        )
        phase("first step")
        result = trainer.train()
        if result["stopped"] is None:
            write_final(engine, tokenizer, run_dir / "final", dist_env.is_main, cfg.run.max_shard_size)
        result["peak_memory_mb"] = metrics.peak_memory_mb(dist_env.device)
        result["peak_memory_mb_per_rank"] = metrics.gather_per_rank(result["peak_memory_mb"])
        logger.summary(result)
        finished = True
        return {**result, "rank": dist_env.rank, "world_size": dist_env.world_size}
    except (OSError, RuntimeError) as e:  # a full disk: one line saying so, and which checkpoint is kept
        from tuneforge.trainers.checkpoint import disk_full

        full = disk_full(e, run_dir)
        if full is None:
            raise
        raise full from None  # (the original traceback would hold the failed file, and its space, open)
    finally:
        if logger is not None:
            logger.close()
        engine = trainer = net = None  # noqa: F841 (their gloo work goes before the process group)
        close_process_group(finished)


def _sampler(cfg: Config, tokenizer, net, dist_env):
    """The prompts the run answers before, during and after training (trainers/generate.py), or None."""
    from tuneforge.trainers.generate import Sampler, prompt_view, prompts_of

    prompts = prompts_of(cfg.eval, cfg.data, cfg.train.seed, dist_env)
    if not prompts:
        return None
    positions = getattr(net.config, "max_position_embeddings", None) or cfg.train.seq_len
    return Sampler(prompts, prompt_view(cfg.data), tokenizer, cfg.train.seq_len, cfg.eval.max_new_tokens, positions)


def probe(cfg: Config, dist_env: DistEnv, stop: StopFlag, phase: Optional[Phase] = None) -> Dict[str, Any]:
    """What every rank of a `tuneforge probe` candidate runs: score the model on the data (trainers/probe.py)."""
    from tuneforge.trainers.probe import run as run_probe

    result = run_probe(cfg, dist_env, stop, phase or (lambda name, detail="": None))
    return {**result, "rank": dist_env.rank, "world_size": dist_env.world_size}
