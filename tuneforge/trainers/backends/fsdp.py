"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded.

Order (as torchtitan): each transformer block becomes one sharding unit, then the root takes what is
left (embeddings, final norm, LM head). Parameters become DTensors sharded on dim 0; the optimizer
is built on them afterwards, so its state is sharded too.

Precision: the model is built in fp32 (backends.model_dtype; a PEFT base in train.dtype). With train.dtype=bf16 a
MixedPrecisionPolicy casts the gathered parameters to bf16 for compute and reduce-scatters gradients
in fp32; the sharded fp32 parameters are the master weights the optimizer steps.

Gradient accumulation reduce-scatters every micro batch into the sharded gradients: memory stays
sharded (a no-sync accumulation would hold full, unsharded gradients like DDP).

Checkpoints: torch.distributed.checkpoint (DCP) of {"model", "optim"} from `get_state_dict`; every
rank writes its shards. DCP reshards on load, so `read_full_state_dict` reads them in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from tuneforge.compat.transformers import block_class_names
from tuneforge.conf.backends import FSDPConfig
from tuneforge.conf.schema import TrainConfig
from tuneforge.trainers.optim import make_optimizer, set_lr


def make_engine(model: torch.nn.Module, backend_cfg: FSDPConfig, train_cfg: TrainConfig, dist_env) -> "FSDPEngine":
    return FSDPEngine(model, backend_cfg, train_cfg, dist_env)


class FSDPEngine:
    def __init__(self, model: torch.nn.Module, backend_cfg: FSDPConfig, train_cfg: TrainConfig, dist_env):
        from torch.distributed.fsdp import FSDPModule

        self.module = self.model = model
        self.rank, self.world_size = dist_env.rank, dist_env.world_size
        if not isinstance(model, FSDPModule):  # trainers/sharded/ builds a model sharded already
            shard_model(model, backend_cfg, train_cfg, dist_env)
        self.optimizer = make_optimizer(model, train_cfg)

    def accumulate(self, last_micro_batch: bool):
        import contextlib

        return contextlib.nullcontext()  # reduce-scatter every micro batch: gradients stay sharded

    def backward(self, loss: torch.Tensor) -> None:
        # The reduce-scatter averages over ranks; the loss is this rank's share of a global sum.
        (loss * self.world_size).backward()

    def step(self, lr: float, grad_clip: float) -> float:
        from torch.distributed.tensor import DTensor

        set_lr(self.optimizer, lr)
        params = [p for p in self.module.parameters() if p.requires_grad]
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):  # each rank holds the norm of its shards: reduce it
            norm = norm.full_tensor()
        if grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(directory))

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()  # the shapes and shardings to load into
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=_options(),
        )

    def full_state_dict(self) -> Optional[dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.module, options=options)  # collective; full on rank 0 only
        return state if self.rank == 0 else None

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer, options=_options())
        return {"model": model_state, "optim": optim_state}


def shard_model(model: torch.nn.Module, backend_cfg: FSDPConfig, train_cfg: TrainConfig, dist_env) -> None:
    """fully_shard each transformer block, then the root; also on a meta-device model (trainers/sharded/
    shards before any weight exists, then fills each rank's shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    on_gpu = dist_env.device.startswith("cuda")
    mesh = init_device_mesh("cuda" if on_gpu else "cpu", (dist_env.world_size,))
    if train_cfg.dtype == "bf16":
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp_policy = MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=on_gpu) if backend_cfg.cpu_offload else OffloadPolicy()
    common = {"mesh": mesh, "mp_policy": mp_policy, "offload_policy": offload}
    for block in transformer_blocks(model, list(backend_cfg.shard_modules)):
        fully_shard(block, reshard_after_forward=backend_cfg.reshard_after_forward, **common)
    # The root's weights (embeddings, head) are needed first thing in the backward: keep them.
    fully_shard(model, reshard_after_forward=False, **common)


def read_full_state_dict(engine_dir: Path, module: torch.nn.Module) -> dict:
    """The saved model weights, loaded (and resharded by DCP) into `module`'s own tensors."""
    import warnings

    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(engine_dir)).read_metadata().state_dict_metadata
    state = module.state_dict()
    wanted = {key: value for key, value in state.items() if f"model.{key}" in saved}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp.load({"model": wanted}, checkpoint_id=str(engine_dir), no_dist=True)
    return state


def transformer_blocks(model: torch.nn.Module, class_names: List[str]) -> List[torch.nn.Module]:
    """The modules sharded one unit each: `class_names`, or the model's own block classes."""
    names = set(class_names or block_class_names(model))
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not blocks:
        raise ValueError(
            f"backend.shard_modules: no module of class {sorted(names) or '(none given)'} in "
            f"{type(model).__name__}; name the transformer block class, e.g. LlamaDecoderLayer"
        )
    return blocks


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (PEFT) are re-read from the base model: checkpoints hold what trains.
    return StateDictOptions(ignore_frozen_params=True)
