"""Throughput, FLOPs, the machine's ceiling and memory: the figures every run logs.

MFU = achieved model FLOP/s / the device's dense bf16 peak. Model FLOPs per token follow the usual
convention, 6N + attention, with N the weights that take part in a matrix multiply: the input
embedding is a table lookup, so it is left out unless it is tied to the output head.

The peak is `cluster.peak_tflops` when the cluster profile declares it. Otherwise (a CPU, or a GPU
nobody described) it is measured once at the start of a run: the best bf16 GEMM throughput at the
model's own matmul shapes, best of a few tries, ~1 s, cached in the run dir so a resumed run reuses it.
A measured ceiling is what this device reaches at these shapes, not a datasheet figure. On a shared
CPU a GEMM's wall time swings 2-5x with the neighbours' load, so a ~1 s measurement taken at a busy
moment reads low (and the MFU high): declare cluster.peak_tflops for a fixed figure.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

PEAK_FILE = "peak_flops.json"  # in the run dir: the measured ceiling, reused on resume

Shape = Tuple[int, int, int]  # (M, K, N) of an (M x K) @ (K x N) product


def matmul_parameters(model: torch.nn.Module) -> Dict[str, int]:
    """Weights that enter a matmul (all but an untied input embedding): total and trainable."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lookup = set()
    if embedding is not None and (output is None or output.weight is not embedding.weight):
        lookup = {id(p) for p in embedding.parameters()}
    params = {id(p): p for p in model.parameters()}  # tied weights counted once
    used = [p for key, p in params.items() if key not in lookup]
    return {
        "matmul_params_total": sum(p.numel() for p in used),
        "matmul_params_trainable": sum(p.numel() for p in used if p.requires_grad),
    }


def flops_per_token(config, trainable_params: int, total_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for a fully trained model (forward 2N, backward 4N), attention
    scores and values 12 x layers x hidden x seq_len. Frozen weights (PEFT) skip the weight-gradient
    half of their backward: 4N_frozen instead of 6N. Pass matmul parameter counts (see above)."""
    frozen = total_params - trainable_params
    dense = 6 * trainable_params + 4 * frozen
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return float(dense + attention)


def gemm_shapes(config, tokens: int) -> List[Shape]:
    """The forward GEMMs of one decoder block and the output head at `tokens` rows (a micro batch)."""
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = head_dim * getattr(config, "num_key_value_heads", config.num_attention_heads)
    q = head_dim * config.num_attention_heads
    shapes = {
        (tokens, hidden, q),
        (tokens, hidden, kv),
        (tokens, q, hidden),  # q, k/v, o
        (tokens, hidden, inter),
        (tokens, inter, hidden),
        (tokens, hidden, vocab),
    }  # up/gate, down, head
    return sorted(shapes)


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


def device_peak_tflops(
    declared: Optional[float], config, tokens: int, device: str, run_dir: Path, is_main: bool
) -> Dict[str, object]:
    """The dense bf16 peak of one device for MFU: declared (cluster.peak_tflops), or measured once
    per run dir at the model's GEMM shapes and cached there. Collective when measured (a barrier).

    Every rank measures at once, each with its own threads, so on a shared CPU the figure is what one
    rank gets while the others work too; the ranks' mean is kept."""
    if declared:
        return {"peak_tflops": float(declared), "peak_source": "cluster.peak_tflops"}
    import torch.distributed as dist

    path = Path(run_dir) / PEAK_FILE
    if not path.is_file():
        shapes = gemm_shapes(config, tokens)
        rate = torch.tensor(gemm_ceiling(shapes, torch.bfloat16, device)["tflops"], dtype=torch.float64)
        if dist.is_initialized():
            rate = rate.to(device) if dist.get_backend() == "nccl" else rate
            dist.all_reduce(rate)
            rate = rate.cpu() / dist.get_world_size()
        if is_main:
            tmp = path.with_name(f".{PEAK_FILE}.tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "peak_tflops": float(rate),
                        "tokens": tokens,
                        "device": device,
                        "shapes": [list(s) for s in shapes],
                    }
                )
                + "\n"
            )
            tmp.replace(path)
        if dist.is_initialized():
            dist.barrier()
    return {"peak_tflops": json.loads(path.read_text())["peak_tflops"], "peak_source": "measured bf16 GEMM"}


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
_DS_GRADS = ("averaged_gradients", "grad_partitions_flat_buffer")
_DS_MASTER = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


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
    tensors += [t for name in _DS_GRADS for t in _tensors(getattr(optimizer, name, None))]
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
        optim += [t for name in _DS_MASTER for t in _tensors(getattr(optimizer, name, None))]
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
