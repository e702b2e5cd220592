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
  seed. Streams have no length, so the readers take every size from it. A folder's family and
  channels come from its images (`quest.data.choose_family`: 28-px grey digits are "mnist", one
  channel; photos "imagenet", three).

Shards written by other tools (webdataset's `ShardWriter`, timm or img2dataset writers: an image
under `jpg`, `jpeg`, `png` or `webp` and the label under `cls`) need only the size index:
`python -m quest.shards index PATTERN [PATTERN ...]` (`quest.shards.index`) reads them once and writes
it. Its format is documented in `quest.shards.shardlist`, which reads it.

Readers. Training: each (rank, worker) draws shards with replacement from an RNG
seeded by (seed, epoch, rank, worker), streams them through a shuffle buffer of encoded bytes, decodes
with `torchvision.io.decode_image` and applies the same v2 transforms as the map-style path, and yields
exactly its share of `batches_per_epoch` full batches, so every rank takes the same number of steps.
Validation: the samples, in shard order, are cut into `world × workers` contiguous, equal ranges using
the size index, so every sample is read exactly once and the readers stay balanced even with fewer
shards than readers. Neither loader may go through `accelerator.prepare`.
"""

import sys

from . import index, write
from .batching import Batcher, ToModelInput, decode_sample, web_loader
from .index import build_index
from .read import build_wds_loaders, wds_feature_loader
from .shardlist import IMAGE_FIELDS, INDEX, expand_shards, load_index, shard_samples
from .sources import detect_kind, sanitize_key
from .stream import ExactStream, StreamBatches, TrainStream, reader_plan
from .write import convert, encode_record, write_shard


def main(argv: list[str] | None = None) -> int:
    """python -m quest.shards [convert] SOURCE OUT ... | index PATTERN ..."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "index":
        return index.main(argv[1:])
    return write.main(argv[1:] if argv and argv[0] == "convert" else argv)


__all__ = [
    "IMAGE_FIELDS",
    "INDEX",
    "Batcher",
    "ExactStream",
    "StreamBatches",
    "ToModelInput",
    "TrainStream",
    "build_index",
    "build_wds_loaders",
    "convert",
    "decode_sample",
    "detect_kind",
    "encode_record",
    "expand_shards",
    "load_index",
    "main",
    "reader_plan",
    "sanitize_key",
    "shard_samples",
    "wds_feature_loader",
    "web_loader",
    "write_shard",
]
