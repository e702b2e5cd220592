"""WebDataset shard conversion: `python -m quest.shards SOURCE OUT` (see the package docstring)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.io import decode_image, encode_png

from ..data import (
    DataError,
    read_mode,
    short_error,
)
from .shardlist import INDEX
from .sources import KINDS, Record, collect, detect_kind

PLAN = ".quest-shards-plan.json"


# --------------------------------------------------------------------------------------- conversion


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
            decode_image(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=read_mode(channels)
            )
        except RuntimeError as err:
            raise ValueError(short_error(err)) from None
        return ext, data, False
    from PIL import Image

    try:  # BMP, TIFF, ...: readable by PIL only, stored as a lossless PNG
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    except Exception as err:
        reason = (
            "unknown format" if isinstance(err, Image.UnidentifiedImageError) else short_error(err)
        )
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
    from ..artifacts import save_json

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

    from ..artifacts import provenance, save_json

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
        "family": found["family"],
        "image_size": found["image_size"],
        "family_reason": found["family_reason"],
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
    print(
        f"{index['num_classes']} classes, {index['channels']} channel(s), transforms "
        f'"{index["family"]}" ({index["family_reason"]}), {seconds:.1f} s'
    )


USAGE = """\
python -m quest.shards [convert] SOURCE OUT [options]   convert a dataset into shards + sizes.json
python -m quest.shards index PATTERN [PATTERN ...] [--out FILE]
                                                        index shards written by another tool"""


def main(argv: list[str] | None = None) -> int:
    """python -m quest.shards [convert] SOURCE OUT ... (the package's main dispatches `index`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m quest.shards [convert]",
        usage=USAGE,
        description="Convert an image dataset into WebDataset shards with a sizes.json index "
        "(`python -m quest.shards index --help`: index shards written by another tool).",
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
