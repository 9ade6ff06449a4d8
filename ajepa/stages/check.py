"""`ajepa check`: the first stage of the pipeline, and the one whose output every other stage depends on.

DVC deletes a stage's outputs before running its command, so a value that the command would refuse
(`dvc exp run -S pretrain.optim.lr=abc`) would cost the outputs of every stage it reruns. This stage
reads every key of params.yaml (the command line did, through ajepa.config, before calling `run`),
so a bad value fails here, where only data/params.checked is at stake. The file's text never changes:
passing the check reruns nothing (DVC compares the file's hash, which stays the same)."""

from __future__ import annotations

from ajepa import paths
from ajepa.atomic import write_text
from ajepa.config import Params

TEXT = "params.yaml passed `ajepa check`; every stage of dvc.yaml depends on this file\n"


def run(params: Params) -> str:
    write_text(paths.params_checked(), TEXT)
    return f"check: params.yaml is valid ({len(params.pipeline.datasets)} dataset(s), " \
           f"{len(params.pipeline.benchmarks)} benchmark(s)) -> {paths.params_checked()}"
