# The same pipeline as dvc.yaml, for Snakemake (local cores or a cluster profile in
# workflow/profiles/). The rules are read from dvc.yaml itself (workflow/rules/dvc.smk): same
# stages, commands, inputs and outputs. Every `ajepa` command reads params.yaml; the rules pass the
# keys each stage reads through `params:` only so that Snakemake reruns a job when they change.

configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/dvc.smk"


rule all:
    input:
        [p for stage in STAGES.values() for p in stage["outs"]],
    default_target: True


# A failed job leaves the report's inputs incomplete, so its rule never runs (keep-going or not): write it
# from what finished, each missing or failed benchmark marked in its row (docs/pipeline.md).
onerror:
    import subprocess
    subprocess.run(["ajepa", "report"], check=False)
