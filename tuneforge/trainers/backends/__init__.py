"""Backends wrap a model and its optimizer; the training loop only sees the `Engine` protocol.

Contract shared by every backend (the loss math itself lives in trainers/optim.py):
- `backward(loss)`: `loss` is this rank's share of the global mean loss (its summed token losses
  divided by the token count of the whole global batch). Summed over micro batches and ranks, the
  gradients must equal the gradient of the global mean; each backend undoes its own averaging.
- `step(lr, grad_clip) -> grad_norm`: set the LR, clip the global grad norm (0: no clipping), step,
  zero the grads; returns the norm before clipping.
- `save(dir)` / `load(dir)`: collective; the backend's own (possibly sharded) state of model and
  optimizer inside `dir`.
- `full_state_dict()`: collective; the full model weights on rank 0 (None elsewhere), for export.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Protocol

import torch


class Engine(Protocol):
    model: torch.nn.Module  # call this for the forward pass
    module: torch.nn.Module  # the unwrapped (Hugging Face / PEFT) model

    def accumulate(self, last_micro_batch: bool) -> ContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, lr: float, grad_clip: float) -> float: ...
    def save(self, directory) -> None: ...
    def load(self, directory) -> None: ...
    def full_state_dict(self) -> Optional[dict]: ...


def prepare(model: torch.nn.Module, backend_cfg, train_cfg, dist_env) -> Engine:
    """Wrap `model` for `backend_cfg.name`; the module of each backend is imported only when used."""
    if backend_cfg.name == "ddp":
        from tuneforge.trainers.backends.ddp import DDPEngine

        return DDPEngine(model, backend_cfg, train_cfg, dist_env)
    raise ValueError(f"backend.name: unknown backend '{backend_cfg.name}'")


def no_context() -> ContextManager:
    return contextlib.nullcontext()
