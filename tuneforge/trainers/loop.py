"""The training loop: one for every method and backend.

Per optimizer step: count the target tokens of the whole global batch; for each micro batch run
forward, sum the token losses and back-propagate that sum divided by the global token count; then
clip, step and log. Checkpoints at `checkpoint_every`, at a requested stop, and at the end.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from tuneforge.trainers import metrics
from tuneforge.trainers.compile import loss_function
from tuneforge.trainers.optim import counted_tokens, lr_at

#: set by a signal handler or by train.stop_after; the ranks agree on it at a step boundary
_STOP_REQUESTED = {"reason": None}


def request_stop(reason: str) -> None:
    _STOP_REQUESTED["reason"] = reason


class Trainer:
    def __init__(self, engine, batches, train_cfg, dist_env, checkpoints, logger, flops_per_token: float,
                 peak_tflops: Optional[float] = None):
        self.engine, self.batches, self.train_cfg = engine, batches, train_cfg
        self.dist_env, self.checkpoints, self.logger = dist_env, checkpoints, logger
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops  # dense bf16 TFLOP/s of one device, for MFU; None: no MFU
        self.loss_fn = loss_function(compiled=train_cfg.compile)  # optim.token_loss_sum
        self.step = 0
        self.tokens_seen = 0

    def resume(self) -> None:
        """Continue from the run dir's latest checkpoint, if any (restart, requeue, preemption)."""
        latest = self.checkpoints.latest()
        if latest is None:
            return
        state = self.checkpoints.load(latest, self.engine)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.logger.truncate_after(self.step)  # steps after the checkpoint are replayed
        if self.dist_env.is_main:
            print(f"resumed from {latest} at step {self.step}", flush=True)

    def train(self) -> dict:
        self.resume()
        t = self.train_cfg
        last: dict = {}
        while self.step < t.max_steps:
            last = self.train_step()
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self.logger.log(last, step=self.step)
            stop = self._stop_requested()
            if stop or (t.checkpoint_every and self.step % t.checkpoint_every == 0) or self.step == t.max_steps:
                self.save()
            if stop:
                return {"step": self.step, "stopped": stop, **last}
        return {"step": self.step, "stopped": None, **last}

    def train_step(self) -> dict:
        start, cpu_start = time.perf_counter(), time.process_time()
        device = self.dist_env.device
        micro_batches = list(self.batches.micro_batches(self.step))
        local_tokens = torch.tensor(float(sum(counted_tokens(labels) for _, labels in micro_batches)))
        global_tokens = _all_reduce(local_tokens.clone()).item()
        local_inputs = sum(input_ids.numel() for input_ids, _ in micro_batches)  # what the FLOPs are spent on
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no sync per micro batch
        for i, (input_ids, labels) in enumerate(micro_batches):
            input_ids, labels = input_ids.to(device), labels.to(device)
            with self.engine.accumulate(last_micro_batch=i == len(micro_batches) - 1):
                logits = self.engine.model(input_ids=input_ids).logits
                micro_loss = self.loss_fn(logits, labels)
                self.engine.backward(micro_loss / global_tokens)
            loss_sum += micro_loss.detach().double()
        lr = lr_at(self.step, self.train_cfg)
        grad_norm = self.engine.step(lr, self.train_cfg.grad_clip)
        loss = _all_reduce(loss_sum.cpu()).item() / global_tokens
        self.step += 1
        self.tokens_seen += int(global_tokens)
        elapsed = time.perf_counter() - start
        tokens_per_s = global_tokens / elapsed
        tflops_per_rank = local_inputs * self.flops_per_token / elapsed / 1e12
        perf = {"mfu": tflops_per_rank / self.peak_tflops} if self.peak_tflops else {}
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
            "tflops_per_rank": tflops_per_rank,
            **perf,
            "peak_memory_mb": metrics.peak_memory_mb(device),
        }

    def save(self) -> None:
        self.checkpoints.save(self.step, self.engine, {"step": self.step, "tokens_seen": self.tokens_seen})

    def _stop_requested(self) -> Optional[str]:
        """Agree across ranks: stop if any rank got a signal, or at train.stop_after."""
        if self.train_cfg.stop_after is not None and self.step >= self.train_cfg.stop_after and self.step < self.train_cfg.max_steps:
            request_stop("stop_after")
        flag = torch.tensor(1.0 if _STOP_REQUESTED["reason"] else 0.0)
        if _all_reduce(flag, op=dist.ReduceOp.MAX).item() > 0:
            return _STOP_REQUESTED["reason"] or "signal-on-another-rank"
        return None


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor (NCCL only reduces GPU tensors)."""
    if dist.get_backend() == "nccl":
        on_gpu = tensor.cuda()
        dist.all_reduce(on_gpu, op=op)
        return on_gpu.cpu()
    dist.all_reduce(tensor, op=op)
    return tensor
