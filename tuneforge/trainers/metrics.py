"""Throughput, FLOPs and memory figures logged by every run."""
from __future__ import annotations

import resource
import sys

import torch


def flops_per_token(config, trainable_params: int, total_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for a fully trained model (forward 2N, backward 4N), attention
    scores and values 12 x layers x hidden x seq_len. Frozen weights (PEFT) skip the weight-gradient
    half of their backward: 4N_frozen instead of 6N."""
    frozen = total_params - trainable_params
    dense = 6 * trainable_params + 4 * frozen
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return float(dense + attention)


def peak_memory_mb(device: str) -> float:
    """Peak memory of this rank: allocated CUDA memory on GPU, resident set size on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def gather_per_rank(value: float) -> list:
    """Collective: `value` of every rank, in rank order (for the run summary, written by rank 0)."""
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
