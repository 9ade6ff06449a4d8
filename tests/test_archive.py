"""Safe extraction: hostile tar and zip members are refused by name and nothing lands outside."""

import io
import os
import stat
import tarfile
import zipfile

import pytest

from ajepa.datasets.archive import UnsafeArchive, extract


def _tar(path, members):
    """members: (name, kind, payload): kind 'file' (bytes), 'dir', 'sym' / 'hard' (link target), 'chr'."""
    with tarfile.open(path, "w:gz") as tf:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                         "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("sym", "hard"):
                info.linkname = payload
            tf.addfile(info)
    return path


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, kind, payload in members:
            info = zipfile.ZipInfo(name)
            if kind == "sym":
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, payload)
            elif kind == "chr":
                info.external_attr = (stat.S_IFCHR | 0o644) << 16
                zf.writestr(info, b"")
            else:
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                zf.writestr(info, payload)
    return path


def _build(fmt, path, members):
    return _tar(path, members) if fmt == "tar" else _zip(path, members)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def places(tmp_path):
    target, outside = tmp_path / "target", tmp_path / "outside"
    outside.mkdir()
    return tmp_path, target, outside


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_good_archive_extracts_with_inside_links(places, fmt):
    tmp, target, _ = places
    members = [("top/audio/a.wav", "file", b"A"), ("top/meta/x.csv", "file", b"x,y\n"),
               ("top/docs/audio", "sym", "../audio")]
    archive = _build(fmt, tmp / f"good.{fmt}", members)
    assert extract([archive], target) == 3
    assert (target / "top/audio/a.wav").read_bytes() == b"A"
    assert (target / "top/docs/audio/a.wav").read_bytes() == b"A"  # the link resolves inside


@pytest.mark.parametrize("fmt", ["tar", "zip"])
@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink_out", "absolute_symlink", "through_link", "device"])
def test_hostile_member_refused_and_nothing_written_outside(places, fmt, case):
    tmp, target, outside = places
    evil = {
        "absolute": [("ok.txt", "file", b"1"), (str(outside / "evil.txt"), "file", b"x")],
        "dotdot": [("ok.txt", "file", b"1"), ("a/../../outside/evil.txt", "file", b"x")],
        "symlink_out": [("ok.txt", "file", b"1"), ("a/link", "sym", "../../outside")],
        "absolute_symlink": [("ok.txt", "file", b"1"), ("link", "sym", str(outside))],
        # a link that stays inside, then one that looks inside but climbs out through the first
        "through_link": [("ok.txt", "file", b"1"), ("x", "sym", "."), ("x/esc", "sym", "../outside")],
        "device": [("ok.txt", "file", b"1"), ("dev/null2", "chr", None)],
    }[case]
    archive = _build(fmt, tmp / f"evil.{fmt}", evil)
    with pytest.raises(UnsafeArchive) as e:
        extract([archive], target)
    bad_name = evil[-1][0]
    assert repr(bad_name) in str(e.value) and "refus" in str(e.value)
    assert _files(outside) == []
    assert not any(p.is_symlink() and not os.path.realpath(p).startswith(str(target)) for p in target.rglob("*"))


def test_hard_link_out_of_tree_refused(places):
    tmp, target, outside = places
    archive = _tar(tmp / "hard.tar", [("h", "hard", "../outside/x")])
    with pytest.raises(UnsafeArchive, match="'h' links to '../outside/x'"):
        extract([archive], target)


def test_fifo_refused(places):
    tmp, target, _ = places
    archive = _tar(tmp / "fifo.tar", [("pipe", "fifo", None)])
    with pytest.raises(UnsafeArchive, match="'pipe' is a device or special file"):
        extract([archive], target)


def test_pieces_are_read_as_one_archive(places):
    tmp, target, _ = places
    members = [(f"wav/id{i:05d}/v/00001.wav", "file", os.urandom(5000)) for i in range(6)]
    whole = _zip(tmp / "whole.zip", members).read_bytes()
    pieces = []
    cuts = [0, 7000, 7001, 19000, len(whole)]
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        pieces.append(tmp / f"part{k}")
        pieces[-1].write_bytes(whole[a:b])
    assert extract(pieces, target) == 6
    for name, _, payload in members:
        assert (target / name).read_bytes() == payload


def test_not_an_archive(places):
    tmp, target, _ = places
    junk = tmp / "junk.zip"
    junk.write_bytes(b"<html>404</html>")
    with pytest.raises(Exception, match="neither a zip nor a tar archive"):
        extract([junk], target)
