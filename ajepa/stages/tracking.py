"""Where the stages' training curves go: DVCLive directories, which `dvc plots` and `dvc exp` read."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def prune_live(live_dir: Path, start_step: int) -> None:
    """Drop the rows at or after `start_step` from every metric of a DVCLive directory (what an
    interrupted run logged after its last checkpoint: the resumed run logs those steps again).

    DVCLive writes in place, so a kill can cut its last write: a cut row (a field missing) is dropped,
    an empty table removed, and a cut summary (metrics.json, rewritten at every step, which DVCLive
    reads back on resuming) removed; the resumed run writes it again at its first step."""
    for tsv in (Path(live_dir) / "plots" / "metrics").rglob("*.tsv"):
        try:
            table = pd.read_csv(tsv, sep="\t").dropna()
        except pd.errors.EmptyDataError:
            tsv.unlink()
            continue
        table = table.astype({"step": int})
        table[table["step"] < start_step].to_csv(tsv, sep="\t", index=False)
    summary = Path(live_dir) / "metrics.json"
    try:
        json.loads(summary.read_text())
    except FileNotFoundError:
        pass
    except ValueError:  # cut or empty
        summary.unlink()


def open_live(live_dir: Path):
    """open_log(start_step) for the library's training loops: log(step, metrics) into a DVCLive directory
    that keeps the rows before `start_step` and appends (DVCLive writes its files at every step)."""
    from dvclive import Live

    def open_log(start_step: int):
        prune_live(live_dir, start_step)
        live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=start_step > 0, report=None)

        def log(step: int, metrics: dict) -> None:
            live.step = step
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()
        return log
    return open_log
