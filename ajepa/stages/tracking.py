"""Where the stages' training curves and timings go.

The curves are DVCLive directories, which `dvc plots` and `dvc exp` read and git keeps. Seconds and
throughput go elsewhere (logs/timing/, no stage output, git-ignored): they change at every run, so in
the files git and DVC compare they would make a rerun that computes the same numbers look changed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ajepa import paths
from ajepa.atomic import write_json

# logged metrics that measure the machine rather than the model: kept apart from the curves
THROUGHPUT = frozenset({"train/samples_per_s"})


def write_timing(stage: str, record: dict) -> Path:
    """logs/timing/STAGE.json: how long STAGE took and how fast it ran (not compared, not versioned)."""
    path = paths.timing_file(stage)
    write_json(path, record)
    return path


def prune_live(live_dir: Path, start_step: int) -> None:
    """Drop the rows at or after `start_step` from every metric of a DVCLive directory (what an
    interrupted run logged after its last checkpoint: the resumed run logs those steps again).

    DVCLive writes in place, so a kill can cut its last write: a cut row (a field missing) is dropped,
    an empty table removed, and a cut summary (metrics.json, rewritten at every step, which DVCLive
    reads back on resuming) removed; the resumed run writes it again at its first step."""
    for tsv in (Path(live_dir) / "plots" / "metrics").rglob("*.tsv"):
        try:
            # as text: a logged NaN (a metric undefined at that step) is kept as written, and only a cut
            # row (a field missing) is dropped
            table = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            tsv.unlink()
            continue
        table = table[(table != "").all(axis=1)]
        table[table["step"].astype(int) < start_step].to_csv(tsv, sep="\t", index=False)
    summary = Path(live_dir) / "metrics.json"
    try:
        json.loads(summary.read_text())
    except FileNotFoundError:
        pass
    except ValueError:  # cut or empty
        summary.unlink()


def open_live(live_dir: Path, timing_dir: Path | None = None):
    """open_log(start_step) for the library's training loops: log(step, metrics) into a DVCLive directory
    that keeps the rows before `start_step` and appends (DVCLive writes its files at every step). The
    THROUGHPUT metrics go to a second one, `timing_dir`, or nowhere."""
    from dvclive import Live  # the pipeline extra: imported by the training stages only, when they log

    def opened(folder: Path, start_step: int):
        prune_live(folder, start_step)
        return Live(str(folder), dvcyaml=False, save_dvc_exp=False, resume=start_step > 0, report=None)

    def open_log(start_step: int):
        lives = {False: opened(live_dir, start_step), True: opened(timing_dir, start_step) if timing_dir else None}

        def log(step: int, metrics: dict) -> None:
            for timing, live in lives.items():
                logged = {k: v for k, v in metrics.items() if (k in THROUGHPUT) == timing}
                if live is None or not logged:
                    continue
                live.step = step
                for name, value in logged.items():
                    live.log_metric(name, value)
                live.next_step()
        return log
    return open_log
