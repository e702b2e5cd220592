"""WebDataset shards: conversion round trips, exact validation coverage over ranks × workers, equal
training batch counts, corrupt members, missing shards and resumable conversion (CPU, tiny data)."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import http.server
import io
import json
import os
import pickle
import shutil
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, encode_png

from quest import data as qdata
from quest import shards
from quest.data import DataError, transforms
from quest.recipe import Data
from quest.shards import (
    Batcher,
    ExactStream,
    build_wds_loaders,
    convert,
    load_index,
    reader_plan,
    wds_feature_loader,
)
from quest.shards.stream import SHUFFLE_INITIAL

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (not installed here)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def identity(x):
    return x


def _image(g: torch.Generator, channels: int = 3) -> torch.Tensor:
    h, w = (int(v) for v in torch.randint(9, 20, (2,), generator=g))
    return torch.randint(0, 256, (channels, h, w), generator=g, dtype=torch.uint8)


def make_folder(root: Path, classes: int, train: int, val: int, seed: int = 0) -> dict[str, tuple]:
    """root/{train,val}/<class>/<file>, alternating PNG and JPEG, names with dots in them.
    Returns {path: (label, bytes, expected pixels)}."""
    g = torch.Generator().manual_seed(seed)
    files = {}
    for split, per_class in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class.{c:02d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = _image(g)
                if i % 2:
                    path = folder / f"img.{c}.{i}.JPEG"
                    data = encode_jpeg(img, quality=90).numpy().tobytes()
                    pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                else:
                    path = folder / f"img.{c}.{i}.png"
                    data = encode_png(img).numpy().tobytes()
                    pixels = img  # PNG: exactly the array written
                path.write_bytes(data)
                files[str(path)] = (c, data, pixels)
    return files


def read_all(out: Path, split: str, mode=ImageReadMode.RGB) -> Counter:
    """(label, shape, pixel bytes) of every sample the exact reader yields, one process."""
    urls = sorted(str(p) for p in out.glob(f"{split}-*.tar"))
    _, counts = load_index(urls)
    got = Counter()
    for x, y in ExactStream(urls, counts, 0, 1, 1, identity, mode):
        got[(int(y[0]), tuple(x[0].shape), x[0].numpy().tobytes())] += 1
    return got


def members(out: Path) -> dict[str, bytes]:
    result = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                result[f"{shard.name}/{m.name}"] = tar.extractfile(m).read()
    return result


# --------------------------------------------------------------------------------------- conversion


def test_folder_round_trip(tmp_path):
    files = make_folder(tmp_path / "src", classes=3, train=7, val=3)
    bad = tmp_path / "src" / "train" / "class.01" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    index = convert(
        tmp_path / "src",
        tmp_path / "out",
        shard_size=5,
        val_shard_size=4,
        workers=1,
        progress=False,
    )

    assert index["classes"] == ["class.00", "class.01", "class.02"]
    assert index["channels"] == 3 and index["num_classes"] == 3 and index["family"] == "imagenet"
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert (train["total"], val["total"]) == (21, 9)
    # 22 files in shards of 5, one skipped: the shard that held it is one short
    assert sorted(train["shards"].values()) in ([1, 5, 5, 5, 5], [2, 4, 5, 5, 5])
    assert list(val["shards"]) == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert [s["path"] for s in train["skipped"]] == [str(bad)]
    assert train["skipped"][0]["reason"]
    assert (
        json.loads((tmp_path / "out" / "sizes.json").read_text())["splits"]["train"]["total"] == 21
    )

    # every member: a dot-free key, the original bytes (no re-encode), the right label
    stored = members(tmp_path / "out")
    by_bytes = {data: label for label, data, _ in files.values()}
    images = {k: v for k, v in stored.items() if not k.endswith(".cls")}
    assert len(images) == 30
    for name, data in images.items():
        key = name.split("/", 1)[1].rsplit(".", 1)[0]
        assert "." not in key and key.startswith("img_")
        assert data in by_bytes
        assert int(stored[name.rsplit(".", 1)[0] + ".cls"]) == by_bytes[data]
    assert sorted(stored[n] for n in images) == sorted(d for _, d, _ in files.values())

    # the reader decodes every sample exactly once, pixels identical to the source
    for split in ("train", "val"):
        expected = Counter(
            (label, tuple(px.shape), px.numpy().tobytes())
            for path, (label, _, px) in files.items()
            if f"/{split}/" in path
        )
        assert read_all(tmp_path / "out", split) == expected


def test_flat_val_folder_with_label_file(tmp_path):
    files = make_folder(tmp_path / "src", classes=3, train=1, val=2)
    flat = tmp_path / "src" / "val"
    lines, expected = [], Counter()
    for i, (path, (label, _, pixels)) in enumerate(sorted(files.items())):
        if "/val/" in path:
            name = Path(path).name
            Path(path).rename(flat / name)
            lines.append(
                f"{name} {label if i % 2 else f'class.{label:02d}'}"
            )  # index or class name
            expected[(label, tuple(pixels.shape), pixels.numpy().tobytes())] += 1
    for folder in flat.iterdir():
        if folder.is_dir():
            folder.rmdir()
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="--val-labels"):
        convert(tmp_path / "src", tmp_path / "x", splits=("val",), workers=1, progress=False)
    index = convert(
        tmp_path / "src",
        tmp_path / "out",
        splits=("val",),
        val_labels=str(tmp_path / "labels.txt"),
        workers=1,
        progress=False,
    )
    assert index["splits"]["val"]["total"] == 6 and index["classes"][2] == "class.02"
    assert read_all(tmp_path / "out", "val") == expected
    (tmp_path / "labels.txt").write_text("img.0.0.png 7\n")
    with pytest.raises(DataError, match="neither a class name nor < 3"):
        convert(
            tmp_path / "src",
            tmp_path / "y",
            splits=("val",),
            val_labels=str(tmp_path / "labels.txt"),
        )


def test_folder_splits_share_one_checked_numbering(tmp_path):
    """One class list for both splits, from train's non-empty class folders, recorded in sizes.json."""
    make_folder(tmp_path / "src", classes=3, train=2, val=1)
    shutil.rmtree(tmp_path / "src" / "val" / "class.01")
    with pytest.raises(DataError, match=r"class\.01"):
        convert(tmp_path / "src", tmp_path / "a", workers=1, progress=False)
    make_folder(tmp_path / "src2", classes=3, train=2, val=1)
    (tmp_path / "src2" / "train" / "class.00.empty").mkdir()
    with pytest.raises(DataError, match=r"class\.00\.empty.* no image"):
        convert(tmp_path / "src2", tmp_path / "b", workers=1, progress=False)


