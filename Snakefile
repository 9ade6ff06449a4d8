# The same pipeline as dvc.yaml, for Snakemake (local cores or a cluster profile in
# workflow/profiles/). Rules call the `ajepa` CLI, which reads params.yaml itself; rules pass the
# sections they depend on through `params:` only so that Snakemake reruns a job when they change.

configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/downstream.smk"


rule all:
    input:
        expand("data/features/{dataset}", dataset=config["pipeline"]["datasets"]),
        "models/pretrain/context_encoder.safetensors",
        "models/pretrain/target_encoder.safetensors",
        "results/report.md",
