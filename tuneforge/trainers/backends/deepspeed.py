"""DeepSpeed ZeRO stages 1-3, optionally offloading optimizer state and parameters to CPU memory.

Processes come from submitit, not from the `deepspeed` launcher: `deepspeed.initialize` joins the
process group that slurm/env.py already made (gloo on CPU, NCCL on GPUs).

The DeepSpeed JSON comes from conf/ds_config.py (batch sizes, accumulation, clipping and
precision from `train`). The optimizer is ours: trainers/optim.make_optimizer's torch AdamW, which
ZeRO shards and which needs no compiled op; under optimizer offload DeepSpeedCPUAdam with the same
hyper-parameters, as DeepSpeed steps offloaded state on the CPU with it.

Loss contract: DeepSpeed divides the loss by the accumulation steps (unless scale_wrt_gas=False,
used here) and averages gradients over ranks; the loss we get is this rank's share of the global sum,
so it is multiplied by the world size, as for DDP. The accumulation boundary is set explicitly for
each micro batch, so one `engine.step()` per optimizer step is the update.

Compiled ops: DeepSpeed JIT-builds a shared-memory comm op at initialisation on CPU (~30-90 s the
first time) and DeepSpeedCPUAdam under offload. They are cached in TORCH_EXTENSIONS_DIR, which
defaults here to ~/.cache/tuneforge/torch_extensions (an existing TORCH_EXTENSIONS_DIR wins), so
that later runs start in seconds. Prebuilding at install also works:
DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 pip install --no-build-isolation deepspeed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import torch

from tuneforge.compat.deepspeed import full_numel
from tuneforge.conf import ds_config
from tuneforge.conf.backends import DeepSpeedConfig
from tuneforge.conf.schema import TrainConfig
from tuneforge.trainers.optim import make_optimizer, param_groups, set_lr

TAG = "zero"  # DeepSpeed's checkpoint tag: <engine dir>/zero/ holds its files
EXTENSIONS_DIR = Path("~/.cache/tuneforge/torch_extensions").expanduser()


def import_deepspeed(device: str = "cpu"):
    """Import deepspeed with its environment set first (the accelerator is chosen at import)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))
    if not device.startswith("cuda"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def make_engine(
    model: torch.nn.Module, backend_cfg: DeepSpeedConfig, train_cfg: TrainConfig, dist_env
) -> "DeepSpeedEngine":
    return DeepSpeedEngine(model, backend_cfg, train_cfg, dist_env)


class DeepSpeedEngine:
    def __init__(self, model: torch.nn.Module, backend_cfg: DeepSpeedConfig, train_cfg: TrainConfig, dist_env):
        deepspeed = import_deepspeed(dist_env.device)
        self.module = model
        self.rank, self.world_size = dist_env.rank, dist_env.world_size
        # a model built partitioned (trainers/sharded/zero3.py) holds ZeRO-3 partitions: count whole parameters
        trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
        self.config = ds_config.merged(backend_cfg, train_cfg, dist_env.world_size, trainable)
        self.grad_clip = float(train_cfg.grad_clip)
        self.has_frozen = trainable < sum(full_numel(p) for p in model.parameters())
        optimizer = _optimizer(model, train_cfg, backend_cfg.offload_optimizer)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config, dist_init_required=False
        )

    def accumulate(self, last_micro_batch: bool):
        # Tell DeepSpeed which micro batch closes the accumulation: it reduces and steps there.
        self.model.set_gradient_accumulation_boundary(last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self, lr: float, grad_clip: float) -> float:
        if float(grad_clip) != self.grad_clip:
            raise ValueError(f"train.grad_clip: DeepSpeed fixes clipping at start ({self.grad_clip}), got {grad_clip}")
        set_lr(self.optimizer, lr)
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, directory: Path) -> None:
        self.model.save_checkpoint(
            str(directory), tag=TAG, save_latest=False, exclude_frozen_parameters=self.has_frozen
        )

    def load(self, directory: Path) -> None:
        path, _ = self.model.load_checkpoint(
            str(directory),
            tag=TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=not self.has_frozen,
        )
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint in {directory}/{TAG}")

    def full_state_dict(self) -> Optional[dict]:
        """The fp32 master weights, gathered parameter by parameter (collective: every rank calls)."""
        import deepspeed

        state = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            if isinstance(tensor, torch.nn.Parameter):
                full = deepspeed.utils.safe_get_full_fp32_param(tensor)
                if full is None:  # frozen, or no ZeRO master copy: the module's own (gathered) weight
                    with deepspeed.zero.GatheredParameters([tensor]):
                        full = tensor.detach().clone()
            else:
                full = tensor.detach()
            if self.rank == 0:
                state[name] = full.cpu()
        return state if self.rank == 0 else None


def read_full_state_dict(engine_dir: Path, module: torch.nn.Module) -> dict:
    """The fp32 master weights of a ZeRO checkpoint (any stage, any world size), in this process."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=TAG, exclude_frozen_parameters=True)
    return {**module.state_dict(), **saved}


def _optimizer(model: torch.nn.Module, train_cfg, offload: bool) -> torch.optim.Optimizer:
    if not offload:
        return make_optimizer(model, train_cfg)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    # The same AdamW as make_optimizer (decoupled weight decay, same groups and hyper-parameters).
    return DeepSpeedCPUAdam(
        param_groups(model, train_cfg.weight_decay),
        lr=train_cfg.lr,
        betas=(train_cfg.beta1, train_cfg.beta2),
        eps=1e-8,
        adamw_mode=True,
    )