def test_mit67_splits_share_the_training_numbering(tmp_path):
    src = tmp_path / "MIT67"
    train, test = ["bar/a.png", "kitchen/b.png", "zoo/c.png"], ["kitchen/t.png", "zoo/u.png"]
    g = torch.Generator().manual_seed(0)
    for entry in train + test:
        (src / "Images" / entry).parent.mkdir(parents=True, exist_ok=True)
        (src / "Images" / entry).write_bytes(encode_png(_image(g)).numpy().tobytes())
    (src / "TrainImages.txt").write_text("\n".join(train) + "\n")
    (src / "TestImages.txt").write_text("\n".join(test) + "\n")
    with pytest.raises(DataError, match="bar"):  # numbered on its own, kitchen would be 0
        convert(src, tmp_path / "a", workers=1, progress=False)
    (src / "TestImages.txt").write_text("\n".join([*test, "bar/a.png"]) + "\n")
    index = convert(src, tmp_path / "b", workers=1, progress=False)
    assert index["kind"] == "mit67" and index["classes"] == ["bar", "kitchen", "zoo"]
    labels = Counter(y for y, _, _ in read_all(tmp_path / "b", "val"))
    assert labels == {0: 1, 1: 1, 2: 1}


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "fmnist"
    src.mkdir()
    data = {}
    for prefix, n in (("train", 23), ("t10k", 7)):
        x, y = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        _write_idx(src / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", y)
        data[prefix] = (x, y)
    index = convert(
        src, tmp_path / "out", shard_size=10, val_shard_size=3, workers=1, progress=False
    )
    assert (
        index["kind"] == "fashion_mnist" and index["channels"] == 1 and index["family"] == "mnist"
    )
    assert [len(index["splits"][s]["shards"]) for s in ("train", "val")] == [3, 3]
    for split, prefix in (("train", "train"), ("val", "t10k")):
        x, y = data[prefix]
        expected = Counter(
            (int(b), (1, 28, 28), a.astype(np.uint8).tobytes()) for a, b in zip(x, y)
        )
        assert read_all(tmp_path / "out", split, ImageReadMode.GRAY) == expected
    assert all(n.endswith((".png", ".cls")) for n in members(tmp_path / "out"))


def test_cifar_pickle_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "cifar-100-python"
    src.mkdir()
    data = {}
    for split, n in (("train", 12), ("test", 5)):
        x, y = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 100, n).tolist()
        (src / split).write_bytes(pickle.dumps({"data": x, "fine_labels": y}))
        data[split] = (x, y)
    (src / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    index = convert(tmp_path, tmp_path / "out", shard_size=5, workers=1, progress=False)
    assert (
        index["kind"] == "cifar100" and index["num_classes"] == 100 and index["family"] == "cifar"
    )
    for split, source in (("train", "train"), ("val", "test")):
        x, y = data[source]
        expected = Counter((b, (3, 32, 32), a.tobytes()) for a, b in zip(x, y))
        assert read_all(tmp_path / "out", split) == expected


# --------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize(
    ("family", "channels", "size"), [("imagenet", 3, 40), ("cifar", 3, 32), ("mnist", 1, 28)]
)
@pytest.mark.parametrize("train", [True, False])
def test_batcher_and_model_input_match_the_v2_pipeline(family, channels, size, train):
    transform = transforms(
        Data(transforms=family, image_size=16 if family == "imagenet" else 0), train
    )
    g = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (channels, size, size), generator=g, dtype=torch.uint8)
        for _ in range(5)
    ]
    torch.manual_seed(7)
    expected = torch.stack([transform(x) for x in images])
    torch.manual_seed(7)
    batcher = Batcher(transform)
    assert batcher.norm is not None and batcher.to_model_input() is None  # fused in the worker
    x, y = batcher.batch([(batcher.image(img), i) for i, img in enumerate(images)])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(x, expected, rtol=0, atol=2e-6)  # one multiply-add vs four ops

    torch.manual_seed(7)
    deferred = Batcher(transform, defer=True)  # as for a CUDA device: uint8 out of the workers
    raw, y = deferred.batch([(deferred.image(img), i) for i, img in enumerate(images)])
    assert raw.dtype == torch.uint8 and y.tolist() == [0, 1, 2, 3, 4]
    finished, _ = deferred.to_model_input("cpu")((raw, y))
    assert torch.equal(finished, x)


