"""WebDataset loaders for training and evaluation (dataset = "wds"; see the package docstring).

The streams are in `quest.shards.stream`, decoding and batching in `quest.shards.batching`, and the
shard patterns, size index (its format is documented there) and tar reading in
`quest.shards.shardlist`.

Tars are read by webdataset (`tarfile_samples`): the repository's own measurement
(tools/bench_data.py) showed the hand-written tar reader this replaced only 1.02–1.14× faster end to
end with 2 workers, below the 10 % that would justify keeping a tar parser of our own.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import (
    DataError,
    Loaders,
    _loader_kwargs,
    channels,
    count_classes,
    image_size,
    per_rank,
    read_mode,
    resolve,
    transforms,
)
from ..recipe import Data
from .batching import _on_gpu, web_loader
from .shardlist import expand_shards, load_index
from .stream import ExactStream, StreamBatches, TrainStream


def _check_cfg(cfg: Data) -> None:
    if cfg.val_fraction or cfg.per_class or cfg.keep_fraction < 1.0:
        raise DataError(
            "data.val_fraction, per_class and keep_fraction do not apply to dataset = 'wds'"
        )


def build_wds_loaders(
    cfg: Data, *, seed: int, rank: int, world: int, pin: bool, device=None
) -> Loaders:
    """Training and validation loaders for this rank from `data.train_shards` / `data.val_shards`.
    Sizes, classes and channels come from the shards' `sizes.json`. Batches arrive on `device`
    (normalised there; CPU when None)."""
    _check_cfg(cfg)
    train_urls = expand_shards(cfg.train_shards, "data.train_shards")
    val_urls = expand_shards(cfg.val_shards, "data.val_shards")
    index, train_counts = load_index(train_urls, cfg.shard_index, cfg.train_shards)
    val_index, val_counts = load_index(val_urls, cfg.shard_index, cfg.val_shards)
    if val_index["classes"] != index["classes"]:
        raise DataError(
            f"data.train_shards and data.val_shards have size indexes with other classes "
            f"({len(index['classes'])} and {len(val_index['classes'])}): index both in one "
            f"command, `python -m quest.shards index '{cfg.train_shards}' '{cfg.val_shards}'`"
        )
    cfg = resolve(cfg, index=index)
    batch = per_rank(cfg.batch_size, world, "data.batch_size")
    eval_batch = per_rank(cfg.eval_batch_size or 2 * cfg.batch_size, world, "data.eval_batch_size")
    mode = read_mode(channels(cfg))
    batches = StreamBatches(sum(train_counts), batch, world, cfg.epoch_size)
    defer = _on_gpu(device)
    train = TrainStream(
        train_urls,
        batches,
        batch,
        rank,
        seed,
        transforms(cfg, True),
        mode,
        defer=defer,
        counts=train_counts,
    )
    val = ExactStream(
        val_urls, val_counts, rank, world, eval_batch, transforms(cfg, False), mode, defer=defer
    )
    kw = _loader_kwargs(cfg, pin)
    return Loaders(
        train=web_loader(train, train.batcher, kw, device),
        train_batches=batches,
        eval=web_loader(val, val.batcher, kw, device),
        num_classes=count_classes(cfg, index["classes"]),
        in_channels=channels(cfg),
        image_size=image_size(cfg),
        train_size=sum(train_counts),
        eval_size=sum(val_counts),
        classes=list(index["classes"]),
    )


def wds_feature_loader(
    cfg: Data, *, seed: int, rank: int, world: int, max_images: int = 0, device=None
):
    """The training shards under the evaluation transforms, each image once over ranks and workers
    (codebook stage). max_images > 0 takes a seeded random subset first. Unreadable samples are
    skipped with a warning."""
    _check_cfg(cfg)
    urls = expand_shards(cfg.train_shards, "data.train_shards")
    index, counts = load_index(urls, cfg.shard_index, cfg.train_shards)
    cfg = resolve(cfg, index=index)
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
        read_mode(channels(cfg)),
        keep=keep,
        strict=False,
        defer=_on_gpu(device),
    )
    return web_loader(ds, ds.batcher, _loader_kwargs(cfg, False), device)
