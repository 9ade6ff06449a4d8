"""`ajepa bench scale`: the small form of the AudioSet-2M shape rehearsal (1,024 shards, every stage) under
a 256-descriptor limit, and the limits it claims to set really being in force."""

import json

import pytest
import yaml
from conftest import REPO

from ajepa.cli import main
from ajepa.errors import AjepaError
from ajepa.tools import scale

COLUMNS = ("stage", "seconds", "peak RSS MB", "tree RSS MB", "open files", "procs")


@pytest.mark.slow
def test_small_form_passes_every_stage_over_1024_shards_under_256_descriptors(tmp_path, capsys):
    assert main(["--params", str(REPO / "params.yaml"), "bench", "scale", "--clips", "1024", "--nofile", "256",
                 "--folder", str(tmp_path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["limits"]["nofile"] == 256 and r["limits"]["memory_gb"] == 8.0
    figures = r["runs"]["1024"]
    assert [f["stage"] for f in figures] == [name for name, _ in scale.STAGES]
    # the store really has AS-2M's kind of shard count: one file per clip, every one read by pretraining
    assert len(list((tmp_path / "clips-1024" / "data" / "features" / "synth").glob("shard-*.npy"))) == 1024
    assert (tmp_path / "clips-1024" / "results" / "report.md").is_file()
    for f in figures:
        # well under the limit: the readers' share is a sixteenth of it, whatever the shard count
        assert 3 <= f["peak_open_files"] < 256 // 2, f
        assert f["seconds"] > 0 and f["peak_rss_mb"] > 0 and f["tree_rss_mb"] > 0 and f["processes"] >= 1
    by_stage = {f["stage"]: f for f in figures}
    assert by_stage["pretrain"]["processes"] >= 3  # the launcher and its 2 gloo processes, at least
    assert r["projection"]["clips"] == 2_000_000 and r["projection"]["shards"] == 1_950
    assert r["projection"]["pretrain"]["seconds"] == round(by_stage["pretrain"]["seconds"] * 2_000_000 / 1024)
    assert set(r["projection"]) == {"clips", "shards", "model", "prepare", "features", "pool", "pretrain"}
    table = scale.format_scale(r)
    assert all(column in table for column in COLUMNS)
    assert "1024 clips in 1024 shards" in table and "projected to 2,000,000 clips" in table


@pytest.mark.slow
def test_the_descriptor_limit_reaches_the_stage(tmp_path):
    # so few descriptors that the interpreter cannot even load its modules: the stage fails, named
    with pytest.raises(AjepaError, match=r"stage check failed \(exit \d+\) under 4 open files"):
        scale.bench_scale(str(REPO / "params.yaml"), [100], nofile=4, memory_gb=8, readonly="off",
                          folder=str(tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(not scale.readonly_supported(), reason="no mount namespace here (unshare --mount refused)")
def test_a_stage_cannot_write_outside_its_run_folder(tmp_path):
    outside = tmp_path / "outside" / "params.yaml"
    outside.parent.mkdir()
    # flow style: `params-format` would rewrite it, outside the run folder
    outside.write_text(yaml.safe_dump(yaml.safe_load((REPO / "params.yaml").read_text()), default_flow_style=True))
    before = outside.read_text()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "log", "w") as log, pytest.raises(AjepaError, match="Read-only file system"):
        scale.run_stage("format", ["--params", str(outside), "params-format"], run_dir,
                        scale.Limits(1024, 8, readonly=True), log)
    assert outside.read_text() == before
    # and the same stage inside the folder writes
    inside = run_dir / "params.yaml"
    inside.write_text(before)
    with open(run_dir / "log2", "w") as log:
        scale.run_stage("format", ["--params", str(inside), "params-format"], run_dir,
                        scale.Limits(1024, 8, readonly=True), log)
    assert inside.read_text() != before


def test_two_sizes_project_every_figure_on_a_line():
    def figs(n, seconds, rss):
        return [scale.StageFigures("pretrain", seconds, rss, 2 * rss, 20, 3)]
    p = scale.project({1000: figs(1000, 10.0, 100.0), 2000: figs(2000, 20.0, 150.0)}, target=4000)
    assert p["pretrain"] == {"seconds": 40.0, "peak_rss_mb": 250.0, "tree_rss_mb": 500.0, "peak_open_files": 20}
    # a figure that falls between the sizes, or grows by less than 5% (noise over a fixed cost), is projected flat
    p = scale.project({1000: figs(1000, 12.0, 147.0), 2000: figs(2000, 11.0, 150.0)}, target=2_000_000)
    assert p["pretrain"] == {"seconds": 11.0, "peak_rss_mb": 150.0, "tree_rss_mb": 300.0, "peak_open_files": 20}
    # the stages whose input does not grow with the size are not projected
    fixed = [scale.StageFigures("linear", 5.0, 900.0, 900.0, 60, 1)]
    assert scale.project({1000: fixed, 2000: fixed}) == {}
    assert scale.project({1000: figs(1000, 10.0, 100.0)}, target=4000) == {"pretrain": {"seconds": 40}}
