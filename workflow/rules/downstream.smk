# Downstream evaluation per benchmark, and the report. As with pretraining, the resumable state
# (models/finetune_state/, data/embeddings/, results/finetune/*/live/) is not declared: Snakemake
# would delete it before a job. The downstream stages use one GPU (cuda:0) when they have one.
BENCHMARKS = config["pipeline"]["benchmarks"]
# what both downstream stages run besides their own stage module (dvc.yaml lists the same files)
DOWNSTREAM_CODE = ["ajepa/downstream/linear.py", "ajepa/downstream/protocols.py", "ajepa/downstream/common.py",
                   "ajepa/downstream/metrics.py", "ajepa/data/loader.py", "ajepa/data/store.py",
                   "ajepa/data/frontend.py", "ajepa/masks.py", "ajepa/models", "ajepa/train/checkpoint.py"]


wildcard_constraints:
    bench="|".join(BENCHMARKS),


rule linear:
    input:
        "data/features/{bench}",
        "models/pretrain/context_encoder.safetensors",
        "models/pretrain/target_encoder.safetensors",
        "ajepa/stages/linear.py",
        DOWNSTREAM_CODE,
    output:
        "results/linear/{bench}/metrics.json",
    params:
        settings=config["linear"],
        encoder=config["downstream"]["encoder"],
    threads: workflow.cores
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=60,
    log:
        "logs/linear/{bench}.log",
    conda:
        "../envs/ajepa.yaml"
    shell:
        "ajepa linear {wildcards.bench} 2> {log}"


rule finetune:
    input:
        "data/features/{bench}",
        f"models/pretrain/{config['downstream']['encoder']}_encoder.safetensors",
        "ajepa/stages/finetune.py",
        "ajepa/stages/tracking.py",
        "ajepa/downstream/finetune.py",
        DOWNSTREAM_CODE,
        "ajepa/train/schedules.py",
        "ajepa/plots.py",
    output:
        "results/finetune/{bench}/metrics.json",
        "results/finetune/{bench}/predictions.csv",
        directory("results/finetune/{bench}/plots"),
    params:
        settings=lambda w: config["finetune"][w.bench],
        encoder=config["downstream"]["encoder"],
    threads: workflow.cores
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=60,
    log:
        "logs/finetune/{bench}.log",
    conda:
        "../envs/ajepa.yaml"
    shell:
        "ajepa finetune {wildcards.bench} 2> {log}"


rule report:
    input:
        "results/pretrain/metrics.json",
        expand("results/linear/{bench}/metrics.json", bench=BENCHMARKS),
        expand("results/finetune/{bench}/metrics.json", bench=BENCHMARKS),
        "ajepa/stages/report.py",
        "ajepa/downstream/metrics.py",
        "ajepa/plots.py",
        "ajepa/masks.py",
        "ajepa/data/registry.py",
    output:
        "results/report.md",
        "results/summary.json",
        directory("results/plots"),
    params:
        benchmarks=BENCHMARKS,
        pretrain={k: config["pretrain"][k] for k in ("datasets", "splits", "encoder", "predictor")},
        masking=config["pretrain"]["masking"]["mode"],
        encoder=config["downstream"]["encoder"],
        pooling=config["linear"]["pooling"],
    resources:
        mem_mb=2000,
        runtime=15,
    log:
        "logs/report.log",
    conda:
        "../envs/ajepa.yaml"
    shell:
        "ajepa report 2> {log}"
