"""The training loop: one for every method and backend.

Per optimizer step: count the target tokens of the whole global batch; for each micro batch run
forward, sum the token losses and back-propagate that sum divided by the global token count; then
clip, step and log. Checkpoints at `checkpoint_every`, at a requested stop, and at the end.
The validation loss (when there is validation data) is taken every `eval_every` steps and at the
end, token-normalised over all ranks with the same token_loss_sum, and at step 0 (train.eval_on_start);
the eval prompts are answered then too (trainers/generate.py, samples.jsonl), and the run ends with the
before/after table.

A micro batch is a dict: `labels` for the loss, everything else (input_ids, and position_ids or
attention_mask: see trainers/data.py) passed to the model as keyword arguments.
The method's hooks (trainers/methods.py) add its extra loss terms and run around the optimizer step.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from tuneforge.conf.schema import DebugConfig, TrainConfig
from tuneforge.trainers import metrics
from tuneforge.trainers.compile import loss_function
from tuneforge.trainers.distributed import DistEnv, StopFlag, agreed_stop
from tuneforge.trainers.optim import counted_tokens, lr_at, token_loss_sum


class Trainer:
    def __init__(
        self,
        engine,
        batches,
        train_cfg: TrainConfig,
        debug_cfg: DebugConfig,
        dist_env: DistEnv,
        stop: StopFlag,
        checkpoints,
        logger,
        throughput: metrics.Throughput,
        eval_batches=None,
        hooks=None,
        after_first_step=None,
        sampler=None,
    ):
        from tuneforge.trainers.methods import MethodHooks

        self.engine, self.batches, self.train_cfg, self.debug = engine, batches, train_cfg, debug_cfg
        self.eval_batches = eval_batches  # data.EvalBatches, or None: no validation loss
        self.sampler = sampler  # trainers/generate.Sampler, or None: no prompts to answer
        self.hooks = hooks or MethodHooks()
        self.after_first_step = after_first_step  # called once, after this process's first step (start-up times)
        self.dist_env, self.stop, self.checkpoints, self.logger = dist_env, stop, checkpoints, logger
        self.throughput = throughput
        self.loss_fn = loss_function(compiled=train_cfg.compile)  # optim.token_loss_sum
        self.step = 0
        self.tokens_seen = 0
        self.tokens_by_source: dict = {}  # target tokens seen of each source of a mixture
        self.memory_measured = False  # model-state bytes are measured once per process (preflight check)

    def resume(self) -> None:
        """Continue from the run dir's latest checkpoint, if any (restart, requeue, preemption)."""
        latest = self.checkpoints.latest()
        if latest is not None:
            state = self.checkpoints.load(latest, self.engine)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.tokens_by_source = dict(state.get("tokens_by_source", {}))
            if "data" in state:  # the sampler position (and the data it belongs to) of this rank
                self.batches.load_state_dict(state["data"], self.step)
            self.hooks.load(self.engine.module, latest)  # the method's own state (AdaLoRA's allocator)
        # steps logged after the checkpoint are replayed (with no checkpoint, step 0's evaluation too)
        self.logger.truncate_after(self.step if latest is not None else -1)
        if latest is None:
            return
        if self.dist_env.is_main:
            print(f"resumed from {latest} at step {self.step}", flush=True)

    def train(self) -> dict:
        self.resume()
        self.engine.model.train()  # from_pretrained returns a model in eval mode: dropout would be off
        t = self.train_cfg
        last: dict = {}
        if self.step == 0 and t.eval_on_start:
            self.evaluate_at_start()
        while self.step < t.max_steps:
            last = self.train_step()
            if self.after_first_step is not None:
                self.after_first_step()
                self.after_first_step = None
            if self.debug.step_sleep_s:
                time.sleep(self.debug.step_sleep_s)
            evaluate = (
                self.eval_batches is not None
                and t.eval_every > 0
                and (self.step % t.eval_every == 0 or self.step == t.max_steps)
            )
            if evaluate:
                last.update(self.evaluate())
            if evaluate or self.step % t.log_every == 0 or self.step == t.max_steps:
                self.logger.log(last, step=self.step)
            if self.sampler is not None and self._sampling_due():
                self.sample()
            stop = self._stop_requested()
            if stop or (t.checkpoint_every and self.step % t.checkpoint_every == 0) or self.step == t.max_steps:
                self.save()
            if stop:
                return {"step": self.step, "stopped": stop, **last}
        if last:
            self.report_before_after()
        return {"step": self.step, "stopped": None, **last}

    def train_step(self) -> dict:
        start, cpu_start = time.perf_counter(), time.process_time()
        device = self.dist_env.device
        micro_batches = list(self.batches.micro_batches(self.step))
        # target tokens of the global batch (and of each source of a mixture: one all-reduce for both)
        names = getattr(self.batches, "source_names", ())
        local_tokens = torch.tensor(
            [float(sum(counted_tokens(batch["labels"]) for batch in micro_batches))]
            + [float(n) for n in getattr(self.batches, "source_tokens", ())]
        )
        counts = _all_reduce(local_tokens.clone()).tolist()
        global_tokens = counts[0]
        for name, n in zip(names, counts[1:]):
            self.tokens_by_source[name] = self.tokens_by_source.get(name, 0) + int(n)
        local_inputs = sum(batch["input_ids"].numel() for batch in micro_batches)  # what the FLOPs are spent on
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no sync per micro batch
        # A method's extra terms (same value on every rank) count once per optimizer step: each micro
        # batch of each rank back-propagates its share, as the LM loss does.
        extra_share = 1.0 / (len(micro_batches) * self.dist_env.world_size)
        extra_values: dict = {}
        for i, batch in enumerate(micro_batches):
            inputs = {k: v.to(device) for k, v in batch.items()}
            labels = inputs.pop("labels")
            with self.engine.accumulate(last_micro_batch=i == len(micro_batches) - 1):
                logits = self.engine.model(**inputs).logits
                micro_loss = self.loss_fn(logits, labels)
                objective = micro_loss / global_tokens
                for name, term in self.hooks.extra_losses(self.engine.module).items():
                    objective = objective + term * extra_share
                    extra_values[name] = term.detach()
                self.engine.backward(objective)
            loss_sum += micro_loss.detach().double()
        lr = lr_at(self.step, self.train_cfg)
        grads_held = None if self.memory_measured else metrics.grad_bytes(self.engine)
        self.hooks.before_step(self.engine.module)
        grad_norm = self.engine.step(lr, self.train_cfg.grad_clip)
        if grads_held is not None:
            self._log_model_state_bytes(grads_held)
        loss = _all_reduce(loss_sum.cpu()).item() / global_tokens
        self.step += 1
        extra_values = {name: float(value) for name, value in extra_values.items()}
        extra_values.update(self.hooks.after_step(self.engine.module, self.step))
        self.tokens_seen += int(global_tokens)
        elapsed = time.perf_counter() - start
        tokens_per_s = global_tokens / elapsed
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "step_time_s": elapsed,
            # CPU seconds of all this process's threads: on a GPU, host work per step; on a shared CPU,
            # the cost of a step that neighbours' load does not inflate the way it inflates step_time_s
            "cpu_time_s": time.process_time() - cpu_start,
            "tokens_seen": self.tokens_seen,
            **{f"tokens_seen/{name}": n for name, n in self.tokens_by_source.items()},
            **self.throughput.figures(local_inputs, elapsed),
            "peak_memory_mb": metrics.peak_memory_mb(device),
            **extra_values,
        }

    def _log_model_state_bytes(self, grads_held: int) -> None:
        """Bytes of params, grads and optimizer state per rank, after the first step (summary.json)."""
        self.memory_measured = True
        mine = metrics.model_state_bytes(self.engine, grads_held)
        ranks = [None] * self.dist_env.world_size
        dist.all_gather_object(ranks, mine)
        self.logger.summary({**mine, "mem_per_rank": ranks})

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss: summed token losses over every rank's validation rows / their target tokens;
        a mixture's sources each the same way over their own rows (eval_loss/<name>)."""
        model, device = self.engine.model, self.dist_env.device
        names = self.eval_batches.names
        model.eval()
        totals = torch.zeros(1 + len(names), 2, dtype=torch.float64)  # loss sum, target tokens: all, each source
        for source, batch in self.eval_batches.by_source():
            inputs = {k: v.to(device) for k, v in batch.items()}
            labels = inputs.pop("labels")
            loss_sum = token_loss_sum(model(**inputs).logits, labels).double().cpu()
            part = torch.stack([loss_sum, torch.tensor(float(counted_tokens(labels)), dtype=torch.float64)])
            totals[0] += part
            if source is not None:
                totals[1 + source] += part
        model.train()
        totals = _all_reduce(totals).tolist()
        out = {"eval_loss": totals[0][0] / max(totals[0][1], 1.0), "eval_tokens": int(totals[0][1])}
        for name, (loss_sum, tokens) in zip(names, totals[1:]):
            out.update({f"eval_loss/{name}": loss_sum / max(tokens, 1.0), f"eval_tokens/{name}": int(tokens)})
        return out

    # ------------------------------------------------------------------ before and after
    def evaluate_at_start(self) -> None:
        """Step 0, before any training: the validation loss and the prompts' answers (the "before")."""
        if self.eval_batches is not None:
            self.logger.log(self.evaluate(), step=0)
        if self.sampler is not None:
            self.sample()

    def _sampling_due(self) -> bool:
        t = self.train_cfg
        return self.step == t.max_steps or (t.eval_every > 0 and self.step % t.eval_every == 0)

    def sample(self) -> None:
        """Collective: every rank answers the prompts in step; rank 0 writes samples.jsonl."""
        self.logger.samples(self.step, self.sampler.answer(self.engine.model, self.dist_env.device))

    def report_before_after(self) -> None:
        """Rank 0, at the end: the answers and losses before and after, in the log and as a W&B Table."""
        from tuneforge.trainers import samples

        if not self.dist_env.is_main or not (self.sampler is not None or self.eval_batches is not None):
            return
        paired = samples.paired(self.logger.run_dir)
        if paired.rows or paired.eval_loss_before is not None:
            print("before and after training:\n" + samples.render(paired), flush=True)
        self.logger.table("before_after", list(samples.COLUMNS), [list(r.values()) for r in paired.rows])

    def save(self) -> None:
        self.checkpoints.save(
            self.step,
            self.engine,
            {"step": self.step, "tokens_seen": self.tokens_seen, "tokens_by_source": self.tokens_by_source},
            rank_state={"data": self.batches.state_dict(self.step)},
            write_extra=lambda directory: self.hooks.save(self.engine, directory, self.dist_env.is_main),
        )

    def _stop_requested(self) -> Optional[str]:
        """Agree across ranks: stop if any rank got a signal, or at debug.stop_after."""
        stop_after = self.debug.stop_after
        if stop_after is not None and stop_after <= self.step < self.train_cfg.max_steps:
            self.stop.request("stop_after")
        return agreed_stop(self.stop)


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor (NCCL only reduces GPU tensors)."""
    if dist.get_backend() == "nccl":
        on_gpu = tensor.cuda()
        dist.all_reduce(on_gpu, op=op)
        return on_gpu.cpu()
    dist.all_reduce(tensor, op=op)
    return tensor
