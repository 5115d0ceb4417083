"""DistributedDataParallel: a full replica on every rank, gradients all-reduced (averaged).

With one rank there is nothing to all-reduce, and the DDP wrapper still copies every gradient into
its buckets and back: the model then runs unwrapped (on the 2-core CPU the wrapper cost 7-8% of a
45M-Llama step while neighbours loaded the machine, ~1% when it was quiet)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from tuneforge.conf.backends import DDPConfig
from tuneforge.conf.schema import TrainConfig
from tuneforge.trainers.optim import clip_grad_norm, make_optimizer, set_lr

STATE_FILE = "ddp_state.pt"  # rank 0 writes it: every replica is identical


def make_engine(model: torch.nn.Module, backend_cfg: DDPConfig, train_cfg: TrainConfig, dist_env) -> "DDPEngine":
    return DDPEngine(model, backend_cfg, train_cfg, dist_env)


def read_full_state_dict(engine_dir: Path, module: torch.nn.Module) -> dict:
    """The saved (trainable) weights; frozen ones are the module's own."""
    saved = torch.load(Path(engine_dir) / STATE_FILE, map_location="cpu", weights_only=True)["model"]
    return {**module.state_dict(), **saved}


class DDPEngine:
    def __init__(self, model: torch.nn.Module, backend_cfg: DDPConfig, train_cfg: TrainConfig, dist_env):
        self.module = model
        self.world_size = dist_env.world_size
        self.model = (
            model
            if self.world_size == 1
            else DistributedDataParallel(
                model,
                device_ids=[dist_env.local_rank] if dist_env.device != "cpu" else None,
                bucket_cap_mb=backend_cfg.bucket_cap_mb,
                find_unused_parameters=backend_cfg.find_unused_parameters,
            )
        )
        self.optimizer = make_optimizer(model, train_cfg)
        self.rank = dist_env.rank

    def accumulate(self, last_micro_batch: bool):
        # Gradients are all-reduced once, with the last micro batch.
        if last_micro_batch or self.world_size == 1:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over ranks; the loss is this rank's share of a global sum.
        (loss * self.world_size).backward()

    def step(self, lr: float, grad_clip: float) -> float:
        set_lr(self.optimizer, lr)
        norm = clip_grad_norm([p for p in self.module.parameters() if p.requires_grad], grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, directory: Path) -> None:
        if self.rank == 0:  # every replica is identical
            state = {"model": _trainable_state(self.module), "optimizer": self.optimizer.state_dict()}
            torch.save(state, Path(directory) / STATE_FILE)

    def load(self, directory: Path) -> None:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        missing = self.module.load_state_dict(state["model"], strict=False)
        unexpected = missing.unexpected_keys
        if unexpected:
            raise RuntimeError(f"checkpoint has weights this model lacks: {unexpected[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self) -> Optional[dict]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()} if self.rank == 0 else None


def _trainable_state(module: torch.nn.Module) -> dict:
    """Trainable weights and buffers: frozen base weights (PEFT) are re-read from the base model on resume.
    Entries that are neither (the quantisation state bitsandbytes adds for frozen 4-bit weights) are left out."""
    params = dict(module.named_parameters())
    buffers = {name for name, _ in module.named_buffers()}
    return {k: v for k, v in module.state_dict().items() if k in buffers or (k in params and params[k].requires_grad)}
