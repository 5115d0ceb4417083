"""The optimisation math that every backend shares: optimizer, LR schedule, token-normalised loss.

Kept in one place so that no backend or method can drift from it (torchtune #2307).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tuneforge.compat.torch import scale_in_place
from tuneforge.conf.schema import TrainConfig, warmup_steps
from tuneforge.data.tokenize import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the tokens whose label is not IGNORE_INDEX.

    The trainer divides the sum by the number of counted tokens in the whole global batch (all micro
    batches of all ranks), so every token weighs the same whatever the accumulation and world size.
    """
    logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def counted_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the chosen decay.

    A pure function of the step: resuming needs no scheduler state beyond the step itself.
    """
    warmup = warmup_steps(train)
    if step < warmup:
        return train.lr * (step + 1) / warmup
    if train.schedule == "constant":
        return train.lr
    progress = (step - warmup) / max(1, train.max_steps - warmup)
    progress = min(1.0, progress)
    floor = train.lr * train.min_lr_ratio
    if train.schedule == "linear":
        return floor + (train.lr - floor) * (1 - progress)
    return floor + (train.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Trainable parameters only, split so that biases and norms get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the LR is set by the trainer every step.

    The fused implementation (one kernel for every tensor's update) where all trainable weights allow
    it (floating point, on CPU or CUDA), else torch's default (foreach). Same AdamW maths either way.
    """
    groups = param_groups(model, train.weight_decay)
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=1e-8, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale the gradients so that their global L2 norm is at most `max_norm` (0: no clipping);
    returns the norm before clipping. The same maths as torch.nn.utils.clip_grad_norm_, without its
    extra pass when nothing is clipped (it multiplies every gradient by a coefficient clamped to 1)
    and with the coefficient as a plain number (on CPU its tensor-scalar multiply took ~5% of a
    45M-Llama step under memory-bandwidth contention; within noise on a quiet machine). One host sync
    per step for the norm, which the trainer logs anyway."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(torch.nn.utils.get_total_norm(grads))
    coef = max_norm / (norm + 1e-6)
    if max_norm > 0 and coef < 1.0:
        scale_in_place(grads, coef)
    return norm