@pytest.mark.parametrize(
    ("counts", "readers"), [([5, 5, 3], 4), ([2], 4), ([7, 1, 0, 9], 3), ([1000] * 3, 16)]
)
def test_reader_plan_partitions_evenly(counts, readers):
    total = sum(counts)
    for keep in (
        None,
        np.array(sorted(np.random.default_rng(0).choice(total, total // 2, replace=False))),
    ):
        seen, sizes = [], []
        for r in range(readers):
            mine = []
            for shard, first, stop, picks in reader_plan(counts, r, readers, keep):
                offsets = sorted(picks) if picks is not None else range(first, stop)
                assert all(first <= o < stop <= counts[shard] for o in offsets)
                mine += [sum(counts[:shard]) + o for o in offsets]
            seen += mine
            sizes.append(len(mine))
        assert sorted(seen) == (list(range(total)) if keep is None else keep.tolist())
        assert max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def unique_labels(tmp_path_factory):
    """Shards where the label identifies the sample: 12 classes, 2 train / 1 val image each."""
    root = tmp_path_factory.mktemp("unique")
    make_folder(root / "src", classes=12, train=2, val=1)
    convert(root / "src", root / "many", shard_size=5, val_shard_size=2, workers=1, progress=False)
    convert(root / "src", root / "few", shard_size=5, val_shard_size=12, workers=1, progress=False)
    return root


def _cfg(out: Path, **kw) -> Data:
    return Data(
        dataset="wds",
        train_shards=str(out / "train-{000000..000004}.tar"),
        val_shards=str(
            out / ("val-{000000..000005}.tar" if out.name == "many" else "val-000000.tar")
        ),
        image_size=8,
        **kw,
    )


@pytest.mark.parametrize("layout", ["many", "few"])  # 6 val shards, or 1 shard for 4 readers
def test_two_ranks_two_workers(unique_labels, layout):
    cfg = _cfg(unique_labels / layout, batch_size=4, eval_batch_size=2, num_workers=2)
    seen, per_rank = Counter(), []
    for rank in (0, 1):
        loaders = build_wds_loaders(cfg, seed=3, rank=rank, world=2, pin=False)
        assert (loaders.train_size, loaders.eval_size, loaders.num_classes) == (24, 12, 12)
        assert (loaders.in_channels, loaders.image_size) == (3, 8)
        labels = [int(v) for _, y in loaders.eval for v in y]
        assert len(labels) == 6  # balanced ranks even with a single shard
        seen.update(labels)
        batches = loaders.train_batches
        assert batches.batches_per_epoch == 6  # ceil(24 samples / global batch 4)
        counts = []
        for epoch, start in ((0, 0), (1, 4), (2, 6)):
            batches.set_epoch(epoch, start)
            got = list(loaders.train)
            counts.append(len(got))
            for x, y in got:
                assert (
                    x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
                )
        per_rank.append(counts)
    assert seen == Counter(range(12))  # every validation sample exactly once over 2 × 2 readers
    assert per_rank == [[6, 2, 0], [6, 2, 0]]


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("/data/in-wds/train-000001.tar", "train-000001.tar"),
        ("https://host/b/val-000003.tar", "val-000003.tar"),
        ("pipe:aws s3 cp s3://bucket/in/train-000001.tar -", "train-000001.tar"),
        ("pipe:curl -s -L 'https://host/x/train-000002.tar.gz'", "train-000002.tar.gz"),
        ("pipe:gsutil cat gs://b/dir.v2/val-000000.tgz", "val-000000.tgz"),
        ("pipe:./fetch shard 7", None),
    ],
)
def test_shard_names_in_urls_and_pipes(url, name):
    if name is None:
        with pytest.raises(DataError, match="no shard file name"):
            shards.shardlist._shard_name(url)
    else:
        assert shards.shardlist._shard_name(url) == name


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) through curl")
def test_shards_over_http_and_pipes(unique_labels):
    """Remote shards as webdataset opens them: http(s) (through curl; here a local server) and
    `pipe:` commands, whose size index is named by data.shard_index."""
    root = unique_labels / "many"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = Data(
            dataset="wds",
            train_shards=f"pipe:cat {root}/train-{{000000..000004}}.tar",
            val_shards=f"{base}/val-{{000000..000005}}.tar",
            image_size=8,
            batch_size=4,
            num_workers=1,
        )
        with pytest.raises(DataError, match=r"sizes\.json for pipe:cat .* data\.shard_index"):
            build_wds_loaders(cfg, seed=0, rank=0, world=1, pin=False)
        cfg = dataclasses.replace(cfg, shard_index=f"{base}/sizes.json")
        loaders = build_wds_loaders(cfg, seed=0, rank=0, world=1, pin=False)
        assert (loaders.train_size, loaders.eval_size) == (24, 12)
        assert sorted(int(v) for _, y in loaders.eval for v in y) == list(range(12))
        assert len(list(loaders.train)) == loaders.train_batches.batches_per_epoch == 6
    finally:
        server.shutdown()


