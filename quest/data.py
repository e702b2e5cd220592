"""Datasets, transforms and per-rank loaders. Nothing is ever downloaded.

Map-style datasets (Fashion-MNIST, CIFAR-100, image folders, MIT-67, synthetic) are read by our own
samplers rather than through `accelerator.prepare`: the training order is a pure function of
(seed, epoch), every rank gets the same number of batches, a resumed run continues at the exact batch,
and each sample's augmentation is seeded by (seed, epoch, index, repeat), so results do not depend on
the number of workers. The class list comes from the training split alone; the evaluation split must
have the same classes. WebDataset shards (dataset = "wds") are read by `quest.shards`.

Transform families ("mnist", "cifar", "imagenet"; `transforms`): the built-in datasets have their own.
Image folders and shards with data.transforms = "" get one chosen from the training images
(`choose_family`: ≤ 32 px square grey → "mnist", ≤ 40 px square → "cifar", else "imagenet" at 224 px);
`resolve` makes the choice once per process and prints it with its reason. The "mnist" family reads
one channel, the others three. data.flip = "" flips for "cifar" and "imagenet" and not for "mnist".
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import os
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from .errors import QuestError
from .recipe import Data

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
STATS = {  # mean, std per transform family
    "cifar": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.2860,), (0.3530,)),
}
FAMILY = {
    "fashion_mnist": "mnist",
    "cifar100": "cifar",
    "synthetic": "cifar",
    "imagenet": "imagenet",
    "mit67": "imagenet",
}
DEFAULT_SIZE = {"mnist": 28, "cifar": 32, "imagenet": 224}
AUTO_FAMILY = ("folder", "wds")  # datasets whose family is chosen from the images when unset
FOLDER_LAYOUT = (
    "expected data.root/train/<class>/<image> and data.root/val/<class>/<image>, one folder per "
    "class with the same class names in both (or data.val_fraction > 0 instead of val/)"
)


class DataError(QuestError, ValueError):
    """Missing or malformed data, with what to fix."""


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found: {path} (check data.root; quest never downloads data)")
    return path


def short_error(err: BaseException) -> str:
    """An error message on one line, without torchvision's C++ source location."""
    text = re.sub(r"^.*\.cpp:\d+, ", "", str(err)).strip()
    return " ".join(text.split()) or type(err).__name__


def _names(names: list[str], most: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" ... ({len(names)} in all)" if len(names) > most else "")


def check_classes(found: list[str], classes: list[str], where: str, fix: str) -> None:
    """An evaluation split must have exactly the training split's classes: numbering each split on
    its own shifts every label when one split has a class the other lacks."""
    missing = sorted(set(classes) - set(found))
    extra = sorted(set(found) - set(classes))
    if missing or extra:
        what = [f"missing {_names(missing)}"] if missing else []
        what += [f"not in the training split: {_names(extra)}"] if extra else []
        raise DataError(
            f"{where} does not have the training split's classes ({'; '.join(what)}): {fix}"
        )


# --------------------------------------------------------------------------------------- sources


def decode_file(path: str | Path, channels: int) -> torch.Tensor:
    """uint8 C×H×W pixels of an image file; DataError (one line, with the fix) if unreadable."""
    try:
        mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
        img = decode_image(read_file(str(path)), mode=mode)
        return img[0] if img.ndim == 4 else img  # an animated GIF: its first frame, as PIL reads it
    except (RuntimeError, ValueError) as err:
        reason = short_error(err)
    try:  # BMP, TIFF, ...: formats torchvision does not decode but PIL (ImageFolder's reader) does
        from PIL import Image

        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    except Exception:
        raise DataError(
            f"cannot decode image {path} ({reason}): replace the file with a readable image or "
            "delete it"
        ) from None
    img = torch.from_numpy(array.copy())
    return img.permute(2, 0, 1) if img.ndim == 3 else img[None]


