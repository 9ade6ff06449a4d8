"""How many CPU cores this process may use: the scheduler's allocation, not the node's core count.

`os.cpu_count()` counts every core of the machine; on a shared cluster node a job gets a few of them
(SLURM sets SLURM_CPUS_PER_TASK / SLURM_CPUS_ON_NODE and binds the job to its cores), and starting a
worker per node core oversubscribes the allocation."""

from __future__ import annotations

import os

SLURM_VARIABLES = ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE")


def available_cpus() -> int:
    """The smallest of: the cores this process is bound to, and the SLURM allocation where one is set."""
    try:
        counts = [len(os.sched_getaffinity(0))]
    except AttributeError:  # macOS, Windows: no affinity masks
        counts = [os.cpu_count() or 1]
    for name in SLURM_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            counts.append(int(value))
    return max(1, min(counts))
