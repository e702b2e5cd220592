"""WebDataset shards: conversion (`python -m quest.shards`) and the streaming readers (dataset = "wds").

Conversion turns an ImageNet-layout folder, the CIFAR-100 python files, Fashion-MNIST IDX files or
MIT-67 into tar shards of `<key>.<jpg|png|webp|gif>` + `<key>.cls` members:

- the original encoded bytes (no re-encode; in-memory arrays become PNG; a file that only PIL can read,
  such as BMP, becomes a lossless PNG and is counted as `reencoded`);
- keys without dots (`n01440764_10026`, never `n01440764_10026.JPEG`: a key ends at the first dot);
- a fixed-seed shuffled order, `shard_size` samples per train shard, smaller validation shards;
- every shard written as `<name>.tmp` and renamed when complete, so a killed conversion never leaves a
  truncated `train-000123.tar`, and a rerun skips finished shards (the sample → shard assignment is a
  pure function of the source and the seed, checked against `.quest-shards-plan.json`);
- a file that cannot be decoded is reported (path and reason) and skipped;
- `sizes.json`, written last: per-shard counts, totals, classes, channels, transform family, source,
  seed. Streams have no length, so the readers take every size from it.

Readers (see ENGINEERING §3). Training: each (rank, worker) draws shards with replacement from an RNG
seeded by (seed, epoch, rank, worker), streams them through a shuffle buffer of encoded bytes, decodes
with `torchvision.io.decode_image` and applies the same v2 transforms as the map-style path, and yields
exactly its share of `batches_per_epoch` full batches, so every rank takes the same number of steps.
Validation: the samples, in shard order, are cut into `world × workers` contiguous, equal ranges using
the size index, so every sample is read exactly once and the readers stay balanced even with fewer
shards than readers. Neither loader may go through `accelerator.prepare`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import re
import sys
import tarfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from torchvision.io import ImageReadMode, decode_image, encode_png
from torchvision.transforms import v2

from .data import (
    DataError,
    Loaders,
    _loader_kwargs,
    cifar100,
    fashion_mnist,
    image_folder,
    image_size,
    mit67,
    per_rank,
    transforms,
)
from .recipe import Data

INDEX = "sizes.json"
PLAN = ".quest-shards-plan.json"
IMAGE_FIELDS = ("jpg", "png", "webp", "gif")
SHUFFLE_BUFFER = 2000  # encoded samples per training worker (~220 MB at ImageNet's ~110 kB a JPEG)
SHUFFLE_INITIAL = 500
KINDS = ("folder", "cifar100", "fashion_mnist", "mit67")
FAMILY = {"folder": "imagenet", "mit67": "imagenet", "cifar100": "cifar", "fashion_mnist": "mnist"}


# --------------------------------------------------------------------------------------- conversion


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
    for folder in (root, root / "raw", root / "FashionMNIST" / "raw"):
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


def collect(root: Path, kind: str, splits: tuple[str, ...], val_labels: str = "") -> dict:
    """{'classes', 'channels', 'splits': {split: [Record]}} for a source (nothing decoded yet)."""
    out: dict[str, list[Record]] = {}
    if kind == "folder":
        train_dir, val_dir = root / "train", root / "val"
        has_classes = val_dir.is_dir() and any(p.is_dir() for p in val_dir.iterdir())
        classes = image_folder(train_dir if train_dir.is_dir() else val_dir).classes
        index = {c: i for i, c in enumerate(classes)}
        for split in splits:
            folder = root / split
            if split == "val" and (val_labels or not has_classes):
                if not val_labels:
                    raise DataError(f"{folder} has no class folders: pass --val-labels FILE")
                out[split] = _flat_val(folder, Path(val_labels), classes)
                continue
            ds = image_folder(folder)
            unknown = sorted(set(ds.classes) - set(index))
            if unknown:
                raise DataError(f"{folder}: classes {unknown[:5]} are not in the training classes")
            labels = [index[ds.classes[y]] for y in ds.labels]
            out[split] = _file_records(ds.images, labels, folder)
        return {"classes": classes, "channels": 3, "splits": out}
    if kind == "mit67":
        for split in splits:
            ds = mit67(str(root), train=split == "train")
            out[split] = _file_records(ds.images, ds.labels, root / "Images")
        return {"classes": ds.classes, "channels": 3, "splits": out}
    if kind in ("cifar100", "fashion_mnist"):
        reader = cifar100 if kind == "cifar100" else fashion_mnist
        for split in splits:
            ds = reader(str(root), train=split == "train")
            out[split] = _array_records(
                ds.images, ds.labels, "train" if split == "train" else "test"
            )
        return {"classes": list(ds.classes), "channels": ds.channels, "splits": out}
    raise DataError(f"unknown source kind {kind!r}: one of {KINDS}")


def _short(err: BaseException) -> str:
    """torchvision's decode errors without the C++ source location."""
    return re.sub(r"^.*\.cpp:\d+, ", "", str(err)).strip() or type(err).__name__


