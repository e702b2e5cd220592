"""What each kind of source holds (`python -m quest.shards` input): an ImageNet-layout folder, the
CIFAR-100 python files, Fashion-MNIST IDX files or MIT-67, as records to write, with their classes,
channels and transform family."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import (
    DEFAULT_SIZE,
    FAMILY,
    DataError,
    choose_family,
    cifar100,
    fashion_mnist,
    image_folder,
    image_header,
    mit67,
)
from ..datasets import fashion_mnist_folders

KINDS = ("folder", "cifar100", "fashion_mnist", "mit67")


@dataclass(frozen=True)
class Record:
    """One sample to write: `source` is a file path or a uint8 C×H×W array (written as PNG)."""

    key: str
    label: int
    source: str | np.ndarray


def sanitize_key(text: str) -> str:
    """A WebDataset key: letters, digits, '_' and '-' only (no dots, no slashes)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "_"


def _unique_keys(stems: list[str], paths: list[str]) -> list[str]:
    """File stems when they are unique after sanitizing, else relative paths; then numbered."""
    keys = [sanitize_key(s) for s in stems]
    if len(set(keys)) < len(keys):
        keys = [sanitize_key(p) for p in paths]
    seen: set[str] = set()
    out = []
    for key in keys:
        unique, n = key, 0
        while unique in seen:
            n += 1
            unique = f"{key}_{n}"
        seen.add(unique)
        out.append(unique)
    return out


def _file_records(files: list[Path], labels: list[int], root: Path) -> list[Record]:
    rel = [f.relative_to(root).with_suffix("").as_posix() for f in files]
    keys = _unique_keys([f.stem for f in files], rel)
    return [Record(k, y, str(f)) for k, y, f in zip(keys, labels, files)]


def _array_records(images: torch.Tensor, labels: list[int], prefix: str) -> list[Record]:
    arrays = images.numpy()
    return [Record(f"{prefix}_{i:06d}", int(y), arrays[i]) for i, y in enumerate(labels)]


def _flat_val(folder: Path, label_file: Path, classes: list[str]) -> list[Record]:
    """A flat validation folder with a label file of 'filename label' lines; the label is a class name
    or a 0-based index into the sorted training classes."""
    if not label_file.is_file():
        raise DataError(f"validation label file not found: {label_file}")
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for n, line in enumerate(label_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(f"{label_file}:{n}: expected 'filename label', got {line!r}")
        name, label = parts
        if label in index:
            labels.append(index[label])
        elif label.isdigit() and int(label) < len(classes):
            labels.append(int(label))
        else:
            raise DataError(
                f"{label_file}:{n}: label {label!r} is neither a class name nor < {len(classes)}"
            )
        files.append(folder / name)
    return _file_records(files, labels, folder)


def detect_kind(root: Path) -> str:
    if (root / "meta").exists() or (root / "cifar-100-python" / "meta").exists():
        return "cifar100"
    for folder in fashion_mnist_folders(root):
        if any(folder.glob("*-images-idx3-ubyte*")):
            return "fashion_mnist"
    if (root / "TrainImages.txt").exists():
        return "mit67"
    if (root / "train").is_dir() or (root / "val").is_dir():
        return "folder"
    raise DataError(
        f"cannot tell what {root} holds: expected train/ and val/ class folders, cifar-100-python files, "
        "Fashion-MNIST IDX files or MIT-67 TrainImages.txt (or pass --kind)"
    )


def _with_family(found: dict, where: Path, most: int = 16) -> dict:
    """Add the transform family, image size, its reason and the channels to store to a folder
    source, from the headers of up to `most` images spread over its first split (the rule of
    `quest.data.choose_family`: 28-px grey digits are "mnist", one channel)."""
    records = next(iter(found["splits"].values()), [])
    picked = [records[k * len(records) // most] for k in range(min(most, len(records)))]
    headers = [h for h in (image_header(r.source) for r in picked) if h is not None]
    fam, size, why = (
        choose_family(headers, where=str(where)) if headers else ("imagenet", 0, "no image")
    )
    channels = 1 if fam == "mnist" else 3
    return {**found, "channels": channels, "family": fam, "image_size": size, "family_reason": why}


def collect(root: Path, kind: str, splits: tuple[str, ...], val_labels: str = "") -> dict:
    """{'classes', 'channels', 'family', 'image_size', 'family_reason', 'splits': {split: [Record]}}
    for a source (nothing decoded yet; a folder's family and channels from a few image headers).
    One class numbering for both splits: the training split's (its non-empty class folders, or its
    split file), which the other split must have exactly."""
    out: dict[str, list[Record]] = {}
    if kind == "folder":
        train_dir, val_dir = root / "train", root / "val"
        has_classes = val_dir.is_dir() and any(p.is_dir() for p in val_dir.iterdir())
        classes = image_folder(train_dir if train_dir.is_dir() else val_dir).classes
        for split in splits:
            folder = root / split
            if split == "val" and (val_labels or not has_classes):
                if not val_labels:
                    raise DataError(f"{folder} has no class folders: pass --val-labels FILE")
                out[split] = _flat_val(folder, Path(val_labels), classes)
                continue
            ds = image_folder(folder, classes=classes)
            out[split] = _file_records(ds.images, ds.labels, folder)
        return _with_family({"classes": classes, "splits": out}, root)
    if kind == "mit67":
        classes = mit67(str(root), train=True).classes
        for split in splits:
            ds = mit67(str(root), train=split == "train", classes=classes)
            out[split] = _file_records(ds.images, ds.labels, root / "Images")
        return _with_family({"classes": classes, "splits": out}, root)
    if kind in ("cifar100", "fashion_mnist"):
        reader = cifar100 if kind == "cifar100" else fashion_mnist
        for split in splits:
            ds = reader(str(root), train=split == "train")
            out[split] = _array_records(
                ds.images, ds.labels, "train" if split == "train" else "test"
            )
        fam = FAMILY[kind]
        return {
            "classes": list(ds.classes),
            "channels": ds.channels,
            "family": fam,
            "image_size": DEFAULT_SIZE[fam],
            "family_reason": f"{kind}: {DEFAULT_SIZE[fam]}-px images",
            "splits": out,
        }
    raise DataError(f"unknown source kind {kind!r}: one of {KINDS}")
