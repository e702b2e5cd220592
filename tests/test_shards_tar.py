"""The tar reading of the shard streams (`quest.shards.shardlist.shard_samples`, webdataset's
`tarfile_samples`): the samples webdataset yields on every tar format Python writes, and damaged
archives raised or noticed against the size index."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from quest.shards import shard_samples

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
def test_samples_of_every_tar_format(tmp_path, fmt, compress):
    names = NAMES + (["é/ünïcode.jpg"] if fmt != tarfile.USTAR_FORMAT else [])
    path = tmp_path / "shard.tar"
    _write(path, fmt, names)
    if compress:
        path = path.rename(tmp_path / "shard.tar.gz")
        path.write_bytes(gzip.compress(path.read_bytes()))
    ours = list(shard_samples(str(path)))
    assert ours == list(wds.tarfile_samples([{"url": str(path)}]))
    assert [s["__key__"] for s in ours] == ["k0", "k1", LONG, "dir/k2", "k3"] + (
        ["é/ünïcode"] if fmt != tarfile.USTAR_FORMAT else []
    )
    assert ours[1]["seg.png"] and ours[1]["cls"] == b"payload 3 " * 111
    assert all(s["__url__"] == str(path) for s in ours)


def test_truncated_tar_is_an_error(tmp_path):
    path = tmp_path / "ok.tar"
    _write(path, tarfile.GNU_FORMAT, NAMES)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        third = tar.getmembers()[3]
    path.write_bytes(data[: third.offset_data + 5])  # cut inside a member
    with pytest.raises(ValueError, match="tar truncated or damaged: unexpected end of data"):
        list(shard_samples(str(path)))
    path.write_bytes(b"\xff" * 1024)  # not a tar at all
    with pytest.raises(ValueError, match="tar truncated or damaged"):
        list(shard_samples(str(path)))
    # a damaged header or a cut between members ends the shard early (tarfile's stream reading):
    # the readers compare the count with the size index (tests/test_shards.py)
    path.write_bytes(data[: third.offset + 10] + b"X" + data[third.offset + 11 :])
    assert len(list(shard_samples(str(path)))) == 1
    path.write_bytes(data[: third.offset])
    assert len(list(shard_samples(str(path)))) == 1