def _sniff(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def _mode(channels: int) -> ImageReadMode:
    return ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY


def _png(image: torch.Tensor) -> bytes:
    return encode_png(image.contiguous()).numpy().tobytes()


def encode_record(record: Record, channels: int) -> tuple[str, bytes, bool]:
    """(extension, bytes, re-encoded) for one record; raises ValueError with the reason to skip it."""
    if isinstance(record.source, np.ndarray):
        return "png", _png(torch.from_numpy(record.source)), False
    try:
        data = Path(record.source).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read: {err.strerror or err}") from None
    ext = _sniff(data)
    if ext is not None:  # a format the reader decodes: keep the bytes if they decode
        try:
            decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_mode(channels))
        except RuntimeError as err:
            raise ValueError(_short(err)) from None
        return ext, data, False
    from PIL import Image

    try:  # BMP, TIFF, ...: readable by PIL only, stored as a lossless PNG
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    except Exception as err:
        reason = "unknown format" if isinstance(err, Image.UnidentifiedImageError) else _short(err)
        raise ValueError(f"not an image decode_image or PIL can read: {reason}") from None
    image = torch.from_numpy(array.copy())
    image = image.permute(2, 0, 1) if image.ndim == 3 else image[None]
    return "png", _png(image), True


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # uid, gid, mtime 0: the same input gives byte-identical shards
    info.size, info.mode = len(data), 0o444
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, records: list[Record], channels: int) -> dict:
    """Write one shard as `<path>.tmp`, fsync, rename. Returns its count, skipped files, re-encodes."""
    tmp = path.with_name(path.name + ".tmp")
    count, reencoded, skipped = 0, 0, []
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for rec in records:
                    try:
                        ext, data, again = encode_record(rec, channels)
                    except ValueError as err:
                        skipped.append(
                            {"path": str(rec.source), "key": rec.key, "reason": str(err)}
                        )
                        continue
                    _tar_add(tar, f"{rec.key}.{ext}", data)
                    _tar_add(tar, f"{rec.key}.cls", str(rec.label).encode())
                    count += 1
                    reencoded += again
            f.flush()
            os.fsync(f.fileno())
        if skipped or reencoded:  # survives a resume; written before the shard becomes final
            notes = {"skipped": skipped, "reencoded": reencoded}
            _notes(path).write_text(json.dumps(notes, indent=1) + "\n")
        else:
            _notes(path).unlink(missing_ok=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"name": path.name, "count": count, "skipped": skipped, "reencoded": reencoded}


def _write_task(task: tuple[str, list[Record], int]) -> dict:
    path, records, channels = task
    return write_shard(Path(path), records, channels)


def _notes(path: Path) -> Path:
    return path.with_name(f".{path.name}.notes.json")


