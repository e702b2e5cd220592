"""The sample streams of the shard loaders: resampled training batches (`TrainStream`, `StreamBatches`)
and exact, balanced passes over every sample (`ExactStream`, `reader_plan`)."""

from __future__ import annotations

import hashlib
import math
import multiprocessing as mp
import random
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.io import ImageReadMode

from ..data import (
    DataError,
    short_error,
)
from .batching import Batcher, decode_sample
from .shardlist import INDEX, shard_samples

SHUFFLE_BUFFER = 2000  # encoded samples per training worker (~220 MB at ImageNet's ~110 kB a JPEG)
SHUFFLE_INITIAL = 500


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


class TrainStream(IterableDataset):
    """Resampled training batches for one rank (a `WebDataset(resampled=True)` pipeline, as in
    open_clip, with an epoch-seeded shard sampler: webdataset 1.0.2 seeds its own from the clock).

    Each (rank, worker) draws shards with replacement from an RNG seeded by (seed, epoch, rank,
    worker), so ranks need no node splitting. The worker yields its share of the rank's
    `batches_per_epoch - start` batches (a `with_epoch` that follows `set_epoch`). Resuming mid-epoch
    therefore starts a fresh epoch-seeded stream for the remaining batches: a resampled stream has no
    position to restore, and replaying it batch by batch would only cost time.

    A (persistent) worker that finished epoch e-1 goes on with the same stream in epoch e instead of
    starting a fresh one: a fresh stream refills the shuffle buffer, reading up to `buffer` samples
    that the previous epoch's buffer already held, which doubles the reading when a worker's share of
    an epoch is as small as the buffer (CIFAR-size data on many GPUs and workers). An uninterrupted
    run stays reproducible; a resumed run continues with fresh epoch-seeded streams.

    `counts` (the size index's, per url): a shard that ends early is warned about and counted."""

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
        defer: bool = False,
        counts=None,
    ):
        self.urls, self.batches, self.batch = list(urls), batches, batch
        self.sizes = dict(zip(self.urls, counts)) if counts is not None else {}
        self.rank, self.seed, self.mode = rank, seed, mode
        self.batcher = Batcher(transform, defer)
        self.buffer, self.initial = buffer, initial
        self._carry: tuple[int, Iterator[dict]] | None = None  # (epoch finished, its stream)

    def load(self, sample: dict) -> tuple[torch.Tensor, int]:
        """Decode and augment one raw sample (ValueError when it cannot be decoded)."""
        image, label = decode_sample(sample, self.mode)
        return self.batcher.image(image), label

    def _samples(self, rng: random.Random) -> Iterator[dict]:
        empty = 0
        while True:
            url = rng.choice(self.urls)
            n = 0
            try:
                for sample in shard_samples(url):
                    n += 1
                    yield sample
            except Exception as err:  # the rest of a damaged shard is lost; the stream goes on
                warnings.warn(
                    f"skipping the rest of training shard {url}: {short_error(err)}", stacklevel=1
                )
                self.batches.count_corrupt()
            else:  # tarfile ends a shard quietly at a damaged header: the size index tells
                if n < self.sizes.get(url, 0):
                    warnings.warn(
                        f"training shard {url} ended after {n} of its {self.sizes[url]} samples "
                        "(a damaged tar?)",
                        stacklevel=1,
                    )
                    self.batches.count_corrupt()
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
        carry, self._carry = self._carry, None
        if carry is not None and carry[0] == epoch - 1 and self.batches.start == 0:
            stream = carry[1]
        else:
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
        self._carry = (epoch, stream)  # a completed epoch only: then the stream's position is exact


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
        defer: bool = False,
    ):
        self.urls, self.counts, self.rank, self.world = list(urls), list(counts), rank, world
        self.batch, self.batcher, self.mode = batch, Batcher(transform, defer), mode
        self.keep, self.strict, self.counter = keep, strict, counter

    def _fail(self, message: str) -> None:
        if self.strict:
            raise DataError(message)
        warnings.warn(f"skipping {message}", stacklevel=2)
        if self.counter is not None:
            self.counter()

    def _read(self, url: str, first: int, stop: int, picks) -> Iterator[tuple[torch.Tensor, int]]:
        what = "validation shard" if self.strict else "shard"
        samples = shard_samples(url)
        key = "(start of shard)"
        for i in range(stop):
            try:
                sample = next(samples)
            except StopIteration:
                self._fail(f"{what} {url} holds {i} samples but {INDEX} promises at least {stop}")
                return
            except Exception as err:
                self._fail(f"{what} {url}: unreadable after key {key}: {short_error(err)}")
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
