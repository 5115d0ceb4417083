"""Inside a submitted task: who am I, and how do the ranks find each other. Everything comes from submitit."""

from __future__ import annotations

import os

from tuneforge.conf.schema import ClusterConfig
from tuneforge.trainers.task import DistEnv


def dist_env(cluster: ClusterConfig) -> DistEnv:
    """This rank's environment from submitit (rank, world, master address and port seeded by the job id).

    The world size is checked against the cluster config, so a job whose nodes did not all join (or
    that got fewer tasks than asked) fails here instead of training N independent copies."""
    import submitit

    job_env = submitit.JobEnvironment()
    torch_env = submitit.helpers.TorchDistributedEnvironment()
    expected = cluster.nodes * cluster.tasks_per_node
    if torch_env.world_size != expected:
        raise RuntimeError(
            f"world size {torch_env.world_size} != cluster.nodes x cluster.tasks_per_node = {expected}: "
            "the allocation does not match the config"
        )
    device = f"cuda:{torch_env.local_rank}" if cluster.gpus_per_node > 0 and _has_cuda() else "cpu"
    return DistEnv(
        rank=torch_env.rank,
        local_rank=torch_env.local_rank,
        world_size=torch_env.world_size,
        local_world_size=torch_env.local_world_size,
        num_nodes=job_env.num_nodes,
        master_addr=torch_env.master_addr,
        master_port=torch_env.master_port,
        job_id=str(job_env.job_id),
        device=device,
        cpu_threads=int(os.environ.get("SLURM_CPUS_PER_TASK", 0) or 0),
    )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
