"""Datasets, transforms and per-rank loaders. Nothing is ever downloaded.

Map-style datasets (Fashion-MNIST, CIFAR-100, image folders, MIT-67, synthetic) are read by our own
samplers rather than through `accelerator.prepare`: the training order is a pure function of
(seed, epoch), every rank gets the same number of batches, a resumed run continues at the exact batch,
and each sample's augmentation is seeded by (seed, epoch, index, repeat), so results do not depend on
the number of workers. The class list comes from the training split alone; the evaluation split must
have the same classes. WebDataset shards (dataset = "wds") are read by `quest.shards`.

The readers are in `quest.datasets`, the transform families and their choice in `quest.transforms`;
both are re-exported here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import (
    FASHION_MNIST_DIR,
    FOLDER_LAYOUT,
    IMAGE_EXTENSIONS,
    DataError,
    ImageList,
    check_classes,
    cifar100,
    count_classes,
    decode_file,
    fashion_mnist,
    image_folder,
    mit67,
    probe,
    read_mode,
    read_split_file,
    short_error,
    synthetic,
)
from .recipe import Data
from .transforms import (
    _RESOLVED,
    AUTO_FAMILY,
    DEFAULT_SIZE,
    FAMILY,
    GREY_MODES,
    STATS,
    channels,
    choose_family,
    family,
    flips,
    image_header,
    image_size,
    index_family,
    resolve,
    transforms,
)

__all__ = [  # the names quest.data re-exports from quest.datasets and quest.transforms
    "AUTO_FAMILY",
    "DEFAULT_SIZE",
    "FAMILY",
    "FASHION_MNIST_DIR",
    "FOLDER_LAYOUT",
    "GREY_MODES",
    "IMAGE_EXTENSIONS",
    "STATS",
    "_RESOLVED",
    "DataError",
    "ImageList",
    "channels",
    "check_classes",
    "choose_family",
    "cifar100",
    "count_classes",
    "decode_file",
    "family",
    "fashion_mnist",
    "flips",
    "image_folder",
    "image_header",
    "image_size",
    "index_family",
    "mit67",
    "probe",
    "read_mode",
    "read_split_file",
    "resolve",
    "short_error",
    "synthetic",
    "transforms",
]


def load_split(cfg: Data, train: bool, classes: list[str] | None = None) -> ImageList:
    """The raw (untransformed) training or test split named by the recipe. `classes`: the training
    split's, which a test split read from folders or a split file must have (built-in datasets have
    a fixed class list)."""
    match cfg.dataset:
        case "fashion_mnist":
            return fashion_mnist(cfg.root, train)
        case "cifar100":
            return cifar100(cfg.root, train)
        case "imagenet" | "folder":
            cfg = resolve(cfg)
            size = 0 if family(cfg) == "imagenet" else image_size(cfg)
            root = Path(cfg.root) / ("train" if train else "val")
            if not root.is_dir():
                what = "training" if train else "evaluation"
                raise DataError(f"{what} folder {root} not found: {FOLDER_LAYOUT}")
            return image_folder(root, channels(cfg), classes=classes, size=size)
        case "mit67":
            return mit67(cfg.root, train, classes)
        case "synthetic":
            size = cfg.synthetic_size if train else max(cfg.synthetic_size // 4, 1)
            return synthetic(
                size, cfg.synthetic_classes, channels(cfg), image_size(cfg), seed=1234 + (not train)
            )
    raise DataError(f"dataset {cfg.dataset!r} has no map-style reader")


def per_class_subset(ds: ImageList, per_class: int, keep_fraction: float) -> ImageList:
    """The first `per_class` images of each class, then the first `keep_fraction` of those
    (the MIT-67 IMG-k rule of the original code: k images, of which the first 80 % are kept)."""
    if per_class < 0:  # idx[:-5] would keep all but 5
        raise DataError(f"data.per_class = {per_class}: must be ≥ 0 (0 keeps every image)")
    if not 0 < keep_fraction <= 1:
        raise DataError(f"data.keep_fraction = {keep_fraction}: must be in (0, 1]")
    seen: dict[int, list[int]] = {}
    for i, y in enumerate(ds.labels):
        seen.setdefault(y, []).append(i)
    keep = []
    for idx in seen.values():
        idx = idx[:per_class] if per_class else idx
        keep += idx[: max(1, int(len(idx) * keep_fraction))]
    return ds.subset(sorted(keep))


def splits(cfg: Data, seed: int) -> tuple[ImageList, ImageList]:
    """(train, evaluation) sets. With data.val_fraction the evaluation set is a seeded, held-out part
    of the training set, so hyper-parameters can be tuned without touching the test set."""
    train = load_split(cfg, train=True)
    if cfg.per_class or cfg.keep_fraction < 1.0:
        train = per_class_subset(train, cfg.per_class, cfg.keep_fraction)
    if cfg.val_fraction > 0:
        perm = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(seed + 7919)
        ).tolist()
        n_val = int(len(train) * cfg.val_fraction)
        train, held = train.subset(sorted(perm[n_val:])), train.subset(sorted(perm[:n_val]))
    else:
        held = load_split(cfg, train=False, classes=train.classes)
    probe(train)
    probe(held)
    return train, held


def augmentation_seed(seed: int, epoch: int, index: int, repeat: int) -> int:
    """The RNG seed of one showing of an image: the repeat number (an image shown 10 times an epoch
    by data.epoch_size) gives each showing its own crop and flip."""
    text = f"{seed} {epoch} {index} {repeat}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


class Transformed(Dataset):
    """Applies a transform, seeding the CPU RNG from a TrainBatches key (index, epoch, repeat), so a
    sample's augmentation does not depend on the worker that loads it nor on where a run resumed.
    A plain index applies the transform unseeded (evaluation transforms draw nothing)."""

    def __init__(self, base: ImageList, transform: Callable, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, epoch, repeat = key if isinstance(key, tuple) else (key, None, 0)
        img, label = self.base[index]
        if epoch is None:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(augmentation_seed(self.seed, epoch, index, repeat))
            return self.transform(img), label


# --------------------------------------------------------------------------------------- samplers


class TrainBatches:
    """Batches of (index, epoch, repeat) keys for one rank: an epoch is `samples` draws from seeded
    permutations of the n images (repeat = which permutation, so an image shown k times an epoch has
    repeats 0..k-1), truncated so that every rank gets exactly `batches_per_epoch` batches, rank r
    taking every world-th sample."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, epoch_size: int = 0):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.samples = max(epoch_size, n) if epoch_size else n  # repetition for tiny subsets
        self.batches_per_epoch = self.samples // (batch * world)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{n} training samples are fewer than one global batch ({batch} × {world} processes): "
                "lower data.batch_size"
            )
        self.epoch, self.start = 0, 0
        self.corrupt = 0  # an unreadable file fails the map-style loader; streams skip and count

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        reps = math.ceil(self.samples / self.n)
        order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])
        keys = [(i, self.epoch, p // self.n) for p, i in enumerate(order[: self.samples].tolist())]
        mine = keys[self.rank :: self.world]
        for b in range(self.start, self.batches_per_epoch):
            yield mine[b * self.batch : (b + 1) * self.batch]


def rank_slice(n: int, rank: int, world: int) -> range:
    """Contiguous, disjoint, covering: each sample is evaluated by exactly one rank."""
    return range(n * rank // world, n * (rank + 1) // world)


def _loader_kwargs(cfg: Data, pin: bool) -> dict:
    workers = cfg.num_workers
    if workers < 0:
        raise DataError(
            f"data.num_workers = {workers}: use 0 (load in the training process) or more workers"
        )
    return {
        "num_workers": workers,
        "pin_memory": pin,
        "persistent_workers": workers > 0,
        "prefetch_factor": 4 if workers > 0 else None,
    }


def worker_message(text: str) -> str:
    """The message of a DataError raised in a DataLoader worker: torch re-raises it in the main
    process as 'Caught DataError in DataLoader worker process N. Original Traceback ...', whose last
    'DataError: ' line is the original (one-line) message."""
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if "DataError: " in line]
    return last[-1].split("DataError: ", 1)[1].strip() if last else text


class Loader(DataLoader):
    """A DataLoader whose DataErrors stay one clear line, also when raised in a worker."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        except DataError as err:
            raise DataError(worker_message(str(err))) from None


@dataclass
class Loaders:
    """What the trainer consumes. `train` is iterated once per epoch after `train_batches.set_epoch`.
    `classes`: the class names in label order (label i is classes[i]), for the run to record."""

    train: object
    train_batches: TrainBatches | object
    eval: object
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int
    eval_size: int
    classes: list[str] | None = None


def eval_batch(cfg: Data) -> int:
    """The global evaluation batch: data.eval_batch_size, or twice data.batch_size when it is 0."""
    return cfg.eval_batch_size or 2 * cfg.batch_size


def feature_subset(n: int, max_images: int, seed: int) -> list[int] | None:
    """The sorted indices of the seeded random `max_images` of n training images the codebook stage
    reads, or None when it reads them all (max_images = 0 or ≥ n)."""
    if not 0 < max_images < n:
        return None
    g = torch.Generator().manual_seed(seed + 31337)
    return sorted(torch.randperm(n, generator=g)[:max_images].tolist())


def per_rank(batch: int, world: int, what: str) -> int:
    if batch % world:
        raise DataError(f"{what} = {batch} is not divisible by the {world} processes")
    return batch // world


def build_loaders(
    cfg: Data, *, seed: int, rank: int, world: int, pin: bool = False, device=None
) -> Loaders:
    """Training and evaluation loaders for this rank (batch sizes in the recipe are global).
    Shard (wds) batches arrive on `device`, normalised there; map-style batches stay on the CPU."""
    if cfg.dataset == "wds":
        raise ValueError("shard data streams through quest.shards: use quest.build.build_loaders")
    cfg = resolve(cfg)
    train, held = splits(cfg, seed)
    batch = per_rank(cfg.batch_size, world, "data.batch_size")
    eval_per_rank = per_rank(eval_batch(cfg), world, "data.eval_batch_size")
    batches = TrainBatches(len(train), batch, rank, world, seed, cfg.epoch_size)
    kw = _loader_kwargs(cfg, pin)
    train_loader = Loader(
        Transformed(train, transforms(cfg, True), seed), batch_sampler=batches, **kw
    )
    eval_set = Transformed(
        held.subset(rank_slice(len(held), rank, world)), transforms(cfg, False), seed
    )
    eval_loader = Loader(eval_set, batch_size=eval_per_rank, shuffle=False, **kw)
    return Loaders(
        train=train_loader,
        train_batches=batches,
        eval=eval_loader,
        num_classes=count_classes(cfg, train.classes),
        in_channels=train.channels,
        image_size=image_size(cfg),
        train_size=len(train),
        eval_size=len(held),
        classes=list(train.classes),
    )


def feature_loader(
    cfg: Data, *, seed: int, rank: int, world: int, max_images: int = 0, device=None
) -> DataLoader:
    """The training images under the *evaluation* transforms (codebook stage), split across ranks.
    max_images > 0 takes a seeded random subset of that many images first."""
    if cfg.dataset == "wds":
        raise ValueError("shard data streams through quest.shards: use quest.build.feature_loader")
    train, _ = splits(cfg, seed)
    order = feature_subset(len(train), max_images, seed) or range(len(train))
    mine = [order[i] for i in rank_slice(len(order), rank, world)]
    ds = Transformed(train.subset(mine), transforms(cfg, False), seed)
    batch = per_rank(eval_batch(cfg), world, "data.eval_batch_size")
    return Loader(ds, batch_size=batch, shuffle=False, **_loader_kwargs(cfg, False))
