"""`ajepa bench`: the printed figures are computed from real timed work and are self-consistent."""

import json

import pytest
import yaml
from conftest import tiny_params

from ajepa.cli import main
from ajepa.tools import bench


@pytest.fixture()
def tiny_params_file(tmp_path):
    params = tiny_params()
    params["pretrain"]["masking"]["mode"] = "curriculum"  # the paper's: its headline mixes both modes
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.slow
def test_bench_pretrain_json(tiny_params_file, capsys):
    assert main(["--params", str(tiny_params_file), "bench", "pretrain", "--steps", "2", "--batch", "4",
                 "--threads", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"samples_per_s", "model_flops_per_s", "peak_flops_per_s", "mfu"} <= r.keys()
    assert r["grid"] == [6, 8] and r["batch"] == 4 and r["encoder"]["embed_dim"] == 32
    # the peak is measured before, between and after the two modes; each mode is set against the
    # mean of the two measurements around it, the headline against the same peaks, time-weighted
    before, between, after = r["peak_measurements"]
    assert r["modes"]["block"]["peak_flops_per_s"] == pytest.approx((before + between) / 2)
    assert r["modes"]["tf"]["peak_flops_per_s"] == pytest.approx((between + after) / 2)
    assert r["peak_spread"] == pytest.approx(max(before, between, after) / min(before, between, after) - 1)
    p = r["tf_fraction"]
    budget = sum(w * r["modes"][k]["seconds_per_step"] * r["modes"][k]["peak_flops_per_s"]
                 for k, w in (("tf", p), ("block", 1 - p)))
    flops_per_step = r["model_flops_per_s"] * 4 / r["samples_per_s"]
    assert r["mfu"] == pytest.approx(flops_per_step / budget, rel=1e-3)
    for mode, m in r["modes"].items():
        assert m["samples_per_s"] == pytest.approx(4 / m["seconds_per_step"])
        assert m["mfu"] == pytest.approx(m["model_flops_per_s"] / m["peak_flops_per_s"])
        assert 0 < m["mfu"] < 1.5, mode  # a real ratio of measured rates, not a constant
    # the headline mixes the two modes in the curriculum's proportion (about 2/3 TF)
    assert r["tf_fraction"] == pytest.approx(2 / 3, abs=0.01)
    lo, hi = sorted(m["samples_per_s"] for m in r["modes"].values())
    assert lo <= r["samples_per_s"] <= hi
    # TF masks (3 small strips) leave more context than block masks (4 blocks of 15-20%)
    assert r["modes"]["tf"]["context_patches"] > r["modes"]["block"]["context_patches"]


@pytest.mark.slow
def test_bench_pretrain_overrides_and_text(tiny_params_file, capsys):
    assert main(["--params", str(tiny_params_file), "bench", "pretrain", "--steps", "1", "--batch", "2",
                 "--encoder", "tiny", "--target-length", "32", "--predictor-dim", "16", "--predictor-depth", "1",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "encoder 192/12/3" in out and "predictor 16/1/2" in out and "input 32x128 (2x8 patches)" in out
    assert "MFU" in out and "GFLOP/s" in out


def test_bench_pretrain_bad_length(tiny_params_file, capsys):
    assert main(["--params", str(tiny_params_file), "bench", "pretrain", "--target-length", "100"]) == 2
    assert "--target-length 100" in capsys.readouterr().err


def test_expected_tf_fraction():
    assert bench._expected_tf_fraction("block", 0.01) == 0.0
    assert bench._expected_tf_fraction("tf", 0.01) == 1.0
    f = bench._expected_tf_fraction("curriculum", 0.01)
    assert f == pytest.approx(2 / 3, abs=0.01)
    assert bench._expected_tf_fraction("inverse", 0.01) == pytest.approx(1 - f)


@pytest.mark.slow
def test_bench_pretrain_one_mode_headline_is_that_mode(tiny_params_file, capsys):
    params = yaml.safe_load(tiny_params_file.read_text())
    params["pretrain"]["masking"]["mode"] = "block"
    tiny_params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    assert main(["--params", str(tiny_params_file), "bench", "pretrain", "--steps", "2", "--batch", "4",
                 "--threads", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tf_fraction"] == 0.0
    assert r["mfu"] == pytest.approx(r["modes"]["block"]["mfu"])
    assert r["samples_per_s"] == pytest.approx(r["modes"]["block"]["samples_per_s"])


@pytest.mark.slow
def test_bench_pretrain_reports_peak_memory_and_its_options(tiny_params_file, capsys):
    assert main(["--params", str(tiny_params_file), "bench", "pretrain", "--steps", "1", "--batch", "4",
                 "--threads", "1", "--activation-checkpointing", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["activation_checkpointing"] is True and r["compile"] is False and r["compile_seconds"] is None
    assert "peak RSS" in r["peak_memory"]["what"] and r["peak_memory"]["bytes"] >= 0  # on the CPU
    assert r["peak_memory"]["bytes"] == max(m["peak_memory_bytes"] for m in r["modes"].values())
    assert main(["--params", str(tiny_params_file), "bench", "pretrain", "--steps", "1", "--batch", "4",
                 "--threads", "1", "--activation-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "peak memory" in out and "with activation checkpointing" in out