class ImageList(Dataset):
    """Images as a uint8 N×C×H×W tensor in memory, or as a list of files decoded on demand.
    `size` > 0: every file must be size×size (the fixed-size transform families need it)."""

    def __init__(self, images, labels: list[int], classes: list[str], channels: int, size: int = 0):
        self.images, self.labels, self.classes, self.channels = images, labels, classes, channels
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if isinstance(img, (str, Path)):
            path, img = img, decode_file(img, self.channels)
            if self.size and tuple(img.shape[-2:]) != (self.size, self.size):
                h, w = img.shape[-2:]
                raise DataError(
                    f"image {path} is {w}×{h}, not {self.size}×{self.size}: the cifar and mnist "
                    f"transforms crop fixed-size images; resize every image to "
                    f'{self.size}×{self.size}, or set data.transforms = "imagenet" (any size)'
                )
        return img, self.labels[i]

    def subset(self, indices) -> ImageList:
        indices = list(indices)
        images = (
            self.images[indices]
            if torch.is_tensor(self.images)
            else [self.images[i] for i in indices]
        )
        labels = [self.labels[i] for i in indices]
        return ImageList(images, labels, self.classes, self.channels, self.size)


def probe(ds: ImageList, count: int = 8) -> None:
    """Decode a few evenly spread images of a folder dataset now, so that a wrong size or an
    unreadable file is reported before training rather than deep in a worker."""
    if ds.size and len(ds):
        for i in sorted({k * (len(ds) - 1) // max(count - 1, 1) for k in range(count)}):
            ds[i]


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


# torchvision's ImageFolder extensions: the files the original code (and so IMG-k) counted
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_folder(
    root: Path, channels: int = 3, classes: list[str] | None = None, size: int = 0
) -> ImageList:
    """root/<class>/<image>, files sorted by name within each class, as torchvision's ImageFolder.
    Classes: root's class folders sorted by name, or `classes` (the training split's, for an
    evaluation split), which root must have exactly. A class folder without an image is an error."""
    _require(root, "image folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"no class folders in {root} (expected root/<class>/<image>)")
    if classes is None:
        classes = found
    check_classes(found, classes, str(root), "every split needs one folder per class, same names")
    files, labels = [], []
    for label, name in enumerate(classes):
        images = [
            p for p in sorted((root / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not images:
            raise DataError(
                f"class folder {root / name} holds no image ({' '.join(IMAGE_EXTENSIONS)}): add its "
                "images, or remove the class from every split"
            )
        files += images
        labels += [label] * len(images)
    return ImageList(files, labels, classes, channels, size)


def read_split_file(path: Path) -> list[tuple[str, str]]:
    """(class, file name) per '<class>/<file>' line of an MIT-67 split file, duplicates dropped,
    sorted by class then file name: the order torchvision's ImageFolder read the original's copy of
    the split in, so IMG-k's first k images of a class are its first k by file name."""
    entries = set()
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip().replace("\\", "/")
        if not line:
            continue
        parts = line.split("/")
        if len(parts) != 2 or not all(parts):
            raise DataError(f"{path}:{n}: expected '<class>/<file>', got {raw!r}")
        entries.add((parts[0], parts[1]))
    if not entries:
        raise DataError(f"{path} lists no images")
    return sorted(entries)


def mit67(root: str, train: bool, classes: list[str] | None = None) -> ImageList:
    """Official layout: root/Images/<class>/<file> with TrainImages.txt / TestImages.txt. Classes:
    the split's own, or `classes` (the training split's, for the test split), which it must match."""
    base = Path(root)
    split = _require(base / ("TrainImages.txt" if train else "TestImages.txt"), "MIT-67 split file")
    entries = read_split_file(split)
    found = sorted({c for c, _ in entries})
    if classes is None:
        classes = found
    check_classes(found, classes, str(split), "both split files need images of every class")
    index = {c: i for i, c in enumerate(classes)}
    files = [base / "Images" / c / name for c, name in entries]
    return ImageList(files, [index[c] for c, _ in entries], classes, 3)


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


# --------------------------------------------------------------------------------------- families

GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def image_header(source: str | Path | bytes) -> tuple[int, int, bool] | None:
    """(width, height, grey) of an image file or encoded bytes, from its header (PIL reads no
    pixels for this); None when it is not an image PIL can open."""
    from PIL import Image

    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(handle) as im:
            return im.size[0], im.size[1], im.mode in GREY_MODES
    except Exception:
        return None


def choose_family(
    headers: list[tuple[int, int, bool]], image_size: int = 0, where: str = ""
) -> tuple[str, int, str]:
    """(family, image size or 0 for the family's default, reason) for images with these headers
    (width, height, grey) found `where`. The "mnist" and "cifar" transforms crop square images of
    one size at that size; anything else gets the "imagenet" ones (RandomResizedCrop, any size)."""
    where = f" in {where}" if where else ""
    sizes = sorted({(w, h) for w, h, _ in headers})
    grey = all(g for _, _, g in headers)
    n = len(headers)
    if len(sizes) != 1:
        shown = ", ".join(f"{w}×{h}" for w, h in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
        return "imagenet", 0, f"{n} images{where} of several sizes ({shown})"
    (w, h) = sizes[0]
    seen = f"{n} {w}×{h} {'grey' if grey else 'colour'} image{'s' if n > 1 else ''}{where}"
    if w != h:
        return "imagenet", 0, f"{seen} (not square)"
    if w > 40:
        return "imagenet", 0, f"{seen} (larger than 40 px)"
    if image_size and image_size != w:
        return "imagenet", 0, f"{seen}, and data.image_size = {image_size} (resized)"
    if grey and w <= 32:
        return "mnist", w, f"{seen} (square, grey, at most 32 px)"
    return "cifar", w, f"{seen} (square, at most 40 px)"


def _folder_headers(train: Path, most: int = 16) -> list[tuple[int, int, bool]]:
    """Headers of up to `most` readable images, the first of each of up to `most` class folders
    spread over the classes of `train` (or the first images of the class when there are few)."""
    if not train.is_dir():
        raise DataError(f"training folder {train} not found: {FOLDER_LAYOUT}")
    classes = sorted(p for p in train.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"no class folders in {train}: {FOLDER_LAYOUT}")
    picked = min(most, len(classes))
    per_class = max(1, most // picked)
    headers = []
    for folder in (classes[k * len(classes) // picked] for k in range(picked)):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:  # images in sub-folders: image_folder reads them too
            files = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
        headers += [h for h in map(image_header, files[:per_class]) if h is not None]
    if not headers:
        raise DataError(
            f"no readable image in the class folders of {train} to choose data.transforms from "
            f"({' '.join(IMAGE_EXTENSIONS)})"
        )
    return headers


def index_family(index: dict, image_size: int = 0) -> tuple[str, int, str]:
    """The family a shard size index records (`python -m quest.shards` and its `index` command
    write it), as `choose_family` would give it for data.image_size = `image_size`."""
    fam = index.get("family")
    if fam not in STATS:
        return "imagenet", 0, "nothing: the size index records no transform family"
    why = f"the size index ({index.get('family_reason') or fam})"
    size = int(index.get("image_size", 0)) if fam != "imagenet" else 0
    if size and image_size and image_size != size:
        return "imagenet", 0, f"{why}, and data.image_size = {image_size} (resized)"
    return fam, size, why


_RESOLVED: dict[tuple, tuple[str, int, str]] = {}


def resolve(cfg: Data, *, strict: bool = True, index: dict | None = None) -> Data:
    """`cfg` with data.transforms filled in (and data.image_size, when 0, for the fixed-size
    families) for folder and shard data whose transforms are unset: chosen from the training
    images, or taken from the shards' size index (`index`, read when not given). The choice is
    made once per process and printed (by the first process) with its reason. strict = False
    returns `cfg` unchanged when the data cannot be read."""
    if cfg.transforms or cfg.dataset not in AUTO_FAMILY:
        return cfg
    key = (cfg.dataset, cfg.root, cfg.train_shards, cfg.shard_index, cfg.image_size)
    if key not in _RESOLVED:
        try:
            if cfg.dataset == "folder":
                train = Path(cfg.root) / "train"
                fam, size, why = choose_family(_folder_headers(train), cfg.image_size, str(train))
            else:
                if index is None:  # the shard reader passes the size index it has read
                    raise DataError("the shards' size index is needed to choose their transforms")
                fam, size, why = index_family(index, cfg.image_size)
        except DataError:
            if strict:
                raise
            return cfg
        _RESOLVED[key] = fam, size, why
        if os.environ.get("RANK", "0") == "0":
            chosen = dataclasses.replace(cfg, transforms=fam, image_size=cfg.image_size or size)
            print(
                f'data: transforms "{fam}" at {image_size(chosen)} px, '
                f"{1 if fam == 'mnist' else 3} channel{'' if fam == 'mnist' else 's'}, "
                f"{'flip' if flips(chosen) else 'no flip'}: chosen from {why}; set "
                "data.transforms (mnist, cifar, imagenet) and data.flip to choose yourself",
                flush=True,
            )
    fam, size, _ = _RESOLVED[key]
    return dataclasses.replace(cfg, transforms=fam, image_size=cfg.image_size or size)


def family(cfg: Data) -> str:
    """The transform family the data is read with: data.transforms, the dataset's own, or for
    folders and shards the one `resolve` chooses ("imagenet" while the data cannot be read)."""
    cfg = resolve(cfg, strict=False)
    return cfg.transforms or FAMILY.get(cfg.dataset, "imagenet")


def image_size(cfg: Data) -> int:
    return resolve(cfg, strict=False).image_size or DEFAULT_SIZE[family(cfg)]


def channels(cfg: Data) -> int:
    """Image channels the model sees: one for the "mnist" family (its statistics are grey), else 3."""
    return 1 if family(cfg) == "mnist" else 3


def flips(cfg: Data) -> bool:
    """Whether training mirrors images: data.flip, or by default every family but "mnist"
    (digits and text must not be mirrored)."""
    if cfg.flip == "":
        return family(cfg) != "mnist"
    return bool(cfg.flip)


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


# --------------------------------------------------------------------------------------- transforms


def transforms(cfg: Data, train: bool) -> Callable:
    """Training: CIFAR RandomCrop(pad 4, reflect), MNIST RandomCrop(pad 2, reflect), ImageNet
    RandomResizedCrop, each + a horizontal flip when `flips` says so; evaluation: ImageNet
    Resize(256/224 · size) + CenterCrop, the others as they are. Inputs are uint8 C×H×W tensors."""
    cfg = resolve(cfg)
    fam, size = family(cfg), image_size(cfg)
    mean, std = STATS[fam]
    flip = [v2.RandomHorizontalFlip()] if flips(cfg) else []
    if fam == "imagenet":
        if train:
            geometry = [v2.RandomResizedCrop(size, antialias=True), *flip]
        else:
            geometry = [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    else:
        pad = 4 if fam == "cifar" else 2
        geometry = (
            [v2.RandomCrop(size, padding=pad, padding_mode="reflect"), *flip]
            if train
            else [v2.Resize(size, antialias=True)]
            if cfg.image_size
            else []
        )
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


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


def count_classes(cfg: Data, classes: list[str]) -> int:
    """The classifier's outputs: the training data's classes, which data.num_classes, when set, must
    equal (a differing count means a missing class folder or the wrong dataset)."""
    n = len(classes)
    if cfg.num_classes and cfg.num_classes != n:
        raise DataError(
            f"data.num_classes = {cfg.num_classes} but the training data has {n} classes "
            f"({_names(classes)}): fix the data, or set data.num_classes = 0 to use its count"
        )
    if n < 2:
        raise DataError(
            f"the training data has {n} class ({_names(classes)}): a classifier needs at least 2"
        )
    return n


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
    eval_batch = per_rank(cfg.eval_batch_size or 2 * cfg.batch_size, world, "data.eval_batch_size")
    batches = TrainBatches(len(train), batch, rank, world, seed, cfg.epoch_size)
    kw = _loader_kwargs(cfg, pin)
    train_loader = Loader(
        Transformed(train, transforms(cfg, True), seed), batch_sampler=batches, **kw
    )
    eval_set = Transformed(
        held.subset(rank_slice(len(held), rank, world)), transforms(cfg, False), seed
    )
    eval_loader = Loader(eval_set, batch_size=eval_batch, shuffle=False, **kw)
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
    order = range(len(train))
    if 0 < max_images < len(train):
        g = torch.Generator().manual_seed(seed + 31337)
        order = sorted(torch.randperm(len(train), generator=g)[:max_images].tolist())
    mine = [order[i] for i in rank_slice(len(order), rank, world)]
    ds = Transformed(train.subset(mine), transforms(cfg, False), seed)
    batch = per_rank(cfg.eval_batch_size or 2 * cfg.batch_size, world, "data.eval_batch_size")
    return Loader(ds, batch_size=batch, shuffle=False, **_loader_kwargs(cfg, False))
