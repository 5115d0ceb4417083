"""What trains: `apply_method(model, method_cfg) -> model` marks (or adds) the trainable weights."""
from __future__ import annotations

import torch


def apply_method(model: torch.nn.Module, method_cfg) -> torch.nn.Module:
    """Full finetuning and pretraining train every weight; PEFT methods wrap the model with peft."""
    if method_cfg.name in ("full", "pretrain"):
        model.requires_grad_(True)
        return model
    raise ValueError(f"method.name: unknown method '{method_cfg.name}'")
