"""A dataset's listing names files inside its own folder only: absolute names and `..` are refused."""

import pytest

from ajepa.datasets import esc50
from ajepa.datasets.manifest import unlabeled_rows
from ajepa.datasets.sources import Located
from ajepa.errors import AjepaError


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data" / "raw" / "esc50"
    (root / "meta").mkdir(parents=True)
    (root / "audio").mkdir()
    (root / "audio" / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "x.wav").write_bytes(b"RIFF")  # a file outside the dataset that a hostile row points at
    return tmp_path, root


@pytest.mark.parametrize("name", ["../../../x.wav", "{outside}", "sub/../../../../x.wav"])
def test_esc50_rows_leading_outside_are_refused_by_line(dataset, name):
    tmp_path, root = dataset
    name = name.format(outside=tmp_path / "x.wav")
    (root / "meta" / "esc50.csv").write_text(f"filename,fold,target,category\na.wav,1,0,dog\n{name},1,1,cat\n")
    with pytest.raises(AjepaError) as raised:
        esc50.build(Located(roots={"main": root}), root)
    message = str(raised.value)
    assert "\n" not in message and "esc50.csv line 3" in message and repr(name) in message, message


def test_pool_listing_leading_outside_is_refused(dataset):
    tmp_path, root = dataset
    (root / "meta" / "pool.csv").write_text("filename\na.wav\n/etc/passwd\n")
    with pytest.raises(AjepaError, match=r"pool\.csv line 3: filename '/etc/passwd' has an absolute path"):
        unlabeled_rows(root, "meta/pool.csv", "audio")


def test_names_inside_are_kept(dataset):
    tmp_path, root = dataset
    (root / "meta" / "esc50.csv").write_text("filename,fold,target,category\na.wav,1,0,dog\n")
    built = esc50.build(Located(roots={"main": root}), root)
    assert built.rows["path"].tolist() == [str(root / "audio" / "a.wav")]
