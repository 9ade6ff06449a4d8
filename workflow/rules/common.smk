# What Snakemake needs beyond dvc.yaml: how much of a machine each stage asks for, and how
# pretraining starts on several GPUs. Keyed by the DVC stage name (before any "@ITEM"); the SLURM
# profile (workflow/profiles/slurm) overrides them by the same names.
RESOURCES = {
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
    """One process per GPU under torchrun when the job has several GPUs, else the bare command.

    `--no-python` makes torchrun start the very `ajepa pretrain` that dvc.yaml runs. The global
    batch in params.yaml is split over the processes: the GPU count changes the speed, not the recipe."""
    gpus = int(getattr(resources, "gpu", 0))
    return f"torchrun --standalone --nproc_per_node {gpus} --no-python " if gpus > 1 else ""