def test_feature_loader_covers_subset_once(unique_labels):
    cfg = _cfg(unique_labels / "many", batch_size=4, eval_batch_size=4, num_workers=2)
    for max_images, expected in ((0, 24), (10, 10)):
        labels = []
        for rank in (0, 1):
            loader = wds_feature_loader(cfg, seed=0, rank=rank, world=2, max_images=max_images)
            batches = list(loader)
            assert all(x.shape[1:] == (3, 8, 8) for x, _ in batches)
            labels += [int(v) for _, y in batches for v in y]
        assert len(labels) == expected
        if max_images == 0:
            assert Counter(labels) == Counter({c: 2 for c in range(12)})


def test_training_stream_is_epoch_seeded(unique_labels):
    cfg = _cfg(unique_labels / "many", batch_size=4, num_workers=0)
    loaders = build_wds_loaders(cfg, seed=0, rank=0, world=1, pin=False)
    epoch = []
    for e in (0, 0, 1):
        loaders.train_batches.set_epoch(e)
        epoch.append(torch.cat([x for x, _ in loaders.train]))
    assert torch.equal(epoch[0], epoch[1])
    assert not torch.equal(epoch[0], epoch[2])
    other = build_wds_loaders(cfg, seed=0, rank=1, world=2, pin=False)
    other.train_batches.set_epoch(0)
    assert not torch.equal(next(iter(other.train))[0], epoch[0][:2])


