import copy

import pytest
import yaml
from conftest import REPO, load_repo_params

from ajepa.cli import main
from ajepa.config import load_params, parse_params
from ajepa.errors import ConfigError


def test_repository_params_parse():
    p = load_params(REPO / "params.yaml")
    assert p.features.sample_rate == 16000 and p.features.num_mel_bins == 128
    assert "synth" in p.pipeline.datasets
    assert p.datasets["synth"].target_length % p.features.patch_size == 0


def _error(mutate) -> str:
    raw = load_repo_params()
    mutate(raw)
    with pytest.raises(ConfigError) as e:
        parse_params(copy.deepcopy(raw), source="p.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("p.yaml: ")
    return msg


def test_unknown_key_named():
    msg = _error(lambda r: r["features"].update(num_mels=64))
    assert "features.num_mels" in msg and "unknown key" in msg


def test_unknown_top_level_section():
    assert "pretrian" in _error(lambda r: r.update(pretrian={}))


def test_missing_key_named():
    assert "features.patch_size is missing" in _error(lambda r: r["features"].pop("patch_size"))


def test_wrong_type_named():
    msg = _error(lambda r: r["features"].update(sample_rate="16k"))
    assert "features.sample_rate = '16k'" in msg and "integer" in msg


def test_bool_is_not_an_integer():
    assert "features.num_workers = True" in _error(lambda r: r["features"].update(num_workers=True))


def test_negative_sample_rate():
    msg = _error(lambda r: r["features"].update(sample_rate=-16000))
    assert "features.sample_rate = -16000: must be positive" in msg


def test_target_length_must_be_patch_multiple():
    msg = _error(lambda r: r["datasets"]["synth"].update(target_length=100))
    assert "datasets.synth.target_length = 100" in msg and "multiple of features.patch_size (16)" in msg


def test_mel_bins_must_be_patch_multiple():
    assert "features.num_mel_bins = 120" in _error(lambda r: r["features"].update(num_mel_bins=120))


def test_reject_fraction_range():
    assert "features.max_reject_fraction = 1.5" in _error(lambda r: r["features"].update(max_reject_fraction=1.5))


def test_unknown_pipeline_dataset():
    assert "pipeline.datasets = 'esc-50'" in _error(lambda r: r["pipeline"].update(datasets=["esc-50"]))


def test_snr_range_order():
    assert "snr_db" in _error(lambda r: r["datasets"]["synth"]["prepare"].update(snr_db=[30.0, 5.0]))


def test_gain_range_must_not_clip():
    err = _error(lambda r: r["datasets"]["synth"]["prepare"].update(gain_db=[-6.0, 3.0]))
    assert "datasets.synth.prepare.gain_db = [-6.0, 3.0]" in err and "no clipping" in err


def test_cli_reports_one_line_and_exit_code(tmp_path, capsys):
    raw = load_repo_params()
    raw["features"]["frame_shift_ms"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["--params", str(bad), "features", "synth"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ajepa features: error: {bad}: features.frame_shift_ms = 0.0: must be positive"


def test_cli_missing_params_file(tmp_path, capsys):
    assert main(["--params", str(tmp_path / "nope.yaml"), "prepare", "synth"]) == 2
    assert "nope.yaml: not found" in capsys.readouterr().err


def test_cli_invalid_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("features: [unclosed\n")
    assert main(["--params", str(bad), "prepare", "synth"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid YAML" in err and "\n" not in err


def test_pretrain_masking_mode_must_be_known():
    msg = _error(lambda r: r["pretrain"]["masking"].update(mode="random"))
    assert "pretrain.masking.mode = 'random'" in msg and "'curriculum'" in msg


def test_pretrain_heads_must_divide_width():
    msg = _error(lambda r: r["pretrain"]["encoder"].update(embed_dim=100, num_heads=3))
    assert "pretrain.encoder.embed_dim = 100: must be divisible by num_heads (3)" in msg


def test_pretrain_scale_above_one():
    assert "pretrain.masking.context_scale" in _error(lambda r: r["pretrain"]["masking"].update(context_scale=[0.9, 1.2]))


def test_pretrain_datasets_must_exist():
    assert "pretrain.datasets = 'audioset'" in _error(lambda r: r["pretrain"].update(datasets=["synth", "audioset"]))
    assert "pretrain.datasets = ['synth', 'synth']" in _error(lambda r: r["pretrain"].update(datasets=["synth", "synth"]))


def test_probe_every_is_a_multiple_of_log_every():
    msg = _error(lambda r: r["pretrain"]["probe"].update(every=7))
    assert "pretrain.probe.every = 7: must be a multiple of log_every (5)" in msg


def test_target_layers_within_the_encoder():
    assert "pretrain.target_layers = 9" in _error(lambda r: r["pretrain"].update(target_layers=9))


PUBLISHED = ["esc50", "spc2", "spc1", "as20k", "as2m", "vox1"]


def test_published_datasets_match_the_registry():
    from ajepa.datasets.registry import REGISTRY
    p = load_params(REPO / "params.yaml")
    for name in PUBLISHED:
        ds = p.dataset(name)
        assert ds.target_length == REGISTRY[name].target_length  # AudioMAE/AST: 512 / 128 / 1024
        assert ds.prepare.source is None and ds.prepare.mirror is None and ds.prepare.checksums == {}
        p.recipe(name)  # every benchmark has a fine-tuning recipe
    assert p.finetune["as2m"].samples_per_epoch == 200_000 and p.finetune["as2m"].balanced_sampling


def test_every_benchmark_may_be_listed():
    raw = load_repo_params()
    raw["pipeline"].update(datasets=["synth", *PUBLISHED], benchmarks=PUBLISHED)
    assert parse_params(raw).pipeline.benchmarks == PUBLISHED


def test_checksum_format():
    msg = _error(lambda r: r["datasets"]["spc2"]["prepare"]["checksums"].update(
        {"speech_commands_v0.02.tar.gz": "af14739e"}))
    assert "datasets.spc2.prepare.checksums.speech_commands_v0.02.tar.gz = 'af14739e'" in msg and "sha256:" in msg


def test_checksum_for_an_unknown_file():
    msg = _error(lambda r: r["datasets"]["vox1"]["prepare"]["checksums"].update({"vox1_dev.zip": "md5:" + "0" * 32}))
    assert "datasets.vox1.prepare.checksums.vox1_dev.zip" in msg and "vox1_dev_wav_partaa" in msg


def test_mirror_must_be_http():
    msg = _error(lambda r: r["datasets"]["esc50"]["prepare"].update(mirror="ftp://example.org/esc"))
    assert "datasets.esc50.prepare.mirror = 'ftp://example.org/esc'" in msg


def test_audioset_val_fraction_range():
    assert "datasets.as2m.prepare.val_fraction = 0.0" in _error(
        lambda r: r["datasets"]["as2m"]["prepare"].update(val_fraction=0.0))


def test_audioset_keys_are_required():
    assert "datasets.as20k.prepare.audio_dir is missing" in _error(
        lambda r: r["datasets"]["as20k"]["prepare"].pop("audio_dir"))


def test_pretrain_splits_must_be_known():
    msg = _error(lambda r: r["pretrain"].update(datasets=["as2m"], splits=["train", "unbalanced"]))
    assert "pretrain.splits[1] = 'unbalanced'" in msg and "'pretrain'" in msg
    raw = load_repo_params()
    raw["pretrain"].update(datasets=["as2m"], splits=["train", "val"])
    assert parse_params(raw).pretrain.splits == ["train", "val"]
