# models/pretrain_state/ (the resumable checkpoint) is deliberately not an output: Snakemake deletes
# declared outputs before a job, which would throw away the state an interrupted run resumes from.


rule pretrain:
    input:
        f"data/features/{config['pretrain']['dataset']}",
        "ajepa/stages/pretrain.py",
        "ajepa/train/pretrain.py",
        "ajepa/train/schedules.py",
        "ajepa/train/checkpoint.py",
        "ajepa/train/distributed.py",
        "ajepa/data/loader.py",
        "ajepa/masks.py",
        "ajepa/models",
    output:
        "models/pretrain/encoder.safetensors",
        "results/pretrain/masks.png",
        "results/pretrain/metrics.json",
    params:
        settings=config["pretrain"],
    threads: workflow.cores
    log:
        "logs/pretrain.log",
    shell:
        "ajepa pretrain 2> {log}"
