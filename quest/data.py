"""Datasets, transforms and per-rank loaders (SPEC §3 transforms). Nothing is ever downloaded.

Map-style datasets (Fashion-MNIST, CIFAR-100, image folders, MIT-67, synthetic) are read by our own
samplers rather than through `accelerator.prepare`: the training order is a pure function of
(seed, epoch), every rank gets the same number of batches, a resumed run continues at the exact batch,
and each sample's augmentation is seeded by (seed, epoch, index), so results do not depend on the number
of workers. WebDataset shards (dataset = "wds") are read by `quest.shards`.
"""

from __future__ import annotations

import gzip
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from .recipe import Data

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
STATS = {  # mean, std per transform family
    "cifar": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.2860,), (0.3530,)),
}
FAMILY = {"fashion_mnist": "mnist", "cifar100": "cifar", "synthetic": "cifar"}
DEFAULT_SIZE = {"mnist": 28, "cifar": 32, "imagenet": 224}


class DataError(ValueError):
    """Missing or malformed data, with what to fix."""


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found: {path} (check data.root; quest never downloads data)")
    return path


# --------------------------------------------------------------------------------------- sources


class ImageList(Dataset):
    """Images as a uint8 N×C×H×W tensor in memory, or as a list of files decoded on demand."""

    def __init__(self, images, labels: list[int], classes: list[str], channels: int):
        self.images, self.labels, self.classes, self.channels = images, labels, classes, channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if isinstance(img, (str, Path)):
            try:
                mode = ImageReadMode.RGB if self.channels == 3 else ImageReadMode.GRAY
                img = decode_image(read_file(str(img)), mode=mode)
            except RuntimeError as err:
                raise DataError(f"cannot decode image {img}: {err}") from None
        return img, self.labels[i]

    def subset(self, indices) -> ImageList:
        indices = list(indices)
        images = (
            self.images[indices]
            if torch.is_tensor(self.images)
            else [self.images[i] for i in indices]
        )
        return ImageList(images, [self.labels[i] for i in indices], self.classes, self.channels)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root: str, train: bool) -> ImageList:
    """IDX files (optionally gzipped) in `root`, `root/raw` or `root/FashionMNIST/raw`."""
    prefix = "train" if train else "t10k"
    base = Path(root or FASHION_MNIST_DIR)
    for folder in (base, base / "raw", base / "FashionMNIST" / "raw"):
        for ext in (".gz", ""):
            images = folder / f"{prefix}-images-idx3-ubyte{ext}"
            labels = folder / f"{prefix}-labels-idx1-ubyte{ext}"
            if images.exists() and labels.exists():
                x = torch.from_numpy(_read_idx(images).copy()).unsqueeze(1)
                y = _read_idx(labels).astype(np.int64).tolist()
                classes = [
                    "tshirt",
                    "trouser",
                    "pullover",
                    "dress",
                    "coat",
                    "sandal",
                    "shirt",
                    "sneaker",
                    "bag",
                    "boot",
                ]
                return ImageList(x, y, classes, 1)
    raise DataError(
        f"Fashion-MNIST files '{prefix}-images-idx3-ubyte[.gz]' not found under {base}: "
        "`apt-get install dataset-fashion-mnist` or set data.root"
    )


