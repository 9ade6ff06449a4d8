"""`ajepa.load_encoder` on a tiny pretraining run's export: audio at any rate in, the linear probe's
embedding out; the export carries what the encoder was trained with; it loads without the pipeline."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import ajepa
from ajepa.data.frontend import FrontEnd
from ajepa.data.store import FeatureStore, StoreUnion, extract_features, training_statistics
from ajepa.datasets import synth
from ajepa.datasets.manifest import STATS_SPLITS, unlabeled_rows
from ajepa.downstream.common import build_encoder
from ajepa.downstream.linear import embed
from ajepa.downstream.protocols import Task
from ajepa.errors import AjepaError


def _clips(store_dir, n=3):
    """The first n clips of the store as recorded (32 kHz), and the store's own view of them."""
    store = FeatureStore(store_dir)
    store.index = store.index.iloc[:n].reset_index(drop=True)
    return [sf.read(p, dtype="float32")[0] for p in store.index["path"]], store


def test_embed_is_the_linear_probes_embedding_of_the_clip(tiny_export):
    models, store_dir = tiny_export
    model = ajepa.load_encoder(models)  # a folder of exports: the context encoder by default
    waves, store = _clips(store_dir)
    assert model.sample_rate == 16000 and sf.info(store.index["path"][0]).samplerate == 32000
    # the linear stage's path: the stored features, the encoder on the store's grid, pooled over time
    task = Task("t", "splits", ["a"], torch.stack([store[i] for i in range(len(store))]), torch.zeros(len(store)),
                store.index, [], store)
    probe = embed(build_encoder(models / "context", tuple(store.stats["grid"])), task, 8, torch.device("cpu"))
    scene = model.embed(waves[0], 32000)
    assert scene.shape == (8 * 32,) and scene.dtype == torch.float32
    assert np.allclose(scene.numpy(), probe[0], atol=1e-5)
    batch = model.embed(np.stack(waves), 32000)
    assert batch.shape == (3, 8 * 32) and np.allclose(batch.numpy(), probe, atol=1e-5)
    assert torch.allclose(model.embed([torch.from_numpy(w) for w in waves], 32000), batch, atol=1e-6)
    # read at the wrong rate, the same samples are other audio
    assert not np.allclose(model.embed(waves[0], 16000).numpy(), probe[0], atol=1e-3)
    # the target encoder is the other export of the folder
    target = ajepa.load_encoder(models, "target")
    assert target.config["encoder"] == "target" and not torch.allclose(target.embed(waves[0], 32000), scene)


