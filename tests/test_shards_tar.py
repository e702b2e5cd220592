"""The tar reader of the shard streams (`quest.shards.tar`): the same samples as webdataset's reader
on every tar format Python writes, and a clear error on damaged archives."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from quest.shards.tar import tar_samples

LONG = "deep/" * 30 + "sample_with_a_long_key"  # > 100 characters: prefix, GNU or pax names


def _write(path: Path, fmt: int, names: list[str]) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE  # a directory member is not a sample
        tar.addfile(folder)
        for i, name in enumerate(names):
            data = f"payload {i} ".encode() * (i * 37 % 200)  # sizes on and off block boundaries
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("folder/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, names[0]
        tar.addfile(link)


NAMES = [
    "k0.jpg",
    "k0.cls",
    "k1.seg.png",  # the key ends at the first dot: field "seg.png"
    "k1.CLS",  # extensions are lower-cased
    "__meta__/k9.jpg",  # webdataset metadata: skipped
    f"{LONG}.jpg",
    f"{LONG}.cls",
    "dir/k2.jpg",
    "dir/k2.cls",
    "k3.empty",
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compress", [False, True])
def test_same_samples_as_webdataset(tmp_path, fmt, compress):
    names = NAMES + (["é/ünïcode.jpg"] if fmt != tarfile.USTAR_FORMAT else [])
    path = tmp_path / "shard.tar"
    _write(path, fmt, names)
    if compress:
        path = path.rename(tmp_path / "shard.tar.gz")
        path.write_bytes(gzip.compress(path.read_bytes()))
    ours = list(tar_samples(str(path)))
    theirs = list(wds.tarfile_samples([{"url": str(path)}]))
    assert ours == theirs
    assert [s["__key__"] for s in ours][:3] == ["k0", "k1", LONG]
    assert ours[1]["seg.png"] and ours[1]["cls"] == b"payload 3 " * 111


def _shard(tmp_path: Path) -> bytes:
    path = tmp_path / "ok.tar"
    _write(path, tarfile.GNU_FORMAT, NAMES)
    return path.read_bytes()


def test_truncated_or_damaged_tar_is_an_error(tmp_path):
    data = _shard(tmp_path)
    with tarfile.open(tmp_path / "ok.tar") as tar:
        third = tar.getmembers()[3]
    cases = {
        "in the member": data[: third.offset_data + 5],
        "in a header": data[: third.offset + 100],
        "checksum": data[: third.offset + 10] + b"X" + data[third.offset + 11 :],
        "not a tar header": data[: third.offset] + b"\xff" * 1024,
    }
    for message, damaged in cases.items():
        path = tmp_path / "bad.tar"
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=message):
            list(tar_samples(str(path)))
    # cut exactly between two members: a shorter archive, not an error (as tarfile and webdataset)
    path.write_bytes(data[: third.offset])
    assert len(list(tar_samples(str(path)))) == 1