def _finished(path: Path) -> dict:
    """Count, skipped files and re-encodes of a shard written by an earlier run."""
    with tarfile.open(path) as tar:
        count = len({n.split(".", 1)[0] for n in tar.getnames()})
    notes = json.loads(_notes(path).read_text()) if _notes(path).exists() else {}
    return {
        "name": path.name,
        "count": count,
        "skipped": notes.get("skipped", []),
        "reencoded": notes.get("reencoded", 0),
    }


def _plan(records: dict[str, list[Record]], sizes: dict[str, int]) -> dict[str, list[list[Record]]]:
    return {
        split: [recs[i : i + sizes[split]] for i in range(0, len(recs), sizes[split])]
        for split, recs in records.items()
    }


def _digest(shards: list[list[Record]], seed: int) -> str:
    h = hashlib.sha256(f"seed {seed}\n".encode())
    for i, shard in enumerate(shards):
        for rec in shard:
            h.update(f"{i} {rec.key} {rec.label}\n".encode())
    return h.hexdigest()


def _check_plan(out: Path, plan: dict[str, list[list[Record]]], seed: int) -> None:
    """A rerun may only resume a conversion with the very same sample → shard assignment."""
    from .artifacts import save_json

    digests = {split: _digest(shards, seed) for split, shards in plan.items()}
    path = out / PLAN
    old = json.loads(path.read_text()) if path.exists() else {}
    for split, digest in digests.items():
        stale = [p.name for p in out.glob(f"{split}-*.tar")]
        if old.get(split, digest) != digest or (stale and split not in old):
            raise DataError(
                f"{out} already holds {split} shards from a different conversion (source, seed or "
                "shard size changed): delete them or choose another output folder"
            )
    save_json({**old, **digests}, path)


def _split_names(shards: list[list[Record]], split: str) -> list[str]:
    return [f"{split}-{i:06d}.tar" for i in range(len(shards))]


