"""Transform families ("mnist", "cifar", "imagenet") and their choice.

The built-in datasets have their own family (`FAMILY`). Image folders and shards with
data.transforms = "" get one chosen from the training images (`choose_family`: ≤ 32 px square grey
→ "mnist", ≤ 40 px square → "cifar", else "imagenet" at 224 px); `resolve` makes the choice once per
process and prints it with its reason. The "mnist" family reads one channel, the others three.
data.flip = "" flips for "cifar" and "imagenet" and not for "mnist".
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.transforms import v2

from .datasets import FOLDER_LAYOUT, IMAGE_EXTENSIONS, DataError
from .recipe import Data

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