def test_consecutive_epochs_continue_the_stream(unique_labels, monkeypatch):
    """Epoch e + 1 goes on with epoch e's stream instead of refilling the shuffle buffer (which would
    read hundreds of samples for a 24-sample epoch); a resumed epoch starts afresh; reproducible."""
    reads = Counter()
    shard_samples = shards.stream.shard_samples

    def counting(url):
        for sample in shard_samples(url):
            reads["n"] += 1
            yield sample

    monkeypatch.setattr(shards.stream, "shard_samples", counting)
    cfg = _cfg(unique_labels / "many", batch_size=4, num_workers=0)
    runs = []
    for _ in range(2):
        loaders = build_wds_loaders(cfg, seed=0, rank=0, world=1, pin=False)
        epochs, per_epoch = [], []
        for epoch, start in ((0, 0), (1, 0), (2, 3)):  # (2, 3): resumed after batch 3
            reads.clear()
            loaders.train_batches.set_epoch(epoch, start)
            epochs.append(torch.cat([x for x, _ in loaders.train]))
            per_epoch.append(reads["n"])
        assert [len(x) for x in epochs] == [24, 24, 12]
        assert per_epoch[0] >= SHUFFLE_INITIAL and per_epoch[2] >= SHUFFLE_INITIAL
        assert per_epoch[1] <= 2 * 24 + 1  # the buffer grows by one per sample taken
        runs.append(epochs)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert not torch.equal(runs[0][0], runs[0][1])


# --------------------------------------------------------------------------------------- failures