def test_frame_embeddings(tiny_export):
    models, store_dir = tiny_export
    model = ajepa.load_encoder(models / "context")
    waves, _ = _clips(store_dir, 2)
    frames, ms = model.embed_frames(waves[0], 32000)
    n_ts = int((1000 - 87.5) // 40) + 1  # one per 40 ms while the patch centre lies within the second
    assert frames.shape == (n_ts, model.embedding_size) and ms.shape == (n_ts,)
    assert ms[0] == 87.5 and torch.all(ms.diff() == 40.0)
    both, both_ms = model.embed_frames(np.stack(waves), 32000)
    assert both.shape == (2, n_ts, model.embedding_size) and torch.equal(both_ms[0], ms)
    assert torch.allclose(both[0], frames, atol=1e-5)
    with pytest.raises(AjepaError, match="one length"):
        model.embed_frames([waves[0], waves[1][:16000]], 32000)


def test_export_records_what_the_encoder_was_trained_with(tiny_export):
    models, store_dir = tiny_export
    stats = json.loads((store_dir / "stats.json").read_text())
    for which in ("context", "target"):
        config = json.loads((models / which / "config.json").read_text())
        assert config["encoder"] == which and config["ajepa_version"] == ajepa.__version__
        assert config["normalisation"]["mean"] == stats["mean"] and config["normalisation"]["std"] == stats["std"]
        assert config["normalisation"]["datasets"] == {"synth": {"mean": stats["mean"], "std": stats["std"],
                                                                 "values": stats["frames"]}}
        assert config["frontend"] == {k: stats[k] for k in ("sample_rate", "num_mel_bins", "frame_shift_ms",
                                                            "frame_length_ms", "target_length")}
        assert config["architecture"]["grid"] == [6, 8] and config["patch_grid"]["window_frames"] == 96
        assert config["embedding"]["size"] == 8 * config["architecture"]["embed_dim"]
        assert len(config["training"]["params_sha256"]) == 64 and config["training"]["steps"] == 3
        card = (models / which / "README.md").read_text()
        assert f"A-JEPA {which} encoder" in card and f"{stats['mean']:.4f}" in card
    model = ajepa.load_encoder(models / "target" / "model.safetensors")
    assert (model.mean, model.std) == (stats["mean"], stats["std"])


def test_pooled_statistics_are_those_of_every_training_frame(tiny_export, tmp_path):
    _, first = tiny_export
    spec = synth.GeneratorSpec(seed=9, duration_s=1.0, sample_rate=16000, snr_db=(0.0, 5.0), gain_db=(-30.0, -20.0))
    synth.generate(tmp_path / "raw", spec, clips_per_class=1, num_folds=1, pool_clips=8)
    second = tmp_path / "quiet"
    extract_features(unlabeled_rows(tmp_path / "raw", "meta/pool.csv", "pool"), second, FrontEnd(), 96, 64, 1, 0.0,
                     extra_stats={"grid": [6, 8], "patch_size": 16}, progress=False)
    stores = [FeatureStore(first), FeatureStore(second)]
    _, pooled = training_statistics(StoreUnion(stores))
    values = np.concatenate([np.concatenate([s.raw(i)[:n].astype(np.float64).ravel() for i, (n, split) in enumerate(
        zip(s.index["n_frames"].clip(upper=96), s.index["split"])) if split in STATS_SPLITS]) for s in stores])
    assert pooled["values"] == values.size
    assert pooled["mean"] == pytest.approx(values.mean(), abs=2e-3) and pooled["std"] == pytest.approx(values.std(), rel=1e-3)
    assert abs(pooled["mean"] - stores[0].mean) > 0.1  # the second store moved it


def test_load_encoder_options_and_errors(tiny_export, tmp_path):
    models, store_dir = tiny_export
    wave = _clips(store_dir, 1)[0][0]
    default = ajepa.load_encoder(models / "context")
    other = ajepa.load_encoder(models / "context", mean=-3.0, std=2.0)
    assert not torch.allclose(default.embed(wave, 32000), other.embed(wave, 32000), atol=1e-3)
    short = ajepa.load_encoder(models / "context", target_length=48)  # positions are a function of the grid
    assert short.encoder.grid == (3, 8) and short.window_frames == 48
    assert short.embed(wave, 32000).shape == (default.embedding_size,)
    with pytest.raises(AjepaError, match="multiple of the patch size"):
        ajepa.load_encoder(models / "context", target_length=50)
    with pytest.raises(AjepaError, match="not found"):
        ajepa.load_encoder(tmp_path / "missing")
    with pytest.raises(AjepaError, match="no encoder export here"):
        ajepa.load_encoder(tmp_path)
    with pytest.raises(AjepaError, match="no 'predictor' encoder export"):
        ajepa.load_encoder(models, "predictor")
    with pytest.raises(AjepaError, match="the 'context' encoder, not 'target'"):
        ajepa.load_encoder(models / "context", "target")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((models / "context" / "model.safetensors").read_bytes())
    (broken / "config.json").write_text("{not json")
    with pytest.raises(AjepaError, match="unreadable"):
        ajepa.load_encoder(broken)
    (broken / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(AjepaError, match="not an ajepa encoder export"):
        ajepa.load_encoder(broken)
    for bad in (np.zeros((2, 2, 100)), np.zeros((16000, 2)), np.zeros(0), np.full(1000, np.nan)):
        with pytest.raises(AjepaError):
            default.embed(bad, 16000)
    with pytest.raises(AjepaError, match="sample_rate"):
        default.embed(wave, 0)


# the pipeline's own dependencies: an export must load without any of them
BLOCKED = ("dvc", "dvclive", "snakemake", "pandas", "sklearn", "matplotlib", "ruamel")
# Found but unloadable (torch probes for some of them with find_spec, which must not raise)
LIGHT = f"""
import sys
from importlib.machinery import ModuleSpec
class Block:
    def find_spec(self, name, path=None, target=None):
        return ModuleSpec(name, self) if name.split(".")[0] in {BLOCKED!r} else None
    def create_module(self, spec):
        raise ImportError("blocked: " + spec.name)
    def exec_module(self, module):
        raise ImportError("blocked: " + module.__name__)
sys.meta_path.insert(0, Block())
import numpy as np
import ajepa
model = ajepa.load_encoder(sys.argv[1])
print(tuple(model.embed(np.zeros(20000, dtype=np.float32), 22050).shape))
print(sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}))
try:
    import dvc
except ImportError:
    print("dvc blocked")
"""


@pytest.mark.slow
def test_an_export_loads_without_the_pipeline(tiny_export):
    models, _ = tiny_export
    r = subprocess.run([sys.executable, "-c", LIGHT, str(models)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[:3] == [str((8 * 32,)), "[]", "dvc blocked"]


def test_citation_names_the_paper_and_this_version():
    import importlib.metadata
    import re

    import yaml
    from conftest import REPO
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    # pyproject.toml reads the version from ajepa.__version__; the installed metadata must agree too
    assert re.search(r'^version = \{ attr = "ajepa.__version__" \}$', (REPO / "pyproject.toml").read_text(), re.M)
    assert cff["version"] == ajepa.__version__ == importlib.metadata.version("ajepa")
    paper = cff["preferred-citation"]
    assert [a["family-names"] for a in paper["authors"]] == ["Fei", "Fan", "Huang"]
    assert paper["identifiers"][0]["value"] == "arXiv:2311.15830"
