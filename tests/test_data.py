"""Map-style data: readers, subsets, per-rank samplers and seeded augmentation."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from quest import data
from quest.recipe import Data


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (30, 28, 28))
    labels = np.arange(30) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    ds = data.fashion_mnist(str(tmp_path), train=True)
    assert len(ds) == 30 and ds.channels == 1
    img, label = ds[7]
    assert img.shape == (1, 28, 28) and img.dtype == torch.uint8
    assert torch.equal(img[0], torch.from_numpy(images[7].astype(np.uint8))) and label == 7
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte"):
        data.fashion_mnist(str(tmp_path), train=False)


@pytest.mark.skipif(
    not Path(data.FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist_from_the_debian_package():
    train, test = data.fashion_mnist("", True), data.fashion_mnist("", False)
    assert len(train) == 60000 and len(test) == 10000
    assert np.bincount(train.labels).tolist() == [6000] * 10


def test_train_batches_equal_per_rank_disjoint_and_seeded():
    world, batch, n = 3, 4, 50
    per_rank = [list(data.TrainBatches(n, batch, r, world, seed=1)) for r in range(world)]
    counts = {len(b) for b in per_rank}
    assert counts == {n // (batch * world)}  # same number of batches on every rank
    seen = [key[0] for rank in per_rank for b in rank for key in b]
    assert len(seen) == len(set(seen))  # no sample twice in one epoch
    again = list(data.TrainBatches(n, batch, 0, world, seed=1))
    assert again == per_rank[0]
    other_epoch = data.TrainBatches(n, batch, 0, world, seed=1)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != per_rank[0]
    resumed = data.TrainBatches(n, batch, 0, world, seed=1)
    resumed.set_epoch(0, start_batch=2)
    assert list(resumed) == per_rank[0][2:] and len(resumed) == len(per_rank[0]) - 2


def test_epoch_size_repeats_a_small_subset():
    b = data.TrainBatches(10, 5, 0, 1, seed=0, epoch_size=100)
    batches = list(b)
    assert len(batches) == 20
    idx = [key[0] for batch in batches for key in batch]
    assert sorted(set(idx)) == list(range(10)) and all(idx.count(i) == 10 for i in range(10))


def test_repeats_of_an_image_draw_their_own_augmentation():
    """IMG10 shows each image 10 times an epoch: each showing gets its own crop and flip, and the same
    (seed, epoch, showing) gets the same one again, so a resumed run continues identically."""
    cfg = Data(dataset="synthetic", synthetic_size=4, image_size=16)
    train, _ = data.splits(cfg, seed=0)
    ds = data.Transformed(train, data.transforms(cfg, train=True), seed=3)
    keys = [key for batch in data.TrainBatches(4, 4, 0, 1, seed=3, epoch_size=40) for key in batch]
    first = [ds[key][0] for key in keys]
    views: dict[int, set[bytes]] = {}
    for key, x in zip(keys, first):
        views.setdefault(key[0], set()).add(x.numpy().tobytes())
    assert sorted(views) == [0, 1, 2, 3]
    assert all(len(v) >= 5 for v in views.values()), [len(v) for v in views.values()]
    resumed = data.TrainBatches(4, 4, 0, 1, seed=3, epoch_size=40)
    resumed.set_epoch(0, start_batch=5)
    keys_after = [key for batch in resumed for key in batch]
    assert keys_after == keys[20:]
    assert all(torch.equal(ds[k][0], x) for k, x in zip(keys_after, first[20:]))


def test_rank_slices_cover_each_sample_once():
    for n in (0, 1, 7, 64):
        for world in (1, 2, 3, 5):
            got = [i for r in range(world) for i in data.rank_slice(n, r, world)]
            assert got == list(range(n))


def test_per_class_subset_keeps_the_first_images_then_the_first_fraction():
    ds = data.ImageList(
        torch.zeros(20, 1, 2, 2, dtype=torch.uint8), [i % 2 for i in range(20)], ["a", "b"], 1
    )
    sub = data.per_class_subset(ds, per_class=5, keep_fraction=0.8)
    # class 0 at even indices: first 5 are 0..8, first 80 % of those 0..6; class 1 likewise
    assert sorted(sub.labels) == [0] * 4 + [1] * 4 and len(sub) == 8


def test_validation_split_is_held_out_from_training():
    cfg = Data(dataset="synthetic", synthetic_size=100, image_size=8, val_fraction=0.2)
    train, held = data.splits(cfg, seed=0)
    assert len(train) == 80 and len(held) == 20
    a = {tuple(x.flatten().tolist()) for x in train.images}
    b = {tuple(x.flatten().tolist()) for x in held.images}
    assert not a & b


def test_augmentation_is_a_function_of_seed_epoch_index_not_of_workers():
    cfg = Data(dataset="synthetic", synthetic_size=64, image_size=16)
    train, _ = data.splits(cfg, seed=0)
    ds = data.Transformed(train, data.transforms(cfg, train=True), seed=3)
    sampler = data.TrainBatches(len(train), 8, 0, 1, seed=3)

    def epoch(workers):
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        return torch.cat([x for x, _ in loader])

    inline, two_workers = epoch(0), epoch(2)
    assert torch.equal(inline, two_workers)
    sampler.set_epoch(1)
    assert not torch.equal(inline, epoch(0))  # a new epoch draws new crops/flips


def test_missing_dataset_paths_are_clear_errors(tmp_path):
    with pytest.raises(data.DataError, match="CIFAR-100 file not found"):
        data.cifar100(str(tmp_path), train=True)
    with pytest.raises(data.DataError, match="image folder not found"):
        data.image_folder(tmp_path / "nope")
    with pytest.raises(data.DataError, match="MIT-67 split file not found"):
        data.mit67(str(tmp_path), train=True)
    with pytest.raises(data.DataError, match="fewer than one global batch"):
        data.TrainBatches(10, 8, 0, 2, seed=0)
