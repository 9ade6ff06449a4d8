# What Snakemake needs beyond dvc.yaml: how much of a machine each stage asks for, and how
# pretraining starts on several GPUs. Keyed by the DVC stage name (before any "@ITEM"); the SLURM
# profile (workflow/profiles/slurm) overrides them by the same names.
RESOURCES = {
    "check": dict(mem_mb=1000, runtime=5),
    "prepare": dict(mem_mb=4000, runtime=60),
    "features": dict(mem_mb=8000, runtime=60),
    "pool": dict(mem_mb=2000, runtime=10),
    "pretrain": dict(gpu=0, mem_mb=8000, runtime=60),
    "linear": dict(gpu=0, mem_mb=8000, runtime=60),
    "finetune": dict(gpu=0, mem_mb=8000, runtime=60),
    "report": dict(mem_mb=2000, runtime=15),
}
# stages that use every core they are given (worker pools, intra-op threads)
ALL_CORES = {"features", "pretrain", "linear", "finetune"}


def torchrun_launcher(wildcards, resources):
    """How pretraining starts: on several nodes, one torchrun per node under srun; on one node with several
    GPUs, torchrun with one process per GPU; else the bare command (which itself starts one process per
    visible GPU, `distributed.processes` in params.yaml).

    `--no-python` makes torchrun start the very `ajepa pretrain` that dvc.yaml runs. The global
    batch in params.yaml is split over the processes: the GPU count changes the speed, not the recipe."""
    gpus = int(getattr(resources, "gpu", 0))
    nodes = int(getattr(resources, "nodes", 1) or 1)
    if nodes > 1:
        return multinode_launcher(nodes, gpus // nodes)
    return f"torchrun --standalone --nproc_per_node {gpus} --no-python " if gpus > 1 else ""


def multinode_launcher(nodes, gpus_per_node, port=29500):
    """srun starts one torchrun per node of the job's allocation; the torchruns meet at a c10d rendezvous
    on the job's first node (`scontrol show hostnames` lists the allocation's nodes) and start one process
    per GPU each, with RANK, WORLD_SIZE and LOCAL_RANK set, so `ajepa pretrain` starts none itself.
    The job needs `mpi` among its resources, so that the SLURM plugin runs this line as it is instead of
    wrapping it in a one-task srun (docs/cluster.md)."""
    first_node = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
    return (f"srun --nodes {nodes} --ntasks-per-node 1 --cpus-per-task \"$SLURM_CPUS_ON_NODE\" --kill-on-bad-exit=1 "
            f"torchrun --nnodes {nodes} --nproc_per_node {gpus_per_node} --rdzv_id \"$SLURM_JOB_ID\" "
            f"--rdzv_backend c10d --rdzv_endpoint {first_node}:{port} --no-python ")
