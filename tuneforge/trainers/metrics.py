"""Throughput, FLOPs, the machine's ceiling and memory: the figures every run logs.

MFU = achieved model FLOP/s / the device's dense bf16 peak, with FLOPs per token from tuneforge/arch
(the count the preflight's time estimate uses too) at the model's own shape (a mixture of experts: the
experts a token passes through). The peak is
`cluster.peak_tflops` when the profile declares it, else the datasheet figure of `cluster.gpu_type`
(conf/gpus.py): the MFU is then comparable with other tools' and with the preflight's assumption.

Besides, the best bf16 GEMM throughput at the model's own matmul shapes is measured once at the start
of a run (best of a few tries, ~1 s, cached in the run dir so a resumed run reuses it): with no peak
declared (a CPU) it is the peak; otherwise the run also logs `mfu_ceiling`, the share of what this
device reaches at these shapes. On a shared CPU a GEMM's wall time swings 2-5x with the neighbours'
load, so a ~1 s measurement taken at a busy moment reads low (and the MFU high): declare
cluster.peak_tflops for a fixed figure.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from tuneforge import arch, fsutil
from tuneforge.compat import deepspeed as deepspeed_compat
from tuneforge.conf.gpus import datasheet_peak_tflops
from tuneforge.conf.schema import ClusterConfig, TrainConfig

PEAK_FILE = "peak_flops.json"  # in the run dir: the measured ceiling, reused on resume

Shape = Tuple[int, int, int]  # (M, K, N) of an (M x K) @ (K x N) product


@dataclass
class Throughput:
    """What a step's token count and time turn into: TFLOP/s per rank, MFU against the peak, and the
    share of the measured ceiling."""

    flops_per_token: Optional[float]  # None: the model's shape is unknown, no FLOP figures
    peak_tflops: Optional[float]
    peak_source: str
    ceiling_tflops: Optional[float]  # measured at the model's GEMM shapes

    @classmethod
    def of(
        cls,
        model: torch.nn.Module,
        adapter_params: Optional[int],
        cluster: ClusterConfig,
        train: TrainConfig,
        dist_env,
        run_dir: Path,
    ) -> "Throughput":
        """Collective (the ranks measure the ceiling together). `adapter_params`: the trainable
        parameters of a PEFT method (the base is frozen), None when every weight trains."""
        from tuneforge.arch.meta import shape_of  # the config's family, else counted on the model

        try:
            shape = shape_of(model)
        except arch.UnknownArchitecture as e:
            if dist_env.is_main:
                print(f"throughput: no FLOP count for this model ({e}); tokens/s only", flush=True)
            return cls(None, None, "unknown model shape", None)
        flops = arch.flops_per_token(shape, train.seq_len, adapter_params)
        ceiling = measured_ceiling(shape.gemm_shapes(train.micro_batch * train.seq_len), dist_env, run_dir)
        declared = cluster.peak_tflops or (datasheet_peak_tflops(cluster.gpu_type) if cluster.gpus_per_node else None)
        if declared:
            source = "cluster.peak_tflops" if cluster.peak_tflops else f"datasheet of {cluster.gpu_type}"
            return cls(flops, float(declared), source, ceiling)
        return cls(flops, ceiling, "measured bf16 GEMM", ceiling)

    def figures(self, tokens: float, seconds: float) -> Dict[str, float]:
        """TFLOP/s of one rank that computed `tokens` (inputs) in `seconds`, and its MFU."""
        if self.flops_per_token is None:
            return {}
        tflops = tokens * self.flops_per_token / seconds / 1e12
        out = {"tflops_per_rank": tflops}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        if self.ceiling_tflops and self.peak_tflops != self.ceiling_tflops:
            out["mfu_ceiling"] = tflops / self.ceiling_tflops
        return out

    def summary(self) -> Dict[str, object]:
        return {
            "flops_per_token": self.flops_per_token,
            "peak_tflops": self.peak_tflops,
            "peak_source": self.peak_source,
            "ceiling_tflops": self.ceiling_tflops,
        }


def gemm_ceiling(
    shapes: Sequence[Shape], dtype: torch.dtype, device: str = "cpu", tries: int = 3, budget_s: float = 1.0
) -> Dict[str, object]:
    """Best GEMM throughput (TFLOP/s) over `shapes`, best of `tries` each, within about `budget_s`.

    Every shape gets one warm-up and at least one timed product, whatever the budget. Wall time:
    CPU time / threads would not do on a shared machine, as it credits a thread that idles (a GEMM
    split unevenly over the threads) with work it did not do (it read 2x the true peak here)."""
    dev = torch.device(device)
    rng = torch.Generator(dev).manual_seed(0)  # a private generator: the run's RNG streams stay untouched
    best, best_shape = 0.0, None
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=dev, generator=rng)
        b = torch.randn(k, n, dtype=dtype, device=dev, generator=rng)
        torch.mm(a, b)
        shape_start = time.perf_counter()
        for _ in range(tries):
            _sync(dev)
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(dev)
            rate = 2 * m * k * n / max(time.perf_counter() - t0, 1e-9) / 1e12
            if rate > best:
                best, best_shape = rate, (m, k, n)
            if time.perf_counter() - shape_start > budget_s / len(shapes):
                break
        del a, b
    return {"tflops": best, "shape": list(best_shape) if best_shape else None, "dtype": str(dtype).split(".")[-1]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_ceiling(shapes: Sequence[Shape], dist_env, run_dir: Path) -> float:
    """The bf16 GEMM ceiling of this device at `shapes`, measured once per run dir and cached there.
    Collective (a barrier). Every rank measures at once, each with its own threads, so on a shared CPU
    the figure is what one rank gets while the others work too; the ranks' mean is kept."""
    import torch.distributed as dist

    path = Path(run_dir) / PEAK_FILE
    if not path.is_file():
        rate = torch.tensor(gemm_ceiling(shapes, torch.bfloat16, dist_env.device)["tflops"], dtype=torch.float64)
        if dist.is_initialized():
            rate = rate.to(dist_env.device) if dist.get_backend() == "nccl" else rate
            dist.all_reduce(rate)
            rate = rate.cpu() / dist.get_world_size()
        if dist_env.is_main:
            fsutil.write_json(
                path, {"peak_tflops": float(rate), "device": dist_env.device, "shapes": [list(s) for s in shapes]}
            )
        if dist.is_initialized():
            dist.barrier()
    return float(json.loads(path.read_text())["peak_tflops"])


