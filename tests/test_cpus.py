"""Workers and threads follow the scheduler's allocation, not the node's core count."""

import os

import pytest

from ajepa.cpus import available_cpus
from ajepa.tools.flops import configure_cpu_threads

BOUND = len(os.sched_getaffinity(0))


@pytest.fixture
def no_slurm(monkeypatch):
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_outside_slurm_the_cores_this_process_is_bound_to(no_slurm):
    assert available_cpus() == BOUND


def test_a_slurm_allocation_smaller_than_the_node_wins(no_slurm):
    no_slurm.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a 64-core node
    assert available_cpus() == 64
    no_slurm.setenv("SLURM_CPUS_ON_NODE", "16")
    assert available_cpus() == 16
    no_slurm.setenv("SLURM_CPUS_PER_TASK", "4")
    assert available_cpus() == 4
    no_slurm.setenv("SLURM_CPUS_PER_TASK", "")  # set but empty (as some sites export it): ignored
    assert available_cpus() == 16


def test_torch_threads_follow_it(no_slurm):
    no_slurm.setenv("SLURM_CPUS_PER_TASK", "1")
    import torch
    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads() == 1
    finally:
        torch.set_num_threads(before)
