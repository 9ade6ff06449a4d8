"""Each published dataset, as a tiny copy in its real layout, through `ajepa prepare` and `ajepa features`
(the CLI, in process) from a loopback server or a local source; the manifests must follow the protocols."""

import hashlib
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import mini_datasets as mini
import pandas as pd
import pytest
import yaml
from conftest import load_repo_params
from loopback import Loopback

from ajepa.cli import main
from ajepa.data.store import FeatureStore
from ajepa.datasets.archive import HAS_TAR_FILTERS
from ajepa.datasets.registry import REGISTRY
from ajepa.datasets.speech_commands import SPC1_CLASSES
from ajepa.downstream.protocols import eval_splits


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    server = Loopback(root)
    yield server
    server.close()


@pytest.fixture
def project(tmp_path, monkeypatch):
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def write_params(dataset: str, **prepare) -> None:
    p = load_repo_params()
    p["datasets"][dataset]["prepare"].update(prepare)
    p["features"].update(num_workers=1)
    Path("params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def ajepa(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, the last line of stderr: the one-line error when the code is 2)."""
    code = main(["--params", "params.yaml", *args])
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    if code == 2:
        assert lines[-1].startswith(f"ajepa {args[0]}: error: "), out.err
    return code, out.out, lines[-1] if lines else ""


def manifest(dataset: str):
    rows = pd.read_csv(f"data/manifests/{dataset}.csv", keep_default_na=False, dtype={"clip_id": str, "labels": str})
    meta = json.loads(Path(f"data/manifests/{dataset}.json").read_text())
    missing = pd.read_csv(f"data/manifests/{dataset}.missing.csv", keep_default_na=False, dtype=str)
    return rows, meta, missing


def as_table(rows) -> dict:
    return {r.clip_id: (r.labels, r.split, int(r.fold)) for r in rows.itertuples()}


def checksums(served, names, how=mini.sha256_of) -> dict:
    return {n: how(served.root / n) for n in names}


def prepare_and_features(capsys, dataset: str) -> tuple[pd.DataFrame, dict, pd.DataFrame, FeatureStore]:
    code, out, err = ajepa(capsys, "prepare", dataset)
    assert code == 0, err
    assert out.startswith(f"prepare {dataset}: ")
    code, out, err = ajepa(capsys, "features", dataset)
    assert code == 0, err
    rows, meta, missing = manifest(dataset)
    store = FeatureStore(f"data/features/{dataset}")
    assert list(store.index["clip_id"]) == list(rows["clip_id"])  # every listed clip became features
    assert store.stats["rejected"] == 0 and store.stats["protocol"] == REGISTRY[dataset].protocol
    assert store.shape == (REGISTRY[dataset].target_length, 128)
    assert meta["protocol"] == REGISTRY[dataset].protocol and meta["missing"] == len(missing)
    return rows, meta, missing, store


def no_temporaries(root="data") -> bool:
    return not [p for p in Path(root).rglob(".*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# each dataset from a mirror


def test_esc50_folds_from_the_meta_csv(served, project, capsys):
    expected = mini.esc50(served.root)
    write_params("esc50", mirror=served.url)
    rows, meta, missing, store = prepare_and_features(capsys, "esc50")
    assert as_table(rows) == expected["clips"]
    assert meta["classes"] == mini.ESC50_CLASSES and meta["num_folds"] == 5 and missing.empty
    assert set(rows["sample_rate"]) == {44100} and set(rows["duration_s"]) == {0.5}
    # no published checksum: the sha256 of what was fetched is recorded
    (record,) = meta["files"]
    assert record["sha256"] == hashlib.sha256((served.root / "ESC-50-master.zip").read_bytes()).hexdigest()
    assert record["verified"] is None and record["origin"] == f"{served.url}/ESC-50-master.zip"
    assert [s.name for s in eval_splits(store.index, "folds")] == [f"fold{k}" for k in range(1, 6)]
    assert all(Path(p).is_relative_to("data/raw/esc50") for p in rows["path"]) and no_temporaries()
    # a rerun uses the downloaded archive and writes the same manifest
    before = Path("data/manifests/esc50.csv").read_bytes()
    requests = len(served.requests)
    assert ajepa(capsys, "prepare", "esc50")[0] == 0
    assert len(served.requests) == requests and Path("data/manifests/esc50.csv").read_bytes() == before


def test_spc2_lists_decide_val_and_test(served, project, capsys):
    expected = mini.spc2(served.root)
    write_params("spc2", mirror=served.url, checksums=checksums(served, expected["files"]))
    # an earlier run was killed mid-download: this one resumes it
    archive = (served.root / "speech_commands_v0.02.tar.gz").read_bytes()
    Path("data/downloads").mkdir(parents=True)
    Path("data/downloads/speech_commands_v0.02.tar.gz.part").write_bytes(archive[:1000])
    rows, meta, missing, store = prepare_and_features(capsys, "spc2")
    assert served.requests == [("speech_commands_v0.02.tar.gz", "bytes=1000-", 206)]
    assert as_table(rows) == expected["clips"]  # _background_noise_ is not a word
    assert meta["classes"] == mini.SPC2_WORDS and missing.empty
    assert meta["files"][0]["verified"] == checksums(served, expected["files"])["speech_commands_v0.02.tar.gz"]
    assert meta["published_counts"]["test"] == {"published": 11005, "here": 2}
    (split,) = eval_splits(store.index, "splits")
    assert (len(split.train), len(split.val), len(split.test)) == (5, 2, 2)


def test_spc1_superb_keyword_spotting(served, project, capsys):
    expected = mini.spc1(served.root)
    write_params("spc1", mirror=served.url, checksums={"speech_commands_v0.01.tar.gz":
                                                       mini.sha256_of(served.root / "speech_commands_v0.01.tar.gz")})
    rows, meta, missing, _ = prepare_and_features(capsys, "spc1")
    assert as_table(rows) == expected["clips"]
    assert meta["classes"] == list(SPC1_CLASSES) and len(SPC1_CLASSES) == 12
    assert meta["left_out_testing_list"] == 2 and missing.empty
    silence = rows[(rows["labels"] == "_silence_") & (rows["split"] != "test")]
    assert set(silence["duration_s"]) == {1.0} and all(p.startswith("data/raw/spc1/silence/") for p in silence["path"])
    assert [r["verified"] is not None for r in meta["files"]] == [True, False]  # the test set has no published sum


def test_audioset_20k_missing_clips_listed_and_counted(served, project, capsys, tmp_path):
    expected = mini.audioset(served.root, tmp_path / "audio")
    write_params("as20k", mirror=served.url, audio_dir=str(tmp_path / "audio"), val_fraction=0.5,
                 checksums={"class_labels_indices.csv": mini.sha256_of(served.root / "class_labels_indices.csv")})
    rows, meta, missing, store = prepare_and_features(capsys, "as20k")
    present = {y for y, (_, how) in {**mini.BALANCED, **mini.EVAL}.items() if how not in (None, "m4a")}
    assert set(rows["clip_id"]) == present
    for r in rows.itertuples():
        assert r.labels == expected["labels"][r.clip_id] and r.path == str(expected["audio"][r.clip_id])
        assert r.split == ("test" if r.clip_id in mini.EVAL else r.split) and r.split in ("train", "val", "test")
    assert set(rows.loc[rows["clip_id"].isin(list(mini.BALANCED)), "split"]) == {"train", "val"}
    reasons = dict(zip(missing["clip_id"], missing["reason"]))
    assert set(reasons) == {"zZ9_-xY8wV7", "a1b2c3d4e5f", "e6E7e8E9e0E"}
    assert reasons["a1b2c3d4e5f"].startswith("unsupported format .m4a")
    assert reasons["zZ9_-xY8wV7"] == f"no audio file in {tmp_path / 'audio'}"
    assert dict(zip(missing["clip_id"], missing["listed_in"]))["e6E7e8E9e0E"] == "eval_segments.csv:5"
    assert meta["segments"] == {
        "eval_segments.csv": {"split": "test", "listed": 3, "found": 2, "missing": 1},
        "balanced_train_segments.csv": {"split": "train", "listed": 8, "found": 6, "missing": 2}}
    assert meta["duplicate_files"] == {"count": 1, "first": [str(tmp_path / "audio" / "_kH3y8N1f2o.wav")]}
    assert meta["classes"] == [n for _, n in mini.AUDIOSET_CLASSES] and meta["audio"]["files"] == len(rows)
    (split,) = eval_splits(store.index, "multilabel")
    assert len(split.test) == 2


def test_audioset_2m_adds_unbalanced_with_the_same_val_clips(served, project, capsys, tmp_path):
    mini.audioset(served.root, tmp_path / "audio")
    p = load_repo_params()
    for name in ("as20k", "as2m"):
        p["datasets"][name]["prepare"].update(mirror=served.url, audio_dir=str(tmp_path / "audio"), val_fraction=0.5,
                                              checksums={"class_labels_indices.csv": mini.sha256_of(
                                                  served.root / "class_labels_indices.csv")})
    p["features"].update(num_workers=1)
    Path("params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    assert ajepa(capsys, "prepare", "as20k")[0] == 0
    rows2m, meta, missing, _ = prepare_and_features(capsys, "as2m")
    rows20k, _, _ = manifest("as20k")
    assert set(rows2m["clip_id"]) == set(rows20k["clip_id"]) | {"u1U2u3U4u5U", "uAuBuCuDuEu"}
    shared = rows20k.set_index("clip_id")["split"]
    assert (rows2m.set_index("clip_id").loc[shared.index, "split"] == shared).all()  # a clip's split is its own
    assert meta["segments"]["unbalanced_train_segments.csv"] == {"split": "train", "listed": 3, "found": 2,
                                                                 "missing": 1}
    assert "u6U7u8U9u0U" in set(missing["clip_id"])
    # the CSVs are shared downloads: as2m fetched only what as20k had not
    fetched = [name for name, _, status in served.requests if status == 200]
    assert sorted(fetched) == sorted(set(fetched)) and len(fetched) == 4


def test_vox1_pieces_concatenated_and_iden_split(served, project, capsys):
    expected = mini.vox1(served.root)
    zips = sorted(f for f in expected["files"] if "parta" in f) + ["vox1_test_wav.zip"]
    write_params("vox1", mirror=served.url, checksums=checksums(served, zips, how=mini.md5_of))
    rows, meta, missing, store = prepare_and_features(capsys, "vox1")
    assert as_table(rows) == expected["clips"]
    assert list(missing["clip_id"]) == expected["missing"] and meta["missing"] == 1
    assert meta["classes"] == ["id10001", "id10002", "id10270"]
    assert [r["name"] for r in meta["files"]] == zips + ["iden_split.txt"]
    assert [r["verified"] for r in meta["files"]] == [mini.md5_of(served.root / f) for f in zips] + [None]
    (split,) = eval_splits(store.index, "splits")
    assert (len(split.train), len(split.val), len(split.test)) == (4, 2, 3)


# ---------------------------------------------------------------------------------------------
# local sources: an archive, a folder of downloads, an extracted copy


def test_source_archive_and_extracted_directory(project, capsys, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    expected = mini.esc50(downloads)
    write_params("esc50")
    code, out, err = ajepa(capsys, "prepare", "esc50", "--source", str(downloads / "ESC-50-master.zip"))
    assert code == 0, err
    rows, meta, _ = manifest("esc50")
    assert as_table(rows) == expected["clips"] and meta["source"] == str(downloads / "ESC-50-master.zip")

    extracted = tmp_path / "mine"
    with zipfile.ZipFile(downloads / "ESC-50-master.zip") as zf:
        zf.extractall(extracted)
    before = sorted(p.relative_to(extracted) for p in extracted.rglob("*"))
    write_params("esc50", source=str(extracted))  # the params key, this time
    rows, meta, _, _ = prepare_and_features(capsys, "esc50")
    assert as_table(rows) == expected["clips"]
    assert all(Path(p).is_relative_to(extracted / "ESC-50-master/audio") for p in rows["path"])  # used in place
    assert sorted(p.relative_to(extracted) for p in extracted.rglob("*")) == before  # nothing written there
    listing = meta["in_place"]["main"]
    assert listing["files"] == 15 and listing["path"] == str(extracted / "ESC-50-master")
    assert json.loads(Path("data/raw/esc50/source.json").read_text())["in_place"] == meta["in_place"]


def test_source_folder_of_downloads_offline(project, capsys, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    expected = mini.spc1(downloads)
    write_params("spc1", source=str(downloads), mirror="http://127.0.0.1:9/unreachable",
                 checksums={"speech_commands_v0.01.tar.gz": mini.sha256_of(downloads / "speech_commands_v0.01.tar.gz")})
    code, out, err = ajepa(capsys, "prepare", "spc1")
    assert code == 0, err
    rows, meta, _ = manifest("spc1")
    assert as_table(rows) == expected["clips"]
    assert [r["origin"] for r in meta["files"]] == [str(downloads / n) for n in expected["files"]]


def test_vox1_joined_dev_zip_and_separate_extracted_trees(project, capsys, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    expected = mini.vox1(downloads, pieces=False)
    write_params("vox1", checksums={"vox1_test_wav.zip": mini.md5_of(downloads / "vox1_test_wav.zip")})
    code, _, err = ajepa(capsys, "prepare", "vox1", "--source", str(downloads))
    assert code == 0, err
    rows, meta, _ = manifest("vox1")
    assert as_table(rows) == expected["clips"] and meta["files"][0]["name"] == "vox1_dev_wav.zip"

    trees = tmp_path / "trees"
    for name, sub in (("vox1_dev_wav.zip", "dev"), ("vox1_test_wav.zip", "test")):
        with zipfile.ZipFile(downloads / name) as zf:
            zf.extractall(trees / sub)
    shutil.copy(downloads / "iden_split.txt", trees / "iden_split.txt")
    code, _, err = ajepa(capsys, "prepare", "vox1", "--source", str(trees))
    assert code == 0, err
    rows, meta, _ = manifest("vox1")
    assert as_table(rows) == expected["clips"] and set(meta["in_place"]) == {"dev", "test"}


def test_a_repacked_archive_names_both_ways_forward(project, capsys, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    expected = mini.spc2(downloads)  # not the published 2.4 GB file: what a re-packed copy looks like
    archive = downloads / "speech_commands_v0.02.tar.gz"
    write_params("spc2")
    code, _, err = ajepa(capsys, "prepare", "spc2", "--source", str(archive))
    assert code == 2 and "size mismatch: expected 2428923189 bytes" in err
    assert "set datasets.spc2.prepare.checksums to {speech_commands_v0.02.tar.gz: 'sha256:<its sha256sum>'}" in err
    assert "or pass the extracted folder to --source" in err

    write_params("spc2", checksums={archive.name: "sha256:" + "0" * 64})  # a wrong one, set by hand
    code, _, err = ajepa(capsys, "prepare", "spc2", "--source", str(archive))
    assert code == 2 and "sha256 mismatch" in err and "correct or remove its entry in datasets.spc2" in err

    write_params("spc2", checksums={archive.name: mini.sha256_of(archive)})  # the first way
    assert ajepa(capsys, "prepare", "spc2", "--source", str(archive))[0] == 0
    assert as_table(manifest("spc2")[0]) == expected["clips"]

    extracted = tmp_path / "mine"  # the second way
    with tarfile.open(archive) as tf:
        tf.extractall(extracted, **({"filter": "data"} if HAS_TAR_FILTERS else {}))  # a trusted test archive
    write_params("spc2")
    assert ajepa(capsys, "prepare", "spc2", "--source", str(extracted))[0] == 0
    assert as_table(manifest("spc2")[0]) == expected["clips"]


def test_source_errors_are_one_line(project, capsys, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    mini.spc1(downloads)
    write_params("spc1")
    code, _, err = ajepa(capsys, "prepare", "spc1", "--source", str(downloads / "speech_commands_v0.01.tar.gz"))
    assert code == 2 and "spc1 is distributed as several files" in err
    (downloads / "speech_commands_test_set_v0.01.tar.gz").unlink()
    code, _, err = ajepa(capsys, "prepare", "spc1", "--source", str(downloads))
    assert code == 2 and "spc1 part 'test' not found" in err and "speech_commands_test_set_v0.01.tar.gz" in err
    code, _, err = ajepa(capsys, "prepare", "spc1", "--source", str(tmp_path / "nowhere"))
    assert code == 2 and "no such file or directory" in err
    assert ajepa(capsys, "prepare", "synth", "--source", str(downloads))[0] == 2
    assert not Path("data/raw/spc1").exists() and no_temporaries()


# ---------------------------------------------------------------------------------------------
# what must stop the stage, leaving nothing behind


def test_real_checksums_still_apply_to_a_mirror(served, project, capsys):
    mini.spc2(served.root)
    write_params("spc2", mirror=served.url)  # the registry's size and sha256, not the test archive's
    code, _, err = ajepa(capsys, "prepare", "spc2")
    assert code == 2 and "size mismatch: expected 2428923189 bytes" in err
    assert not Path("data/raw/spc2").exists()
    assert [p.name.endswith(".corrupt") for p in Path("data/downloads").iterdir()] == [True]


def test_wrong_configured_checksum(served, project, capsys):
    mini.esc50(served.root)
    write_params("esc50", mirror=served.url, checksums={"ESC-50-master.zip": "sha256:" + "0" * 64})
    code, _, err = ajepa(capsys, "prepare", "esc50")
    got = hashlib.sha256((served.root / "ESC-50-master.zip").read_bytes()).hexdigest()
    assert code == 2 and f"sha256 mismatch: expected {'0' * 64}, got {got}" in err
    assert not Path("data/raw/esc50").exists() and not Path("data/downloads/ESC-50-master.zip").exists()


def test_unsafe_archive_refused_by_prepare(served, project, capsys, tmp_path):
    with zipfile.ZipFile(served.root / "ESC-50-master.zip", "w") as zf:
        zf.writestr("ESC-50-master/meta/esc50.csv", "filename,fold,target,category\n")
        zf.writestr("../../escaped.txt", "x")
    write_params("esc50", mirror=served.url)
    code, _, err = ajepa(capsys, "prepare", "esc50")
    assert code == 2 and "member '../../escaped.txt' has a '..' component" in err
    assert not list(tmp_path.rglob("escaped.txt")) and not Path("data/raw/esc50").exists() and no_temporaries()


def test_listed_but_missing_clip(served, project, capsys):
    mini.esc50(served.root, drop=("3-100023-A-2.wav",))
    write_params("esc50", mirror=served.url)
    code, out, _ = ajepa(capsys, "prepare", "esc50")
    rows, meta, missing = manifest("esc50")
    assert code == 0 and len(rows) == 14 and meta["missing"] == 1
    assert missing.to_dict("records") == [{"clip_id": "3-100023-A-2", "split": "train",
                                           "listed_in": "meta/esc50.csv", "reason": "file not found"}]
    assert "1 listed but missing" in out and "clips 15 (published 2000)" in out


def test_audioset_needs_audio_dir(project, capsys):
    write_params("as20k")
    code, _, err = ajepa(capsys, "prepare", "as20k")
    assert code == 2 and "datasets.as20k.prepare.audio_dir is not set" in err
    write_params("as20k", audio_dir="no/such/folder")
    code, _, err = ajepa(capsys, "prepare", "as20k")
    assert code == 2 and "datasets.as20k.prepare.audio_dir = 'no/such/folder': not a directory" in err
    assert not Path("data/downloads").exists()  # checked before anything is fetched
