"""`python -m quest.shards index PATTERN [PATTERN ...] [--out FILE]`: the size index of shards written
by another tool (webdataset's `ShardWriter`, timm's or img2dataset's writers, ...).

Each PATTERN (a brace pattern, '::'-joined patterns or a file listing them, as data.train_shards) is
one split, named after its shard files (`train-{000000..000099}.tar` → "train"). Every shard is read
once: its samples are counted as the readers group them, its `cls` labels collected, and a few image
headers looked at to choose the transform family and channels (`quest.data.choose_family`, from the
split named like "train", else the first). Classes are "0" .. "N-1" for the largest label N-1 over
all patterns (or the names of `--classes FILE`, one a line), so index the training and validation
shards in one command. The index is written as `sizes.json` next to the shards (one per folder when
the patterns are in several), or to `--out`; splits already in that file under other names are kept.
The format is documented in `quest.shards.shardlist`. Samples without an image or a `cls` member are
counted and reported: training skips them, validation stops at them. A local shard with data after
its last readable member (a damaged member header) is an error, never a short count.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import tarfile
from pathlib import Path

from ..data import DataError, choose_family, image_header, short_error
from .shardlist import IMAGE_FIELDS, INDEX, _is_remote, _shard_name, expand_shards, shard_samples

HEADERS_PER_SHARD = 4  # image headers looked at per shard (the family needs a few, spread out)


def unread_tail(url: str) -> str | None:
    """Where a local uncompressed tar stops being readable before its end, or None. tarfile ends
    the archive quietly at a damaged header after the first one, so an index counted through it
    would promise too few samples; after the last readable member only the end-of-archive zero
    blocks may follow. Only headers are read (the members' data is skipped)."""
    if _is_remote(url) or not url.endswith(".tar"):
        return None
    with tarfile.open(url, "r:") as tar:
        for _ in tar:
            pass
        end = tar.offset
    with open(url, "rb") as f:
        f.seek(end)
        while chunk := f.read(1 << 20):
            if chunk.strip(b"\0"):
                return f"unreadable data from byte {end}"
    return None


def count_shard(url: str) -> dict:
    """Samples, labels, unusable samples and a few image headers of one shard."""
    count, labels, unusable, headers, example = 0, set(), 0, [], None
    try:
        for sample in shard_samples(url):
            count += 1
            field = next((f for f in IMAGE_FIELDS if f in sample), None)
            label = sample.get("cls")
            try:
                label = int(label) if label is not None else None
            except ValueError:
                label = None
            if field is None or label is None:
                unusable += 1
                if example is None:
                    fields = sorted(k for k in sample if not k.startswith("__"))
                    example = f"key {sample['__key__']} has {fields}"
                continue
            labels.add(label)
            if len(headers) < HEADERS_PER_SHARD:
                header = image_header(bytes(sample[field]))
                if header is not None:
                    headers.append(header)
    except Exception as err:
        raise DataError(f"cannot read shard {url}: {short_error(err)}") from None
    damage = unread_tail(url)
    if damage is not None:
        raise DataError(
            f"shard {url}: {damage}, after {count} samples (a damaged member header ends a tar "
            "read as a stream): write the shard again, or leave it out of the pattern"
        )
    return {
        "url": url,
        "count": count,
        "labels": sorted(labels),
        "unusable": unusable,
        "example": example,
        "headers": headers,
    }


def split_name(urls: list[str]) -> str:
    """'train' for train-000000.tar ...: the first shard's name without extension and trailing
    number."""
    stem = re.sub(r"\.(tar|tgz|tar\.gz)$", "", _shard_name(urls[0]))
    return re.sub(r"[-_.]*\d*$", "", stem) or "shards"


def _folder(urls: list[str], pattern: str) -> str:
    if any(_is_remote(u) for u in urls):
        raise DataError(f"{pattern}: remote shards have no folder to write {INDEX} to: give --out")
    folders = {str(Path(u).resolve().parent) for u in urls}
    if len(folders) > 1:
        raise DataError(f"{pattern}: shards in {len(folders)} folders: give --out")
    return folders.pop()


def _read_existing(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return {}
    return old if isinstance(old, dict) and isinstance(old.get("splits"), dict) else {}


def build_index(
    patterns: list[str],
    out: str = "",
    classes_file: str = "",
    workers: int = 0,
    progress: bool = True,
) -> dict[str, dict]:
    """Count the shards of each pattern and write the size index(es); returns {path: index}."""
    from tqdm import tqdm

    from ..artifacts import provenance, save_json

    if not patterns:
        raise DataError("give at least one shard pattern")
    splits: dict[str, tuple[str, list[str]]] = {}
    for pattern in patterns:
        urls = expand_shards(pattern, "pattern")
        name = split_name(urls)
        if name in splits:
            n = 2
            while f"{name}{n}" in splits:
                n += 1
            name = f"{name}{n}"
        splits[name] = (pattern, urls)
    every = [u for _, urls in splits.values() for u in urls]
    names = [_shard_name(u) for u in every]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"two shards are named {dup}: the index lists shards by file name")

    workers = min(workers or os.cpu_count() or 1, len(every))
    bar = tqdm(total=len(every), unit="shard", desc="counting samples", disable=not progress)
    results = {}
    if workers <= 1:
        for url in every:
            results[url] = count_shard(url)
            bar.update()
    else:
        with mp.get_context().Pool(workers) as pool:
            for r in pool.imap_unordered(count_shard, every):
                results[r["url"]] = r
                bar.update()
    bar.close()

    labels = {y for r in results.values() for y in r["labels"]}
    if not labels:
        example = next((r["example"] for r in results.values() if r["example"]), "no samples")
        raise DataError(
            f"no sample of {' '.join(patterns)} has an image ({'/'.join(IMAGE_FIELDS)}) and an "
            f"integer cls label ({example}): quest trains on image + cls samples"
        )
    if min(labels) < 0:
        raise DataError(f"negative cls label {min(labels)}: labels must be 0 .. classes-1")
    classes = [str(i) for i in range(max(labels) + 1)]
    if classes_file:
        given = [ln.strip() for ln in Path(classes_file).read_text().splitlines() if ln.strip()]
        if len(given) < len(classes):
            raise DataError(
                f"{classes_file} names {len(given)} classes but the shards have label "
                f"{len(classes) - 1}"
            )
        classes = given

    train = next((n for n in splits if "train" in n), next(iter(splits)))
    headers = [h for u in splits[train][1] for h in results[u]["headers"]]
    where = splits[train][0]
    fam, size, why = (
        choose_family(headers, where=where) if headers else ("imagenet", 0, f"no image in {where}")
    )

    targets: dict[str, list[str]] = {}
    for name, (pattern, urls) in splits.items():
        path = out or str(Path(_folder(urls, pattern)) / INDEX)
        targets.setdefault(path, []).append(name)
    written = {}
    for path, mine in targets.items():
        old = _read_existing(Path(path))
        ours = {_shard_name(u) for n in mine for u in splits[n][1]}
        kept = {
            n: s
            for n, s in old.get("splits", {}).items()
            if n not in mine and not ours & set(s.get("shards", {}))
        }
        index = {
            "format": 1,
            "kind": "index",
            "source": [splits[n][0] for n in mine],
            "classes": classes,
            "num_classes": len(classes),
            "channels": 1 if fam == "mnist" else 3,
            "family": fam,
            "image_size": size,
            "family_reason": why,
            "splits": dict(kept),
            "provenance": provenance(),
        }
        for name in mine:
            pattern, urls = splits[name]
            rs = [results[u] for u in urls]
            index["splits"][name] = {
                "total": sum(r["count"] for r in rs),
                "shards": {_shard_name(r["url"]): r["count"] for r in rs},
                "pattern": pattern,
                "unusable": sum(r["unusable"] for r in rs),
            }
        save_json(index, path)
        written[path] = index
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m quest.shards index",
        description="Write the size index (sizes.json) that quest reads, for shards written by "
        "another tool: image (jpg/jpeg/png/webp) + cls label per sample. Every shard is read once.",
    )
    p.add_argument(
        "patterns",
        nargs="+",
        metavar="PATTERN",
        help="shards of one split, as data.train_shards takes them ('train-{000000..000099}.tar'); "
        "give the training and validation patterns in one command",
    )
    p.add_argument("--out", default="", help=f"index file; default: {INDEX} next to the shards")
    p.add_argument("--classes", default="", help="class names, one a line, line i = label i")
    p.add_argument("--workers", type=int, default=0, help="processes; 0 = every CPU")
    args = p.parse_args(argv)
    try:
        written = build_index(args.patterns, args.out, args.classes, args.workers)
    except (DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, index in written.items():
        for name, s in index["splits"].items():
            note = f", {s['unusable']} without image or cls" if s.get("unusable") else ""
            print(f"{name}: {s.get('total')} samples in {len(s['shards'])} shards{note}")
        print(
            f'{path}: {index["num_classes"]} classes, transforms "{index["family"]}" '
            f"({index['family_reason']}), {index['channels']} channel(s)"
        )
    return 0