def cifar100(root: str, train: bool) -> ImageList:
    """The standard `cifar-100-python` pickles (root may be the folder itself or its parent)."""
    base = Path(root)
    folder = base if (base / "meta").exists() else base / "cifar-100-python"
    batch = _require(folder / ("train" if train else "test"), "CIFAR-100 file")
    with open(batch, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    with open(_require(folder / "meta", "CIFAR-100 meta file"), "rb") as f:
        classes = pickle.load(f, encoding="latin1")["fine_label_names"]
    x = torch.from_numpy(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
    return ImageList(x, list(d["fine_labels"]), classes, 3)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_folder(root: Path, channels: int = 3) -> ImageList:
    """root/<class>/<image>: classes sorted by name, as torchvision's ImageFolder."""
    _require(root, "image folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"no class folders in {root} (expected root/<class>/<image>)")
    files, labels = [], []
    for label, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(p)
                labels.append(label)
    return ImageList(files, labels, classes, channels)


def mit67(root: str, train: bool) -> ImageList:
    """Official layout: root/Images/<class>/<file> with TrainImages.txt / TestImages.txt."""
    base = Path(root)
    split = _require(base / ("TrainImages.txt" if train else "TestImages.txt"), "MIT-67 split file")
    entries = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    classes = sorted({e.split("/")[0] for e in entries})
    index = {c: i for i, c in enumerate(classes)}
    files = [base / "Images" / e for e in entries]
    return ImageList(files, [index[e.split("/")[0]] for e in entries], classes, 3)


def synthetic(
    size: int, classes: int, channels: int, image_size: int, seed: int = 1234
) -> ImageList:
    """An easy, fixed task for tests: each class is a random 4×4 block pattern plus pixel noise."""
    g = torch.Generator().manual_seed(1234)  # the class templates are shared by both splits
    blocks = (torch.rand(classes, channels, 4, 4, generator=g) > 0.5).float() * 0.6 + 0.2
    g.manual_seed(seed)
    templates = torch.nn.functional.interpolate(blocks, size=image_size, mode="nearest")
    labels = torch.randint(classes, (size,), generator=g)
    noise = torch.randn(size, channels, image_size, image_size, generator=g) * 0.2
    x = ((templates[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageList(x, labels.tolist(), [f"class{i}" for i in range(classes)], channels)


def family(cfg: Data) -> str:
    if cfg.transforms:
        return cfg.transforms
    return FAMILY.get(cfg.dataset, "imagenet")


def image_size(cfg: Data) -> int:
    return cfg.image_size or DEFAULT_SIZE[family(cfg)]


def load_split(cfg: Data, train: bool) -> ImageList:
    """The raw (untransformed) training or test split named by the recipe."""
    match cfg.dataset:
        case "fashion_mnist":
            return fashion_mnist(cfg.root, train)
        case "cifar100":
            return cifar100(cfg.root, train)
        case "imagenet" | "folder":
            return image_folder(Path(cfg.root) / ("train" if train else "val"))
        case "mit67":
            return mit67(cfg.root, train)
        case "synthetic":
            size = cfg.synthetic_size if train else max(cfg.synthetic_size // 4, 1)
            fam = family(cfg)
            channels = 1 if fam == "mnist" else 3
            return synthetic(
                size, cfg.synthetic_classes, channels, image_size(cfg), seed=1234 + (not train)
            )
    raise DataError(f"dataset {cfg.dataset!r} has no map-style reader")


def per_class_subset(ds: ImageList, per_class: int, keep_fraction: float) -> ImageList:
    """The first `per_class` images of each class, then the first `keep_fraction` of those
    (the MIT-67 IMG-k rule of the original code: k images, of which the first 80 % are kept)."""
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
        return train.subset(sorted(perm[n_val:])), train.subset(sorted(perm[:n_val]))
    return train, load_split(cfg, train=False)


# --------------------------------------------------------------------------------------- transforms


def transforms(cfg: Data, train: bool) -> Callable:
    """SPEC §3: CIFAR RandomCrop(pad 4, reflect) + flip; ImageNet RandomResizedCrop + flip for training,
    Resize(256/224 · size) + CenterCrop for evaluation. Inputs are uint8 C×H×W tensors."""
    fam, size = family(cfg), image_size(cfg)
    mean, std = STATS[fam]
    if fam == "imagenet":
        if train:
            geometry = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            geometry = [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    else:
        pad = 4 if fam == "cifar" else 2
        geometry = (
            [v2.RandomCrop(size, padding=pad, padding_mode="reflect"), v2.RandomHorizontalFlip()]
            if train
            else [v2.Resize(size, antialias=True)]
            if cfg.image_size
            else []
        )
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class Transformed(Dataset):
    """Applies a transform, seeding the CPU RNG from (seed, epoch, index) when given a tuple key, so a
    sample's augmentation does not depend on the worker that loads it nor on where a run resumed."""

    def __init__(self, base: ImageList, transform: Callable, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        img, label = self.base[index]
        if epoch is None:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(
                (self.seed * 1_000_003 + epoch) * 10_000_019 + index
            )
            return self.transform(img), label


# --------------------------------------------------------------------------------------- samplers


class TrainBatches:
    """Batches of (index, epoch) keys for one rank: a seeded permutation per epoch, truncated so that
    every rank gets exactly `batches_per_epoch` batches, rank r taking every world-th sample."""

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

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        reps = math.ceil(self.samples / self.n)
        order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])[
            : self.samples
        ]
        mine = order[self.rank :: self.world].tolist()
        for b in range(self.start, self.batches_per_epoch):
            yield [(i, self.epoch) for i in mine[b * self.batch : (b + 1) * self.batch]]


def rank_slice(n: int, rank: int, world: int) -> range:
    """Contiguous, disjoint, covering: each sample is evaluated by exactly one rank."""
    return range(n * rank // world, n * (rank + 1) // world)


def _loader_kwargs(cfg: Data, pin: bool) -> dict:
    workers = cfg.num_workers
    return {
        "num_workers": workers,
        "pin_memory": pin,
        "persistent_workers": workers > 0,
        "prefetch_factor": 4 if workers > 0 else None,
    }


@dataclass
class Loaders:
    """What the trainer consumes. `train` is iterated once per epoch after `train_batches.set_epoch`."""

    train: object
    train_batches: TrainBatches | object
    eval: object
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int
    eval_size: int


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
        from .shards import build_wds_loaders

        return build_wds_loaders(cfg, seed=seed, rank=rank, world=world, pin=pin, device=device)
    train, held = splits(cfg, seed)
    batch = per_rank(cfg.batch_size, world, "data.batch_size")
    eval_batch = per_rank(cfg.eval_batch_size or 2 * cfg.batch_size, world, "data.eval_batch_size")
    batches = TrainBatches(len(train), batch, rank, world, seed, cfg.epoch_size)
    kw = _loader_kwargs(cfg, pin)
    train_loader = DataLoader(
        Transformed(train, transforms(cfg, True), seed), batch_sampler=batches, **kw
    )
    eval_set = Transformed(
        held.subset(rank_slice(len(held), rank, world)), transforms(cfg, False), seed
    )
    eval_loader = DataLoader(eval_set, batch_size=eval_batch, shuffle=False, **kw)
    return Loaders(
        train=train_loader,
        train_batches=batches,
        eval=eval_loader,
        num_classes=cfg.num_classes or len(train.classes),
        in_channels=train.channels,
        image_size=image_size(cfg),
        train_size=len(train),
        eval_size=len(held),
    )


def feature_loader(
    cfg: Data, *, seed: int, rank: int, world: int, max_images: int = 0, device=None
) -> DataLoader:
    """The training images under the *evaluation* transforms (codebook stage), split across ranks.
    max_images > 0 takes a seeded random subset of that many images first."""
    if cfg.dataset == "wds":
        from .shards import wds_feature_loader

        return wds_feature_loader(
            cfg, seed=seed, rank=rank, world=world, max_images=max_images, device=device
        )
    train, _ = splits(cfg, seed)
    order = range(len(train))
    if 0 < max_images < len(train):
        g = torch.Generator().manual_seed(seed + 31337)
        order = sorted(torch.randperm(len(train), generator=g)[:max_images].tolist())
    mine = [order[i] for i in rank_slice(len(order), rank, world)]
    ds = Transformed(train.subset(mine), transforms(cfg, False), seed)
    batch = per_rank(cfg.eval_batch_size or 2 * cfg.batch_size, world, "data.eval_batch_size")
    return DataLoader(ds, batch_size=batch, shuffle=False, **_loader_kwargs(cfg, False))
