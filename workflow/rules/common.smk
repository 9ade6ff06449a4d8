# Helpers shared by the rules (Snakemake's lint wants functions apart from rules).


def torchrun_launcher(wildcards, resources):
    """One process per GPU under torchrun when the job has several GPUs, else the bare command.

    `--no-python` makes torchrun start the very `ajepa pretrain` that dvc.yaml runs. The global
    batch in params.yaml is split over the processes: the GPU count changes the speed, not the recipe."""
    gpus = int(resources.gpu)
    return f"torchrun --standalone --nproc_per_node {gpus} --no-python " if gpus > 1 else ""
