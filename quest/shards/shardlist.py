"""Which shards to read and how many samples each holds: shard patterns, shard names, the size index,
and the samples of one shard (webdataset's tar reading).

Shards are tar files of samples: members `<key>.<ext>` sharing a key (the file name up to its first
dot) form one sample; a sample needs an image (`jpg`, `jpeg`, `png`, `webp` or `gif`) and a `cls`
member holding the integer label as text. Any tool that writes such tars works (webdataset's
`ShardWriter`, timm's and img2dataset's writers with a `cls` field, `python -m quest.shards`).

A stream has no length, so the readers take every size from a size index, `sizes.json` next to
the shards (or `data.shard_index`, a path or URL). `python -m quest.shards` writes it last when it
converts a dataset; `python -m quest.shards index PATTERN [PATTERN ...]` writes it for shards made by
another tool, by reading every shard once. It is a JSON object:

    {
      "splits": {                                  # any split names; one entry per shard file
        "train": {"shards": {"train-000000.tar": 1000, ...}, "total": 1281167, "pattern": "..."},
        "val":   {"shards": {"val-000000.tar": 1000, ...},   "total": 50000,   "pattern": "..."}
      },
      "classes": ["n01440764", ...],               # label i is classes[i]; the count is what counts
      "num_classes": 1000,
      "channels": 3,                               # 1: grey images, read with one channel
      "family": "imagenet",                        # transforms when data.transforms = ""
      "image_size": 0,                             # their size when data.image_size = 0 (0: default)
      "family_reason": "...",                      # why that family (printed when it is used)
      ...                                          # provenance: source, seed, versions
    }

Only `splits.*.shards` (sample counts, by shard file name: the last component of its path or URL)
and `classes` are required. `channels` (default 3), `family` (default "imagenet", said so when
used) and `image_size` are read when present. Train and validation shards may have indexes of their
own, which must list the same classes.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds

from ..data import DataError

INDEX = "sizes.json"
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "gif")  # the image keys readers look for


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


def _shard_name(url: str) -> str:
    """The file name the size index lists a shard under: the last path component, or for a `pipe:`
    command the last word ending in .tar / .tgz / .tar.gz (`pipe:aws s3 cp s3://b/x-000001.tar -`)."""
    if not url.startswith("pipe:"):
        return url.rpartition("/")[2]
    names = re.findall(r"([^/\s'\"]+\.(?:tar|tgz|tar\.gz))(?=[\s'\"]|$)", url)
    if not names:
        raise DataError(f"no shard file name (*.tar) in {url!r}")
    return names[-1]


def _index_hint(spec: str, urls: list[str]) -> str:
    pattern = spec if spec and "::" not in spec else urls[0]
    return f"python -m quest.shards index '{pattern}'"


def load_index(urls: list[str], location: str = "", spec: str = "") -> tuple[dict, list[int]]:
    """The size index (`location`, or the one next to the shards), and each shard's sample count.
    `spec`: the shard pattern as the recipe gives it, for the messages."""
    cache: dict[str, dict] = {}
    counts = []
    for url in urls:
        name = _shard_name(url)
        if not location and url.startswith("pipe:"):
            raise DataError(
                f"cannot locate {INDEX} for {url}: set data.shard_index to its path or URL"
            )
        where = location or f"{url.rpartition('/')[0] or '.'}/{INDEX}"
        if where not in cache:
            try:
                with wds.gopen(where, "rb") as f:
                    cache[where] = json.load(f)
            except (OSError, ValueError) as err:
                raise DataError(
                    f"no readable size index {where} ({err}): shards written by another tool "
                    f"need one: `{_index_hint(spec, urls)}` counts their samples and writes it "
                    "(`python -m quest.shards` writes it last when it converts a dataset, so a "
                    "conversion may be unfinished)"
                ) from None
            index = cache[where]
            if not isinstance(index, dict) or "splits" not in index or "classes" not in index:
                raise DataError(
                    f"{where} is not a size index (no 'splits' or 'classes'): check "
                    f"data.shard_index, or write one with `{_index_hint(spec, urls)}`"
                )
            index.setdefault("channels", 3)
        shards = {n: c for s in cache[where]["splits"].values() for n, c in s["shards"].items()}
        if name not in shards:
            raise DataError(
                f"shard {url} is not listed in {where}: index every split's shards with "
                f"`{_index_hint(spec, urls)}` (several patterns in one command)"
            )
        counts.append(int(shards[name]))
    first = next(iter(cache.values()))
    for other in cache.values():
        if (other["classes"], other["channels"]) != (first["classes"], first["channels"]):
            raise DataError(
                f"the size indexes of {urls[0]} and {urls[-1]} disagree on classes or channels"
            )
    return first, counts


def shard_samples(url: str) -> Iterator[dict]:
    """Samples of one shard as webdataset reads them (`tarfile_samples`: regular files only, `__*__`
    metadata skipped, the key ending at the first dot, extensions lower-cased): {"__key__", "__url__",
    <extension>: bytes, ...}. A damaged or truncated tar raises ValueError ("tar truncated or damaged:
    ..."); a damaged header after the first ends the shard early (tarfile's stream reading), which the
    readers notice against the size index."""
    try:
        yield from wds.tarfile_samples([{"url": url}])
    except (tarfile.TarError, EOFError, zlib.error) as err:
        reason = str(err.args[0]).split(" @ ")[0] if err.args else type(err).__name__
        raise ValueError(f"tar truncated or damaged: {reason}") from None
