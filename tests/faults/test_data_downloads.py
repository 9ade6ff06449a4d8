"""Cut downloads and broken archives: never installed under their final name, one line, a rerun heals."""

import io
import os
import tarfile
import zipfile

import pytest
from loopback import Loopback

from ajepa.datasets.archive import extract
from ajepa.datasets.download import download
from ajepa.datasets.registry import REGISTRY
from ajepa.datasets.sources import obtain
from ajepa.errors import AjepaError

FAST = dict(backoff_s=0.01, timeout_s=5)
NAME = "ESC-50-master.zip"  # published with neither size nor checksum: only the transfer can tell


def _esc50_zip(path, payload_bytes=3 << 20):
    """An archive in the ESC-50 layout, made large (incompressible audio bytes) so a cut lands inside."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ESC-50-master/meta/esc50.csv", "filename,fold,target,category\na.wav,1,0,dog\n")
        zf.writestr("ESC-50-master/audio/a.wav", os.urandom(payload_bytes))
    return path.read_bytes()


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    payload = _esc50_zip(served / NAME)
    loop = Loopback(served)
    yield loop, payload
    loop.close()


def test_a_cut_without_length_stays_part_and_the_rerun_resumes(server, tmp_path):
    loop, payload = server
    loop.truncate_once[NAME] = 1 << 20
    loop.cut_unannounced.add(NAME)
    dest = tmp_path / "downloads" / NAME
    with pytest.raises(AjepaError, match=r"without announcing the length.*kept in .*\.part.*rerun to resume"):
        download(f"{loop.url}/{NAME}", dest, **FAST)
    assert not dest.exists()
    assert (tmp_path / "downloads" / f"{NAME}.part").stat().st_size == 1 << 20
    download(f"{loop.url}/{NAME}", dest, **FAST)
    assert dest.read_bytes() == payload
    assert loop.requests[-1][1] == f"bytes={1 << 20}-"  # resumed, not fetched again
    assert sorted(p.name for p in dest.parent.iterdir()) == [NAME]


def test_an_installed_cut_archive_is_set_aside_and_fetched_again(server, tmp_path):
    """A cut file that an earlier run installed (nothing could verify it) does not poison every rerun."""
    loop, payload = server
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / NAME).write_bytes(payload[:1 << 20])
    with pytest.raises(AjepaError) as raised:
        obtain(REGISTRY["esc50"], tmp_path / "raw1", downloads, mirror=loop.url)
    message = str(raised.value)
    assert "\n" not in message and NAME in message and "set aside" in message and "rerun" in message
    assert not (downloads / NAME).exists()
    located = obtain(REGISTRY["esc50"], tmp_path / "raw2", downloads, mirror=loop.url)
    assert (located.roots["main"] / "meta" / "esc50.csv").is_file()
    assert (downloads / NAME).read_bytes() == payload


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz", "w"])
def test_a_truncated_tar_is_one_line_naming_it(tmp_path, mode):
    archive = tmp_path / f"data.tar{'.' + mode[2:] if ':' in mode else ''}"
    with tarfile.open(archive, mode) as tf:
        for k in range(3):
            data = os.urandom(200_000)
            info = tarfile.TarInfo(f"data/part{k}.bin")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    archive.write_bytes(archive.read_bytes()[:300_000])
    with pytest.raises(AjepaError) as raised:
        extract([archive], tmp_path / "out")
    message = str(raised.value)
    assert "\n" not in message and archive.name in message and "delete it" in message and "rerun" in message


def test_a_truncated_zip_is_one_line_naming_it(tmp_path):
    archive = tmp_path / "data.zip"
    payload = _esc50_zip(archive, 300_000)
    archive.write_bytes(payload[:200_000])
    with pytest.raises(AjepaError, match=r"data\.zip: .*delete it"):
        extract([archive], tmp_path / "out")
