"""Inside a submitted task: who am I, and how do the ranks find each other. Everything comes from submitit."""

from __future__ import annotations

import os
import random

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
        master_port=master_port(str(job_env.job_id)),
        job_id=str(job_env.job_id),
        device=device,
        cpu_threads=int(os.environ.get("SLURM_CPUS_PER_TASK", 0) or 0),
    )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


#: a job's rendezvous port is drawn from these: below Linux's ephemeral range (32768-60999), so that no
#: outgoing connection on the node already holds it; submitit draws from 20000-60000, and CI saw a
#: local job's rank 0 fail with EADDRINUSE on a port an outgoing connection had taken
RENDEZVOUS_PORTS = (20000, 32767)


def master_port(job_id: str) -> int:
    """The same on every rank of the job and on its requeues (drawn with the job id as seed); MASTER_PORT
    in the job's environment wins."""
    given = os.environ.get("MASTER_PORT")
    return int(given) if given else random.Random(job_id).randint(*RENDEZVOUS_PORTS)