def _shard_dir(tmp_path: Path, bad_split: str) -> Path:
    """One train and one val shard of 6 samples; sample 'k3' of `bad_split` is not an image."""
    out = tmp_path / "bad"
    out.mkdir()
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        with tarfile.open(out / f"{split}-000000.tar", "w") as tar:
            for i in range(6):
                data = encode_png(_image(g)).numpy().tobytes()
                if split == bad_split and i == 3:
                    data = b"\x89PNG\r\n\x1a\n truncated"
                for name, blob in ((f"k{i}.png", data), (f"k{i}.cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    index = {
        "classes": ["a", "b"],
        "num_classes": 2,
        "channels": 3,
        "family": "imagenet",
        "splits": {s: {"total": 6, "shards": {f"{s}-000000.tar": 6}} for s in ("train", "val")},
    }
    (out / "sizes.json").write_text(json.dumps(index))
    return out


def _bad_cfg(out: Path, workers: int) -> Data:
    return Data(
        dataset="wds",
        train_shards=str(out / "train-000000.tar"),
        val_shards=str(out / "val-000000.tar"),
        batch_size=4,
        num_workers=workers,
        image_size=8,
    )


def test_corrupt_train_member_is_skipped_and_counted(tmp_path):
    out = _shard_dir(tmp_path, "train")
    loaders = build_wds_loaders(_bad_cfg(out, 0), seed=0, rank=0, world=1, pin=False)
    with pytest.warns(UserWarning, match=r"train-000000\.tar key k3"):
        batches = list(loaders.train)
    assert len(batches) == loaders.train_batches.batches_per_epoch == 2
    assert loaders.train_batches.corrupt > 0
    assert all(len(y) == 4 for _, y in batches)
    # a worker process reports through shared memory
    loaders = build_wds_loaders(_bad_cfg(out, 1), seed=0, rank=0, world=1, pin=False)
    assert len(list(loaders.train)) == 2
    assert loaders.train_batches.corrupt > 0
    assert sum(len(y) for _, y in loaders.eval) == 6  # the validation shard is fine


def test_corrupt_val_member_is_an_error(tmp_path):
    out = _shard_dir(tmp_path, "val")
    loaders = build_wds_loaders(_bad_cfg(out, 0), seed=0, rank=0, world=1, pin=False)
    with pytest.raises(DataError, match=r"val-000000\.tar, key k3"):
        list(loaders.eval)
    loaders.train_batches.set_epoch(0)
    assert len(list(loaders.train)) == 2


def test_truncated_shard(tmp_path):
    """A shard cut short (say, a copy killed half-way): training warns, counts and reads on; validation
    is an error naming the shard and the last good key."""
    out = _shard_dir(tmp_path, "none")
    for split in ("train", "val"):
        path = out / f"{split}-000000.tar"
        with tarfile.open(path) as tar:
            cut = tar.getmembers()[4].offset_data + 5  # inside k2.png: k1 is lost with k2
        path.write_bytes(path.read_bytes()[:cut])
    loaders = build_wds_loaders(_bad_cfg(out, 0), seed=0, rank=0, world=1, pin=False)
    with pytest.warns(UserWarning, match=r"rest of training shard .*train-000000\.tar: tar trunc"):
        batches = list(loaders.train)
    assert [len(y) for _, y in batches] == [4, 4]  # k0 over and over: the shard is resampled
    assert loaders.train_batches.corrupt >= 4
    with pytest.raises(DataError, match=r"val-000000\.tar: unreadable after key k0: tar trunc"):
        list(loaders.eval)


def test_damaged_header_ends_the_shard_and_is_noticed(tmp_path):
    """webdataset's (tarfile's) stream reading ends a shard quietly at a damaged member header: the
    training stream compares the count with the size index, warns and counts; validation is an error."""
    out = _shard_dir(tmp_path, "none")
    for split in ("train", "val"):
        path = out / f"{split}-000000.tar"
        with tarfile.open(path) as tar:
            at = tar.getmembers()[6].offset + 10  # the header of k3.png
        data = path.read_bytes()
        path.write_bytes(data[:at] + b"X" + data[at + 1 :])
    loaders = build_wds_loaders(_bad_cfg(out, 0), seed=0, rank=0, world=1, pin=False)
    with pytest.warns(UserWarning, match=r"train-000000\.tar ended after 3 of its 6 samples"):
        batches = list(loaders.train)
    assert [len(y) for _, y in batches] == [4, 4]
    assert loaders.train_batches.corrupt >= 1
    with pytest.raises(DataError, match=r"val-000000\.tar holds 3 samples but sizes.json promises"):
        list(loaders.eval)


def test_missing_shard_is_a_clear_error(tmp_path):
    out = _shard_dir(tmp_path, "none")
    cfg = dataclasses.replace(
        _bad_cfg(out, 0), train_shards=str(out / "train-{000000..000002}.tar")
    )
    with pytest.raises(DataError, match=r"2 of 3 shards do not exist, first .*train-000001\.tar"):
        build_wds_loaders(cfg, seed=0, rank=0, world=1, pin=False)
    (out / "other.json").write_text('{"epochs": 3}')
    cfg = dataclasses.replace(_bad_cfg(out, 0), shard_index=str(out / "other.json"))
    with pytest.raises(DataError, match=r"other\.json is not a size index .* data\.shard_index"):
        build_wds_loaders(cfg, seed=0, rank=0, world=1, pin=False)
    (out / "sizes.json").unlink()
    with pytest.raises(DataError, match=r"sizes\.json .*`python -m quest\.shards index '.*"):
        build_wds_loaders(_bad_cfg(out, 0), seed=0, rank=0, world=1, pin=False)


# --------------------------------------------------------------------------------------- resume


def test_interrupted_conversion_resumes(tmp_path, monkeypatch):
    make_folder(tmp_path / "src", classes=2, train=9, val=3)
    (tmp_path / "src" / "train" / "class.00" / "bad.png").write_bytes(b"nope")
    ref, out = tmp_path / "ref", tmp_path / "out"
    convert(tmp_path / "src", ref, shard_size=4, val_shard_size=4, workers=1, progress=False)
    reference = {p.name: p.read_bytes() for p in ref.iterdir()}
    assert any(name.endswith(".notes.json") for name in reference)  # bad.png was skipped

    # a crash in the middle of the third shard: finished shards are complete, the rest absent
    calls = {"n": 0}
    encode = shards.encode_record

    def crash(record, channels):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("killed")
        return encode(record, channels)

    monkeypatch.setattr(shards.write, "encode_record", crash)
    with pytest.raises(RuntimeError, match="killed"):
        convert(tmp_path / "src", out, shard_size=4, val_shard_size=4, workers=1, progress=False)
    monkeypatch.setattr(shards.write, "encode_record", encode)
    written = sorted(p.name for p in out.glob("*.tar"))
    assert written == ["train-000000.tar", "train-000001.tar"]
    for name in written:
        assert (out / name).read_bytes() == reference[name]
    assert not (out / "sizes.json").exists()

    # a killed process leaves a .tmp; a finished shard must not be rewritten
    (out / "train-000002.tar.tmp").write_bytes(reference["train-000002.tar"][:700])
    os.utime(out / "train-000000.tar", ns=(1, 1))
    convert(tmp_path / "src", out, shard_size=4, val_shard_size=4, workers=2, progress=False)
    assert (out / "train-000000.tar").stat().st_mtime_ns == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == reference

    # a different plan into the same folder is refused instead of mixing shards
    with pytest.raises(DataError, match="different conversion"):
        convert(tmp_path / "src", out, shard_size=4, seed=1, workers=1, progress=False)


# --------------------------------------------------------------------------------------- families


def test_converter_records_grey_digits_as_mnist_with_one_channel(tmp_path, capsys):
    """28-px grey PNGs were recorded as family "imagenet", 3 channels: trained at 224 px in colour."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for i in range(n):
            folder = tmp_path / "src" / split / f"digit{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            img = torch.randint(0, 256, (1, 28, 28), generator=g, dtype=torch.uint8)
            (folder / f"{i}.png").write_bytes(encode_png(img).numpy().tobytes())
    index = convert(tmp_path / "src", tmp_path / "out", workers=1, progress=False)
    assert (index["family"], index["channels"]) == ("mnist", 1)
    assert index["image_size"] == 28 and "grey" in index["family_reason"]
    assert read_all(tmp_path / "out", "val", ImageReadMode.GRAY).total() == 4
    qdata._RESOLVED.clear()
    cfg = Data(
        dataset="wds",
        train_shards=str(tmp_path / "out" / "train-000000.tar"),
        val_shards=str(tmp_path / "out" / "val-000000.tar"),
        batch_size=4,
        num_workers=0,
    )
    loaders = build_wds_loaders(cfg, seed=0, rank=0, world=1, pin=False)
    assert (loaders.in_channels, loaders.image_size) == (1, 28)
    assert next(iter(loaders.train))[0].shape == (4, 1, 28, 28)
    assert 'transforms "mnist" at 28 px, 1 channel, no flip' in capsys.readouterr().out


def write_foreign_shards(out: Path) -> dict[str, str]:
    """Shards as webdataset's ShardWriter writes them for another project: png (and some jpeg)
    bytes under the image key, the label as an int under `cls`, no quest index. The synthetic
    4-class task at 16 px, 192 training samples in 4 shards, 64 validation samples in 2."""
    import webdataset as wds

    out.mkdir()
    patterns = {}
    for split, n, seed, per_shard in (("train", 192, 1234, 48), ("val", 64, 1235, 32)):
        images = qdata.synthetic(n, 4, 3, 16, seed=seed)
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for i, (img, label) in enumerate(zip(images.images, images.labels)):
                if i % 5 == 4:
                    sample = {"jpeg": encode_jpeg(img, quality=95).numpy().tobytes()}
                else:
                    sample = {"png": encode_png(img).numpy().tobytes()}
                sink.write({"__key__": f"sample{i:06d}", **sample, "cls": int(label)})
        last = n // per_shard - 1
        patterns[f"{split}_shards"] = str(out / f"{split}-{{000000..{last:06d}}}.tar")
    return patterns


def test_shards_from_another_tool_get_an_index_and_train(tmp_path, capsys, one_thread):
    from conftest import tiny

    from quest import train

    patterns = write_foreign_shards(tmp_path / "foreign")
    recipe = tiny(
        tmp_path, "foreign", data__dataset="wds", **{f"data__{k}": v for k, v in patterns.items()}
    )
    with pytest.raises(DataError) as info:  # before: no word of how to make the index
        train.main([str(recipe)])
    assert "python -m quest.shards index" in str(info.value)
    assert patterns["train_shards"] in str(info.value)

    assert shards.main(["index", patterns["train_shards"], patterns["val_shards"]]) == 0
    said = capsys.readouterr().out
    assert "train: 192 samples in 4 shards" in said and "val: 64 samples in 2 shards" in said
    index = json.loads((tmp_path / "foreign" / "sizes.json").read_text())
    assert index["classes"] == ["0", "1", "2", "3"] and index["num_classes"] == 4
    assert (index["family"], index["channels"], index["image_size"]) == ("cifar", 3, 16)
    assert index["splits"]["train"]["shards"] == {f"train-{i:06d}.tar": 48 for i in range(4)}
    assert index["splits"]["val"]["total"] == 64

    qdata._RESOLVED.clear()
    result = train.main([str(recipe), "optim.epochs=2"])
    assert result["top1"] >= 0 and (tmp_path / "foreign" / "student.pt").is_file()
    assert 'transforms "cifar" at 16 px' in capsys.readouterr().out
    summary = json.loads((tmp_path / "foreign" / "summary.json").read_text())
    assert summary["skipped_train_samples"] == 0  # the jpeg-keyed samples were read too


def test_index_command_reports_samples_it_cannot_train_on(tmp_path):
    import webdataset as wds

    (tmp_path / "s").mkdir()
    with wds.ShardWriter(str(tmp_path / "s" / "caps-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "jpg": b"\xff\xd8\xff", "txt": "a caption"})
    with pytest.raises(DataError, match=r"no sample .* has an image .* and an integer cls"):
        shards.build_index([str(tmp_path / "s" / "caps-000000.tar")], progress=False)


def test_index_refuses_a_shard_with_a_damaged_member_header(tmp_path):
    """tarfile ends a shard quietly at a damaged header: counting through it would write an index
    that promises 3 samples of 10. The index command names the shard and the byte instead."""
    import webdataset as wds

    (tmp_path / "s").mkdir()
    png = encode_png(torch.zeros(3, 8, 8, dtype=torch.uint8)).numpy().tobytes()
    with wds.ShardWriter(str(tmp_path / "s" / "t-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(10):
            sink.write({"__key__": f"k{i}", "png": png, "cls": i % 2})
    path = tmp_path / "s" / "t-000000.tar"
    assert shards.build_index([str(path)], progress=False)  # intact: indexed
    (tmp_path / "s" / "sizes.json").unlink()
    with tarfile.open(path) as tar:
        member = tar.getmembers()[6]  # k3's first member
    data = path.read_bytes()
    path.write_bytes(data[: member.offset + 10] + b"X" + data[member.offset + 11 :])
    with pytest.raises(
        DataError,
        match=rf"t-000000\.tar: unreadable data from byte {member.offset}, after 3 samples",
    ):
        shards.build_index([str(path)], progress=False)
    assert not (tmp_path / "s" / "sizes.json").exists()
