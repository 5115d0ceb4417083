"""The distributed environment a task is handed, the stop flag it obeys, and the process group.

The task knows nothing of Slurm or submitit: whoever starts it (slurm/job.py, or a test) builds a
`DistEnv` (rank, world, master, device) and a `StopFlag`, and passes them in. The ranks join their
process group here: gloo on CPU, NCCL on GPUs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

#: stop reasons, weakest first: when ranks saw different ones, all take the strongest (a requeue
#: warning beats a terminate: submitit's preemption sends both, and the job must requeue)
STOP_REASONS = ("stop_after", "interrupt", "terminate", "requeue")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    num_nodes: int
    master_addr: str
    master_port: int
    job_id: str
    device: str  # "cpu" or "cuda:<local_rank>"
    cpu_threads: int = 0  # torch threads for a CPU rank; 0: its share of this machine's CPUs

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class StopFlag:
    """Set from a signal handler (it only stores a reason), read by the trainer at a step boundary,
    where the ranks agree on the strongest reason any of them saw."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None

    def request(self, reason: str) -> None:
        if self.reason is None or strength(reason) >= strength(self.reason):
            self.reason = reason


def strength(reason: Optional[str]) -> int:
    """0 for no reason; otherwise its rank in STOP_REASONS, from 1."""
    if reason is None:
        return 0
    return STOP_REASONS.index(reason) + 1 if reason in STOP_REASONS else 1


def agreed_stop(stop: StopFlag) -> Optional[str]:
    """Collective: the strongest stop reason any rank saw (None: go on), the same on every rank."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor(float(strength(stop.reason)))
    if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
        on_gpu = mine.cuda()
        dist.all_reduce(on_gpu, op=dist.ReduceOp.MAX)
        mine = on_gpu.cpu()
    else:
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    strongest = int(mine.item())
    if strongest == 0:
        return None
    return stop.reason if strength(stop.reason) == strongest else STOP_REASONS[strongest - 1]


def init_process_group(env: DistEnv, timeout_s: int) -> None:
    """Join the job's process group. A collective that waits longer than `timeout_s` (a rank died or
    hangs) raises on the ranks still alive, so the job fails in bounded time instead of hanging."""
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
    )
    use_cuda = env.device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    else:  # split this machine's CPUs between the ranks on it, so that they do not fight
        from tuneforge.data.pipeline import own_cpus

        threads = env.cpu_threads or max(1, len(own_cpus()) // env.local_world_size)
        torch.set_num_threads(threads)
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=torch.device(env.device) if use_cuda else None,
    )


def close_process_group(finished: bool) -> None:
    """Tear the process group down. After a run that finished on every rank, the ranks first meet
    and drop what may still hold gloo work (at interpreter exit, a gloo thread freeing a tensor
    aborted a finished FSDP2 rank once on the test cluster: "terminate called without an active
    exception"). After a failure no rank waits: the others may never arrive."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()
