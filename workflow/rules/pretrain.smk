# models/pretrain_state/ (the resumable checkpoint) and results/pretrain/live/ (curves that a resumed
# run appends to) are deliberately not outputs: Snakemake deletes declared outputs before a job, which
# would throw away what an interrupted run resumes from. dvc.yaml declares them `persist: true`, and
# `ajepa dag --check` holds both files to that list.


rule pretrain:
    input:
        expand("data/pool/{dataset}.json", dataset=config["pretrain"]["datasets"]),
        "ajepa/stages/pretrain.py",
        "ajepa/stages/pool.py",
        "ajepa/stages/tracking.py",
        "ajepa/train/pretrain.py",
        "ajepa/train/schedules.py",
        "ajepa/train/checkpoint.py",
        "ajepa/train/distributed.py",
        "ajepa/data/loader.py",
        "ajepa/data/store.py",
        "ajepa/data/frontend.py",
        "ajepa/downstream/linear.py",
        "ajepa/downstream/protocols.py",
        "ajepa/downstream/metrics.py",
        "ajepa/downstream/common.py",
        "ajepa/masks.py",
        "ajepa/models",
        "ajepa/plots.py",
    output:
        "models/pretrain/context_encoder.safetensors",
        "models/pretrain/target_encoder.safetensors",
        "results/pretrain/masks.png",
        "results/pretrain/metrics.json",
    params:
        settings=config["pretrain"],
        launcher=torchrun_launcher,
    threads: workflow.cores
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=60,
    log:
        "logs/pretrain.log",
    conda:
        "../envs/ajepa.yaml"
    shell:
        "{params.launcher}ajepa pretrain 2> {log}"
