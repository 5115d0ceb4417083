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

Every backend also has a module-level `read_full_state_dict(engine_dir, module)`: the same full
weights read from a saved `engine/` folder in ONE process without a process group, whatever the
world size that wrote it (`tuneforge export`).

Weights are exported in the precision training keeps them: with train.dtype=bf16, `ddp` trains bf16
weights, while `fsdp` and DeepSpeed keep fp32 master weights and compute in bf16 (the model is then
built in fp32, see conf/backends.py `model_dtype`; a PEFT method's frozen base stays in train.dtype).

Which module implements a backend option is its description's `family` (conf/backends.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ContextManager, Optional, Protocol

from tuneforge.conf.backends import BackendConfig, backend
from tuneforge.conf.schema import TrainConfig

if TYPE_CHECKING:
    import torch


class Engine(Protocol):
    model: "torch.nn.Module"  # call this for the forward pass
    module: "torch.nn.Module"  # the unwrapped (Hugging Face / PEFT) model

    def accumulate(self, last_micro_batch: bool) -> ContextManager: ...
    def backward(self, loss: "torch.Tensor") -> None: ...
    def step(self, lr: float, grad_clip: float) -> float: ...
    def save(self, directory) -> None: ...
    def load(self, directory) -> None: ...
    def full_state_dict(self) -> Optional[dict]: ...


def prepare(model: "torch.nn.Module", backend_cfg: BackendConfig, train_cfg: TrainConfig, dist_env) -> Engine:
    """Wrap `model` for `backend_cfg.name`. Activation checkpointing is set up here, for every backend."""
    model.train()  # from_pretrained returns eval mode; checkpointing and dropout need training mode
    if train_cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    return _module(backend_cfg).make_engine(model, backend_cfg, train_cfg, dist_env)


def read_full_state_dict(backend_cfg: BackendConfig, engine_dir, module: "torch.nn.Module") -> dict:
    """Full weights from a checkpoint's engine/ folder, in this process alone (no process group)."""
    return _module(backend_cfg).read_full_state_dict(engine_dir, module)


def enable_activation_checkpointing(model: "torch.nn.Module") -> None:
    """Recompute each transformer block in the backward (transformers' own checkpointing).

    Non-reentrant torch checkpointing: works under DDP (no "marked ready twice"), FSDP2 (the block
    is re-gathered by its pre-forward hook) and ZeRO-3 (parameters fetched again by DeepSpeed's hooks),
    and needs no input that requires grad (PEFT with frozen embeddings).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.activation_checkpointing: {type(model).__name__} does not support it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _module(backend_cfg: BackendConfig):
    import importlib

    return importlib.import_module(f"tuneforge.trainers.backends.{backend(backend_cfg).family}")
