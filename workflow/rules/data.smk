DATASETS = config["pipeline"]["datasets"]
FEATURE_KEYS = ["sample_rate", "num_mel_bins", "frame_shift_ms", "frame_length_ms", "patch_size",
                "shard_clips", "max_reject_fraction"]


wildcard_constraints:
    dataset="|".join(DATASETS),


rule prepare:
    input:
        "ajepa/stages/prepare.py",
        "ajepa/data/manifest.py",
        "ajepa/data/registry.py",
        "ajepa/data/sources.py",
        "ajepa/data/download.py",
        "ajepa/data/archive.py",
        "ajepa/data/synth.py",
        "ajepa/data/words.py",
        "ajepa/data/esc50.py",
        "ajepa/data/speech_commands.py",
        "ajepa/data/audioset.py",
        "ajepa/data/voxceleb.py",
    output:
        directory("data/raw/{dataset}"),
        "data/manifests/{dataset}.csv",
        "data/manifests/{dataset}.json",
        "data/manifests/{dataset}.missing.csv",
    params:
        settings=lambda w: config["datasets"][w.dataset]["prepare"],
    resources:
        mem_mb=4000,
        runtime=60,
    log:
        "logs/prepare/{dataset}.log",
    conda:
        "../envs/ajepa.yaml"
    shell:
        "ajepa prepare {wildcards.dataset} 2> {log}"


rule features:
    input:
        "data/raw/{dataset}",
        "data/manifests/{dataset}.csv",
        "data/manifests/{dataset}.json",
        "ajepa/stages/features.py",
        "ajepa/data/frontend.py",
        "ajepa/data/store.py",
        "ajepa/data/manifest.py",
        "ajepa/data/registry.py",
    output:
        directory("data/features/{dataset}"),
    params:
        target_length=lambda w: config["datasets"][w.dataset]["target_length"],
        frontend={k: config["features"][k] for k in FEATURE_KEYS},
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=60,
    log:
        "logs/features/{dataset}.log",
    conda:
        "../envs/ajepa.yaml"
    shell:
        "ajepa features {wildcards.dataset} 2> {log}"


rule pool:
    input:
        "data/features/{dataset}",
        "ajepa/stages/pool.py",
        "ajepa/data/store.py",
        "ajepa/data/frontend.py",
    output:
        "data/pool/{dataset}.json",
    params:
        datasets=config["pretrain"]["datasets"],
        splits=config["pretrain"]["splits"],
    resources:
        mem_mb=2000,
        runtime=10,
    log:
        "logs/pool/{dataset}.log",
    conda:
        "../envs/ajepa.yaml"
    shell:
        "ajepa pool {wildcards.dataset} 2> {log}"