def convert(
    source: str | Path,
    out: str | Path,
    *,
    kind: str = "auto",
    splits: tuple[str, ...] = ("train", "val"),
    shard_size: int = 1000,
    val_shard_size: int = 250,
    seed: int = 0,
    workers: int = 0,
    val_labels: str = "",
    progress: bool = True,
) -> dict:
    """Convert a dataset into shards under `out` and return the size index (also `out/sizes.json`).
    workers = 0 uses every CPU; 1 converts in this process. Resumes an interrupted conversion."""
    from tqdm import tqdm

    from .artifacts import provenance, save_json

    root, out = Path(source), Path(out)
    if shard_size < 1 or val_shard_size < 1:
        raise DataError("shard sizes must be positive")
    if not splits or set(splits) - {"train", "val"}:
        raise DataError(f"splits must be train and/or val, got {splits}")
    kind = detect_kind(root) if kind == "auto" else kind
    found = collect(root, kind, tuple(splits), val_labels)
    for recs in found["splits"].values():
        random.Random(seed).shuffle(recs)  # class-sorted shards would ruin the shuffle buffer
    sizes = {s: shard_size if s == "train" else val_shard_size for s in splits}
    plan = _plan(found["splits"], sizes)
    out.mkdir(parents=True, exist_ok=True)
    _check_plan(out, plan, seed)
    (out / INDEX).unlink(missing_ok=True)  # present ⇔ complete

    results: dict[str, dict] = {}
    tasks = []
    for split, shards in plan.items():
        for name, recs in zip(_split_names(shards, split), shards):
            path = out / name
            if path.exists():
                results[name] = _finished(path)
            else:
                tasks.append((str(path), recs, found["channels"]))
    total = sum(len(r) for shards in plan.values() for r in shards)
    done = total - sum(len(t[1]) for t in tasks)
    workers = workers or os.cpu_count() or 1
    start = time.perf_counter()
    bar = tqdm(total=total, initial=done, unit="img", desc=f"shards → {out}", disable=not progress)
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            r = _write_task(task)
            results[r["name"]] = r
            bar.update(len(task[1]))
    else:
        sizes_of = {Path(t[0]).name: len(t[1]) for t in tasks}
        with mp.get_context().Pool(
            min(workers, len(tasks)), initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            for r in pool.imap_unordered(_write_task, tasks):
                results[r["name"]] = r
                bar.update(sizes_of[r["name"]])
    bar.close()
    for stale in out.glob("*.tar.tmp"):  # left by a killed run whose shard is now complete
        if (out / stale.name[: -len(".tmp")]).exists():
            stale.unlink()

    index = {
        "format": 1,
        "source": str(root.resolve()),
        "kind": kind,
        "seed": seed,
        "classes": found["classes"],
        "num_classes": len(found["classes"]),
        "channels": found["channels"],
        "family": FAMILY[kind],
        "shard_size": shard_size,
        "val_shard_size": val_shard_size,
        "splits": {},
        "provenance": provenance(),
    }
    for split, shards in plan.items():
        rs = [results[n] for n in _split_names(shards, split)]
        index["splits"][split] = {
            "total": sum(r["count"] for r in rs),
            "shards": {r["name"]: r["count"] for r in rs},
            "pattern": f"{split}-{{000000..{len(rs) - 1:06d}}}.tar",
            "skipped": [s for r in rs for s in r["skipped"]],
            "reencoded": sum(r["reencoded"] for r in rs),
        }
    save_json(index, out / INDEX)  # last: its presence marks a complete conversion
    if progress:
        _summary(index, out, time.perf_counter() - start)
    return index


def _summary(index: dict, out: Path, seconds: float) -> None:
    for split, s in index["splits"].items():
        print(
            f"{split}: {s['total']} samples in {len(s['shards'])} shards ({out}/{s['pattern']}), "
            f"{len(s['skipped'])} skipped, {s['reencoded']} re-encoded as PNG"
        )
        for item in s["skipped"][:20]:
            print(f"  skipped {item['path']}: {item['reason']}")
        if len(s["skipped"]) > 20:
            print(f"  ... {len(s['skipped']) - 20} more in {out / INDEX}")
    print(f"{index['num_classes']} classes, {index['channels']} channels, {seconds:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m quest.shards",
        description="Convert an image dataset into WebDataset shards with a sizes.json index.",
    )
    p.add_argument(
        "source",
        help="ImageNet-layout folder (train/ val/), cifar-100-python, Fashion-MNIST IDX folder or MIT-67 root",
    )
    p.add_argument("out", help="output folder for the shards and sizes.json")
    p.add_argument("--kind", default="auto", choices=("auto", *KINDS))
    p.add_argument("--splits", default="train,val", help="comma-separated: train, val")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per train shard")
    p.add_argument("--val-shard-size", type=int, default=250, help="samples per validation shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled sample order")
    p.add_argument("--workers", type=int, default=0, help="processes; 0 = every CPU")
    p.add_argument(
        "--val-labels", default="", help="for a flat val/ folder: 'filename label' lines"
    )
    args = p.parse_args(argv)
    try:
        convert(
            args.source,
            args.out,
            kind=args.kind,
            splits=tuple(s for s in args.splits.split(",") if s),
            shard_size=args.shard_size,
            val_shard_size=args.val_shard_size,
            seed=args.seed,
            workers=args.workers,
            val_labels=args.val_labels,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------- reading


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str, what: str = "shards") -> list[str]:
    """Brace patterns ('train-{000000..000012}.tar'), '::'-joined patterns, or a text file listing one
    pattern per line. Local files must exist; remote URLs are taken as given."""
    if not spec:
        raise DataError(f"{what} is empty")
    path = Path(spec)
    if not _is_remote(spec) and path.is_file() and not tarfile.is_tarfile(path):
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        patterns = [
            ln if _is_remote(ln) else str(path.parent / ln)
            for ln in lines
            if ln and not ln.startswith("#")
        ]
    else:
        patterns = spec.split("::")
    urls = [u for pattern in patterns for u in wds.shardlists.expand_urls(pattern)]
    missing = [u for u in urls if not _is_remote(u) and not Path(u).is_file()]
    if not urls:
        raise DataError(f"{what} = {spec!r} names no shards")
    if missing:
        raise DataError(
            f"{what}: {len(missing)} of {len(urls)} shards do not exist, first {missing[0]} "
            "(check the brace pattern against the files written by `python -m quest.shards`)"
        )
    return urls


def load_index(urls: list[str]) -> tuple[dict, list[int]]:
    """The size index next to the shards, and each shard's sample count."""
    cache: dict[str, dict] = {}
    counts = []
    for url in urls:
        folder, _, name = url.rpartition("/")
        location = f"{folder or '.'}/{INDEX}"
        if location not in cache:
            if url.startswith("pipe:"):
                raise DataError(f"cannot locate {INDEX} for {url}: use file paths or http(s) URLs")
            try:
                with wds.gopen(location, "rb") as f:
                    cache[location] = json.load(f)
            except (OSError, ValueError) as err:
                raise DataError(
                    f"no readable size index {location} ({err}): it is written last by "
                    "`python -m quest.shards`, so the conversion may be unfinished"
                ) from None
        shards = {n: c for s in cache[location]["splits"].values() for n, c in s["shards"].items()}
        if name not in shards:
            raise DataError(f"shard {url} is not listed in {location}")
        counts.append(int(shards[name]))
    first = next(iter(cache.values()))
    for other in cache.values():
        if (other["classes"], other["channels"]) != (first["classes"], first["channels"]):
            raise DataError(
                f"the size indexes of {urls[0]} and {urls[-1]} disagree on classes or channels"
            )
    return first, counts


def decode_sample(sample: dict, mode: ImageReadMode) -> tuple[torch.Tensor, int]:
    """(uint8 C×H×W, label) from a raw sample; raises on a missing field or undecodable bytes."""
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None or "cls" not in sample:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(
            f"expected an image ({'/'.join(IMAGE_FIELDS)}) and a cls field, found {have}"
        )
    try:
        image = decode_image(
            torch.frombuffer(bytearray(sample[field]), dtype=torch.uint8), mode=mode
        )
    except RuntimeError as err:
        raise ValueError(f"cannot decode {field}: {_short(err)}") from None
    return (image[0] if image.ndim == 4 else image), int(sample["cls"])


class Batcher:
    """Applies a v2 pipeline to single images and stacks them into a batch.

    When the pipeline ends with ToDtype(float32, scale=True) + Normalize (every family in
    `quest.data.transforms`), that tail runs in place inside the batch tensor instead: the uint8 image
    is copied into its slot, scaled and normalised there, with the same operations as the v2 kernels
    (tests check bit equality). This saves two float temporaries and a stacking copy per image, which
    cost as much as the JPEG decode where memory allocation is slow. Inside a loader worker the batch
    is allocated in shared memory, as `default_collate` does, so it is not copied again on its way to
    the main process."""

    def __init__(self, transform: Callable):
        steps = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
        self.norm = None
        if (
            len(steps) >= 2
            and isinstance(steps[-2], v2.ToDtype)
            and steps[-2].dtype == torch.float32
            and steps[-2].scale
            and isinstance(steps[-1], v2.Normalize)
        ):
            self.norm = (list(steps[-1].mean), list(steps[-1].std))
            self.tail = v2.Compose(steps[-2:])
            steps = steps[:-2]
        self.head = v2.Compose(steps) if steps else _identity
        self.transform = transform

    def image(self, image: torch.Tensor) -> torch.Tensor:
        """The per-image part (uint8 out when the tail is deferred to `batch`)."""
        return self.head(image) if self.norm else self.transform(image)

    def batch(self, items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.tensor([y for _, y in items], dtype=torch.int64)
        images = [x for x, _ in items]
        if self.norm is None or any(x.dtype != torch.uint8 for x in images):
            if self.norm:  # not uint8 after all: the deferred tail as plain v2
                images = [self.tail(x) for x in images]
            return default_collate(images), labels
        shape = images[0].shape
        if any(x.shape != shape for x in images):
            raise DataError(
                f"images of different sizes in one batch ({shape} and others): these transforms "
                "do not give a fixed size; set data.transforms and data.image_size"
            )
        out = _empty((len(images), *shape))
        mean, std = self.norm
        for slot, x in zip(out, images):
            slot.copy_(x)  # = x.to(float32)
            slot.mul_(1.0 / 255)  # v2.ToDtype(float32, scale=True) on uint8
            v2.functional.normalize(slot, mean, std, inplace=True)
        return out, labels


def _identity(x):
    return x


def _empty(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor, in shared memory inside a loader worker (as torch's default_collate)."""
    if get_worker_info() is None:
        return torch.empty(shape)
    elem = torch.empty(0)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).view(shape)


def _seed(*parts) -> int:
    """A 63-bit seed from a tuple, the same in every process (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class StreamBatches:
    """The `TrainBatches` contract for a stream: `batches_per_epoch` = ceil(samples / global batch),
    independent of the number of workers; `set_epoch` reaches persistent loader workers through shared
    memory, read when the loader is next iterated. `corrupt` counts skipped training samples."""

    def __init__(self, n: int, batch: int, world: int, epoch_size: int = 0):
        self.samples = max(epoch_size, n) if epoch_size else n
        self.batches_per_epoch = max(1, math.ceil(self.samples / (batch * world)))
        self._epoch = mp.Value("q", 0)
        self._start = mp.Value("q", 0)
        self._corrupt = mp.Value("q", 0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self._epoch.value, self._start.value = epoch, start_batch

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @property
    def start(self) -> int:
        return self._start.value

    @property
    def corrupt(self) -> int:
        return self._corrupt.value

    def count_corrupt(self) -> None:
        with self._corrupt.get_lock():
            self._corrupt.value += 1

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


class _Skip:
    """wds handler: warn, count, continue (picklable for spawned workers)."""

    def __init__(self, counter: Callable[[], None], what: str):
        self.counter, self.what = counter, what

    def __call__(self, exn: BaseException) -> bool:
        warnings.warn(f"skipping unreadable {self.what}: {exn}", stacklevel=2)
        self.counter()
        return True


class TrainStream(IterableDataset):
    """Resampled training batches for one rank (the `WebDataset(resampled=True)` pipeline of
    ENGINEERING §3 with an epoch-seeded shard sampler: webdataset 1.0.2 seeds its own from the clock).

    Each (rank, worker) draws shards with replacement from an RNG seeded by (seed, epoch, rank,
    worker), so ranks need no node splitting. The worker yields its share of the rank's
    `batches_per_epoch - start` batches (a `with_epoch` that follows `set_epoch`). Resuming mid-epoch
    therefore starts a fresh epoch-seeded stream for the remaining batches: a resampled stream has no
    position to restore, and replaying it batch by batch would only cost time."""

    def __init__(
        self,
        urls,
        batches: StreamBatches,
        batch: int,
        rank: int,
        seed: int,
        transform,
        mode: ImageReadMode,
        buffer: int = SHUFFLE_BUFFER,
        initial: int = SHUFFLE_INITIAL,
    ):
        self.urls, self.batches, self.batch = list(urls), batches, batch
        self.rank, self.seed, self.mode = rank, seed, mode
        self.batcher = Batcher(transform)
        self.buffer, self.initial = buffer, initial
        self.handler = _Skip(batches.count_corrupt, "training shard")

    def load(self, sample: dict) -> tuple[torch.Tensor, int]:
        """Decode and augment one raw sample (ValueError when it cannot be decoded)."""
        image, label = decode_sample(sample, self.mode)
        return self.batcher.image(image), label

    def _samples(self, rng: random.Random) -> Iterator[dict]:
        empty = 0
        while True:
            url = rng.choice(self.urls)
            n = 0
            for sample in wds.tarfile_samples([{"url": url}], handler=self.handler):
                n += 1
                yield sample
            empty = 0 if n else empty + 1
            if empty >= 50:
                raise DataError(f"50 training shards in a row gave no readable sample (last {url})")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, workers = _worker()
        epoch, remaining = self.batches.epoch, len(self.batches)
        mine = remaining // workers + (worker < remaining % workers)
        if mine == 0:
            return
        key = (self.seed, epoch, self.rank, worker)
        stream = self._samples(random.Random(_seed(*key, "shards")))
        shuffle = wds.shuffle(self.buffer, self.initial, rng=random.Random(_seed(*key, "buf")))
        stream = shuffle(stream)
        for b in range(mine):
            items = []
            # augmentation seeded per batch; the caller's RNG state is restored afterwards
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed(*key, b))
                while len(items) < self.batch:
                    sample = next(stream)
                    try:
                        items.append(self.load(sample))
                    except ValueError as err:
                        where = f"{sample['__url__']} key {sample['__key__']}"
                        warnings.warn(f"skipping training sample {where}: {err}", stacklevel=1)
                        self.batches.count_corrupt()
            yield self.batcher.batch(items)


def reader_plan(counts: list[int], reader: int, readers: int, keep: np.ndarray | None = None):
    """What reader `reader` of `readers` reads: [(shard, first, stop, picks)], offsets within the shard.
    The selected samples (all, or the sorted global indices `keep`) in shard order are cut into
    `readers` contiguous ranges whose sizes differ by at most one: each is read exactly once, and no
    reader idles when there are fewer shards than readers."""
    cum = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    plan = []
    if keep is None:
        total = int(cum[-1])
        a, b = total * reader // readers, total * (reader + 1) // readers
        for s in range(len(counts)):
            lo, hi = max(a, int(cum[s])), min(b, int(cum[s + 1]))
            if lo < hi:
                plan.append((s, lo - int(cum[s]), hi - int(cum[s]), None))
        return plan
    m = len(keep)
    mine = np.asarray(keep[m * reader // readers : m * (reader + 1) // readers], dtype=np.int64)
    shard = np.searchsorted(cum, mine, side="right") - 1
    for s in np.unique(shard).tolist():
        offsets = (mine[shard == s] - cum[s]).tolist()
        plan.append((s, offsets[0], offsets[-1] + 1, frozenset(offsets)))
    return plan


class ExactStream(IterableDataset):
    """Every selected sample exactly once over ranks × workers, in batches (the last one partial).
    strict: an unreadable sample is an error naming shard and key (validation); otherwise it is
    skipped with a warning and counted (feature extraction over training shards)."""

    def __init__(
        self,
        urls,
        counts,
        rank: int,
        world: int,
        batch: int,
        transform,
        mode: ImageReadMode,
        keep: np.ndarray | None = None,
        strict: bool = True,
        counter=None,
    ):
        self.urls, self.counts, self.rank, self.world = list(urls), list(counts), rank, world
        self.batch, self.batcher, self.mode = batch, Batcher(transform), mode
        self.keep, self.strict, self.counter = keep, strict, counter

    def _fail(self, message: str) -> None:
        if self.strict:
            raise DataError(message)
        warnings.warn(f"skipping {message}", stacklevel=2)
        if self.counter is not None:
            self.counter()

    def _read(self, url: str, first: int, stop: int, picks) -> Iterator[tuple[torch.Tensor, int]]:
        what = "validation shard" if self.strict else "shard"
        samples = wds.tarfile_samples([{"url": url}])
        key = "(start of shard)"
        for i in range(stop):
            try:
                sample = next(samples)
            except StopIteration:
                self._fail(f"{what} {url} holds {i} samples but {INDEX} promises at least {stop}")
                return
            except Exception as err:
                self._fail(f"{what} {url}: unreadable after key {key}: {_short(err)}")
                return
            key = sample["__key__"]
            if i < first or (picks is not None and i not in picks):
                continue
            try:
                image, label = decode_sample(sample, self.mode)
            except ValueError as err:
                self._fail(f"{what} {url}, key {key}: {err}")
                continue
            yield self.batcher.image(image), label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, workers = _worker()
        plan = reader_plan(
            self.counts, self.rank * workers + worker, self.world * workers, self.keep
        )
        items = []
        for shard, first, stop, picks in plan:
            for item in self._read(self.urls[shard], first, stop, picks):
                items.append(item)
                if len(items) == self.batch:
                    yield self.batcher.batch(items)
                    items = []
        if items:
            yield self.batcher.batch(items)


def _family_cfg(cfg: Data, index: dict) -> Data:
    """The recipe's transform family, or the one recorded in the size index when unset."""
    return cfg if cfg.transforms else dataclasses.replace(cfg, transforms=index["family"])


def _check_cfg(cfg: Data) -> None:
    if cfg.val_fraction or cfg.per_class or cfg.keep_fraction < 1.0:
        raise DataError(
            "data.val_fraction, per_class and keep_fraction do not apply to dataset = 'wds'"
        )


def build_wds_loaders(cfg: Data, *, seed: int, rank: int, world: int, pin: bool) -> Loaders:
    """Training and validation loaders for this rank from `data.train_shards` / `data.val_shards`.
    Sizes, classes and channels come from the shards' `sizes.json`."""
    _check_cfg(cfg)
    train_urls = expand_shards(cfg.train_shards, "data.train_shards")
    val_urls = expand_shards(cfg.val_shards, "data.val_shards")
    index, train_counts = load_index(train_urls)
    val_index, val_counts = load_index(val_urls)
    if val_index["classes"] != index["classes"]:
        raise DataError(
            "data.train_shards and data.val_shards come from conversions with other classes"
        )
    cfg = _family_cfg(cfg, index)
    batch = per_rank(cfg.batch_size, world, "data.batch_size")
    eval_batch = per_rank(cfg.eval_batch_size or 2 * cfg.batch_size, world, "data.eval_batch_size")
    mode = _mode(index["channels"])
    batches = StreamBatches(sum(train_counts), batch, world, cfg.epoch_size)
    train = TrainStream(train_urls, batches, batch, rank, seed, transforms(cfg, True), mode)
    val = ExactStream(val_urls, val_counts, rank, world, eval_batch, transforms(cfg, False), mode)
    kw = _loader_kwargs(cfg, pin)
    return Loaders(
        train=wds.WebLoader(train, batch_size=None, **kw),
        train_batches=batches,
        eval=wds.WebLoader(val, batch_size=None, **kw),
        num_classes=cfg.num_classes or index["num_classes"],
        in_channels=index["channels"],
        image_size=image_size(cfg),
        train_size=sum(train_counts),
        eval_size=sum(val_counts),
    )


def wds_feature_loader(cfg: Data, *, seed: int, rank: int, world: int, max_images: int = 0):
    """The training shards under the evaluation transforms, each image once over ranks and workers
    (codebook stage). max_images > 0 takes a seeded random subset first. Unreadable samples are
    skipped with a warning."""
    _check_cfg(cfg)
    urls = expand_shards(cfg.train_shards, "data.train_shards")
    index, counts = load_index(urls)
    cfg = _family_cfg(cfg, index)
    n = sum(counts)
    keep = None
    if 0 < max_images < n:
        g = torch.Generator().manual_seed(seed + 31337)
        keep = np.sort(torch.randperm(n, generator=g)[:max_images].numpy())
    batch = per_rank(cfg.eval_batch_size or 2 * cfg.batch_size, world, "data.eval_batch_size")
    ds = ExactStream(
        urls,
        counts,
        rank,
        world,
        batch,
        transforms(cfg, False),
        _mode(index["channels"]),
        keep=keep,
        strict=False,
    )
    return wds.WebLoader(ds, batch_size=None, **_loader_kwargs(cfg, False))


if __name__ == "__main__":
    sys.exit(main())
