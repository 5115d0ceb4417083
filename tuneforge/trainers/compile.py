"""train.compile: torch.compile (inductor) of the transformer blocks and of the loss.

Why these two and not the whole model in one graph: every block has the same code and shapes, so
one compiled graph serves all of them (compile time does not grow with depth), and the compiled
region stays inside the block's forward: the module hooks that DDP, FSDP2 and DeepSpeed ZeRO-3
attach to a block (all-gather before, reshard after) keep running eagerly around it. The loss is
the other place where eager PyTorch wastes time: it materialises the full logits in fp32 and again
for log-softmax and its gradient; compiled, the cast, the log-sum-exp and the gradient fuse.
Measured on the 2-core CPU (45M Llama, seq 512, batch 4, bf16; benchmarks/levers.py): blocks alone
~1.05-1.3x the eager step, blocks + loss ~1.35-1.45x (~1.1x once trainers/allocator.py has removed
most of what eager mode wastes in page faults); compiling the whole model in one graph was no faster
and took twice as long to compile.

Compiled code is cached on disk (inductor's FX-graph and AOT-autograd caches), under
$TORCHINDUCTOR_CACHE_DIR, by default ~/.cache/tuneforge/inductor: a cold compile costs 30-60 s on
the CPU, a cached one a few seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from tuneforge.compat.transformers import block_class_names
from tuneforge.trainers.optim import token_loss_sum

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/tuneforge/inductor"


def use_cache_dir() -> str:
    """Point inductor's on-disk caches at our directory unless the user chose one."""
    return os.environ.setdefault(CACHE_ENV, str(Path(DEFAULT_CACHE_DIR).expanduser()))


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile the forward of every transformer block in place; returns how many were compiled.

    Only `forward` is replaced (not `__call__`), so hooks registered on the block, before or after
    this, run outside the compiled graph."""
    use_cache_dir()
    names = set(block_class_names(model))
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return len(blocks)


def loss_function(compiled: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """optim.token_loss_sum, compiled or not (the same maths)."""
    if not compiled:
        return token_loss_sum
    use_cache_dir()
    return torch.compile(token_loss_sum)