def peak_memory_mb(device: str) -> float:
    """Peak memory of this rank: allocated CUDA memory on GPU, resident set size on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# ------------------------------------------------------------------------- model-state memory
# What a rank holds, by storage: compared with launch/estimate.py's params/grads/optim by
# tests/test_preflight.py. Each tensor counts its whole storage once (views of one flat buffer, tied
# weights and shared quantisation tables are not counted twice); a DTensor counts its local shard.
# DeepSpeed keeps partitions outside the module (ZeRO-3 `ds_tensor`, flat gradient partitions, fp32
# master copies): those are looked up by the attribute names DeepSpeed 0.19 uses.


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _tensors(obj, depth: int = 0):
    """Every tensor in nested dicts / lists / tuples (optimizer state, DeepSpeed partitions)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value, depth + 1)


def storage_bytes(tensors) -> int:
    storages = {}
    for t in tensors:
        t = _local(t)
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        storages[(str(storage.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _quant_tensors(p):
    """bitsandbytes 4-bit weights keep their absmax and code tables in `quant_state` (double-quantised: state2)."""
    state = getattr(p, "quant_state", None)
    while state is not None:
        tables = (getattr(state, key, None) for key in ("absmax", "code", "offset"))
        yield from (t for t in tables if isinstance(t, torch.Tensor))
        state = getattr(state, "state2", None)


def grad_bytes(engine) -> int:
    """Gradient storage this rank holds now (call after backward, before the optimizer step)."""
    params = list(engine.module.parameters())
    tensors = [p.grad for p in params if p.grad is not None]
    optimizer = getattr(engine, "optimizer", None)
    tensors += [
        t for part in deepspeed_compat.partitions(optimizer, deepspeed_compat.GRAD_PARTITIONS) for t in _tensors(part)
    ]
    return storage_bytes(tensors)


def model_state_bytes(engine, grads: int) -> dict:
    """Parameter and optimizer-state storage this rank holds (after an optimizer step), with `grads`."""
    params = []
    for p in engine.module.parameters():
        params.append(getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None else p)
        params.extend(_quant_tensors(p))
    optim, optimizer = [], getattr(engine, "optimizer", None)
    while optimizer is not None:  # DeepSpeed wraps the torch optimizer: walk the chain
        if isinstance(optimizer, torch.optim.Optimizer):
            optim += list(_tensors(dict(optimizer.state)))
        optim += [
            t
            for part in deepspeed_compat.partitions(optimizer, deepspeed_compat.MASTER_PARTITIONS)
            for t in _tensors(part)
        ]
        inner = getattr(optimizer, "optimizer", None)
        optimizer = inner if inner is not optimizer else None
    return {
        "mem_params_bytes": storage_bytes(params),
        "mem_grads_bytes": grads,
        "mem_optim_bytes": storage_bytes(optim),
    }


def gather_per_rank(value: float) -> list:
    """Collective: `value` of every rank, in rank order (for the run summary, written by rank 0)."""
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
