# The rules, read from dvc.yaml (workflow/dvc_pipeline.py says how): one rule per DVC stage with
# the same command, inputs and outputs, so the two orchestrators cannot disagree. The parameters
# a stage reads are passed through `params:` so that Snakemake reruns a job when they change.
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(workflow.basedir, "workflow")))
import dvc_pipeline as dvcp  # noqa: E402

# Every `ajepa` command reads params.yaml itself: a --config or --configfile that changes it would
# change what Snakemake thinks the jobs are, not what they do.
if config != yaml.safe_load(Path(workflow.basedir, "params.yaml").read_text()):
    raise WorkflowError("snakemake --config/--configfile changes parameters that every `ajepa` command reads from "
                        "params.yaml: put them there (`ajepa preset NAME`, or edit it) and run again without them")

# A bad value stops the workflow here, before Snakemake deletes any job's outputs (its jobs rerun for the
# keys they read; the `check` rule itself has none, so it runs once, making what every rule depends on).
from ajepa.config import load_params  # noqa: E402
from ajepa.errors import ConfigError  # noqa: E402

try:
    load_params(Path(workflow.basedir, "params.yaml"))
except ConfigError as e:
    raise WorkflowError(str(e)) from None

STAGES = dvcp.dvc_stages(workflow.basedir)


def stage_of(name):
    def stage(wildcards):
        return STAGES[f"{name}@{wildcards.item}" if hasattr(wildcards, "item") else name]
    return stage


def rule_outputs(name, items):
    paths = dvcp.output_patterns(STAGES, name, items) if items else STAGES[name]["outs"]
    return [directory(p) if dvcp.is_folder(p) else p for p in paths]


for name, items in dvcp.groups(STAGES).items():
    stage = stage_of(name)
    rule:
        name:
            name
        input:
            lambda w, stage=stage: dvcp.inputs(STAGES, stage(w)["deps"]),
        output:
            rule_outputs(name, items),
        params:
            cmd=lambda w, stage=stage: stage(w)["cmd"],
            values=lambda w, stage=stage: {k: dvcp.param_value(config, k) for k in stage(w)["params"]},
            launcher=torchrun_launcher if name == "pretrain" else "",
        wildcard_constraints:
            item="|".join(items) or "-",
        # a function, read per job: `snakemake --unlock` (or --list-rules) runs without --cores
        threads: (lambda wildcards: workflow.cores) if name in ALL_CORES else 1
        resources:
            **RESOURCES.get(name, {}),
        log:
            f"logs/{name}/{{item}}.log" if items else f"logs/{name}.log",
        conda:
            "../envs/ajepa.yaml"
        shell:
            "{params.launcher}{params.cmd} 2> {log}"
