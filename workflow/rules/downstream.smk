# Downstream evaluation per benchmark, and the report. As with pretraining, the resumable state
# (models/finetune_state/, data/embeddings/) is not declared: Snakemake would delete it before a job.
BENCHMARKS = config["pipeline"]["benchmarks"]
DOWNSTREAM_CODE = ["ajepa/downstream/protocols.py", "ajepa/downstream/common.py", "ajepa/downstream/metrics.py",
                   "ajepa/downstream/linear.py"]


wildcard_constraints:
    bench="|".join(BENCHMARKS),


rule linear:
    input:
        "data/features/{bench}",
        "models/pretrain/encoder.safetensors",
        "ajepa/stages/linear.py",
        DOWNSTREAM_CODE,
    output:
        "results/linear/{bench}/metrics.json",
    params:
        settings=config["linear"],
    threads: workflow.cores
    log:
        "logs/linear/{bench}.log",
    shell:
        "ajepa linear {wildcards.bench} 2> {log}"


rule finetune:
    input:
        "data/features/{bench}",
        "models/pretrain/encoder.safetensors",
        "ajepa/stages/finetune.py",
        "ajepa/downstream/finetune.py",
        DOWNSTREAM_CODE,
        "ajepa/models",
    output:
        "results/finetune/{bench}/metrics.json",
        "results/finetune/{bench}/predictions.csv",
        directory("results/finetune/{bench}/plots"),
    params:
        settings=lambda w: config["finetune"][w.bench],
    threads: workflow.cores
    log:
        "logs/finetune/{bench}.log",
    shell:
        "ajepa finetune {wildcards.bench} 2> {log}"


rule report:
    input:
        "results/pretrain/metrics.json",
        expand("results/linear/{bench}/metrics.json", bench=BENCHMARKS),
        expand("results/finetune/{bench}/metrics.json", bench=BENCHMARKS),
        "ajepa/stages/report.py",
        "ajepa/plots.py",
        "ajepa/data/registry.py",
    output:
        "results/report.md",
        "results/summary.json",
        directory("results/plots"),
    params:
        benchmarks=BENCHMARKS,
        pretrain={k: config["pretrain"][k] for k in ("dataset", "splits", "encoder", "predictor")},
        masking=config["pretrain"]["masking"]["mode"],
    log:
        "logs/report.log",
    shell:
        "ajepa report 2> {log}"
