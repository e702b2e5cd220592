"""Dataset readers: Fashion-MNIST, CIFAR-100, image folders, MIT-67 and the synthetic test task, each
read from disk (nothing is ever downloaded) into an `ImageList` of raw uint8 images, and the rules
that number classes (the class list comes from the training split alone; an evaluation split must
have the same classes)."""

from __future__ import annotations

import gzip
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from .errors import QuestError
from .recipe import Data

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
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


# --------------------------------------------------------------------------------------- sources


def read_mode(channels: int) -> ImageReadMode:
    """How images are decoded for a model of `channels` inputs: RGB for 3, else one grey channel."""
    return ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY


def decode_file(path: str | Path, channels: int) -> torch.Tensor:
    """uint8 C×H×W pixels of an image file; DataError (one line, with the fix) if unreadable."""
    try:
        img = decode_image(read_file(str(path)), mode=read_mode(channels))
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


FASHION_MNIST_CLASSES = [
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


def fashion_mnist_folders(root: Path) -> tuple[Path, ...]:
    """Where Fashion-MNIST IDX files may lie: `root`, `root/raw` or `root/FashionMNIST/raw`
    (torchvision's download layout). The reader and the shard converter's detection both look here."""
    return (root, root / "raw", root / "FashionMNIST" / "raw")


def fashion_mnist(root: str, train: bool) -> ImageList:
    """IDX files (optionally gzipped) in one of `fashion_mnist_folders(root)`."""
    prefix = "train" if train else "t10k"
    base = Path(root or FASHION_MNIST_DIR)
    for folder in fashion_mnist_folders(base):
        for ext in (".gz", ""):
            images = folder / f"{prefix}-images-idx3-ubyte{ext}"
            labels = folder / f"{prefix}-labels-idx1-ubyte{ext}"
            if images.exists() and labels.exists():
                x = torch.from_numpy(_read_idx(images).copy()).unsqueeze(1)
                y = _read_idx(labels).astype(np.int64).tolist()
                return ImageList(x, y, FASHION_MNIST_CLASSES, 1)
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
