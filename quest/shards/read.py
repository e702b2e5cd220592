"""WebDataset readers for training and evaluation (dataset = "wds"; see the package docstring).

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

import copy
import hashlib
import json
import math
import multiprocessing as mp
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from ..data import (
    DataError,
    Loaders,
    _loader_kwargs,
    channels,
    count_classes,
    image_size,
    per_rank,
    resolve,
    short_error,
    transforms,
)
from ..recipe import Data
from .tar import tar_samples
from .write import IMAGE_FIELDS, INDEX, SHUFFLE_BUFFER, SHUFFLE_INITIAL, _mode

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
        raise ValueError(f"cannot decode {field}: {short_error(err)}") from None
    return (image[0] if image.ndim == 4 else image), int(sample["cls"])


class Batcher:
    """Applies a v2 pipeline to single images and stacks them into a batch.

    When the pipeline ends with ToDtype(float32, scale=True) + Normalize (every family in
    `quest.data.transforms`), that tail is not run image by image: each uint8 image is scaled and
    normalised straight into its slot of the batch (one multiply-add, `ToModelInput.into`), which
    saves the float temporaries and the stacking copy. With `defer` (a CUDA training device), even
    that is left out of the workers: they ship uint8 batches, a quarter of the bytes to copy between
    processes and send to the GPU, and `ToModelInput` normalises them there after the loader (FFCV
    and DALI do the same). Not on a CPU device: there the float batch would only be allocated and
    written in the main process instead, which measured slower (tools/bench_data.py).
    Inside a loader worker the batch is allocated in shared memory, as `default_collate` does."""

    def __init__(self, transform: Callable, defer: bool = False):
        steps = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
        self.norm = None
        if (
            len(steps) >= 2
            and isinstance(steps[-2], v2.ToDtype)
            and steps[-2].dtype == torch.float32
            and steps[-2].scale
            and isinstance(steps[-1], v2.Normalize)
        ):
            self.norm = ToModelInput(list(steps[-1].mean), list(steps[-1].std))
            self.tail = v2.Compose(steps[-2:])
            steps = steps[:-2]
        self.head = v2.Compose(steps) if steps else _identity
        self.transform = transform
        self.defer = defer and self.norm is not None

    def image(self, image: torch.Tensor) -> torch.Tensor:
        """The per-image part (uint8 out when the normalising tail is fused into `batch`)."""
        return self.head(image) if self.norm else self.transform(image)

    def batch(self, items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B×C×H×W images, labels): float32, or uint8 when deferred to `to_model_input`."""
        labels = torch.tensor([y for _, y in items], dtype=torch.int64)
        images = [x for x, _ in items]
        fused = self.norm is not None and all(x.dtype == torch.uint8 for x in images)
        if self.norm and not fused:
            images = [self.tail(x) for x in images]  # not uint8 after all: the tail as plain v2
        shape = images[0].shape
        if any(x.shape != shape for x in images):
            raise DataError(
                f"images of different sizes in one batch ({shape} and others): these transforms "
                "do not give a fixed size; set data.transforms and data.image_size"
            )
        if not fused or self.defer:
            return torch.stack(images, out=_empty((len(images), *shape), images[0].dtype)), labels
        out = _empty((len(images), *shape), torch.float32)
        for slot, x in zip(out, images):
            self.norm.into(x, slot)
        return out, labels

    def to_model_input(self, device=None) -> ToModelInput | None:
        """The stage after the loader that finishes deferred batches (None when nothing is)."""
        return self.norm.to(device or "cpu") if self.defer else None


class ToModelInput:
    """uint8 images → float32 scaled to [0, 1] and normalised, as x·(1/255σ) − μ/σ: one multiply and
    one add (v2's ToDtype + Normalize, four passes, within 1e-6). Called on a deferred batch after
    the loader (after pinning, so the copy to the GPU is the uint8 one); float batches pass through."""

    def __init__(self, mean: list[float], std: list[float]):
        self.scale = torch.tensor([1 / (255 * s) for s in std]).view(-1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(-1, 1, 1)

    def to(self, device) -> ToModelInput:
        """A copy that works on `device` (batches are moved there first)."""
        moved = copy.copy(self)
        moved.scale, moved.shift = self.scale.to(device), self.shift.to(device)
        return moved

    def into(self, images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        torch.mul(images, self.scale, out=out)
        return out.add_(self.shift)

    def __call__(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        if images.dtype != torch.uint8:
            return images, labels
        x = images.to(self.scale.device, non_blocking=True)
        return self.into(x, torch.empty(x.shape, dtype=torch.float32, device=x.device)), labels


def _identity(x):
    return x


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor, in shared memory inside a loader worker (as torch's default_collate)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).view(shape)


def _on_gpu(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def web_loader(dataset, batcher: Batcher, kw: dict, device=None) -> wds.WebLoader:
    """A WebLoader over a stream of ready batches, finishing deferred batches after the workers."""
    loader = wds.WebLoader(dataset, batch_size=None, **kw)
    finish = batcher.to_model_input(device)
    return loader.map(finish) if finish else loader


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
    run stays reproducible; a resumed run continues with fresh epoch-seeded streams."""

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
    ):
        self.urls, self.batches, self.batch = list(urls), batches, batch
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
                for sample in tar_samples(url):
                    n += 1
                    yield sample
            except Exception as err:  # the rest of a damaged shard is lost; the stream goes on
                warnings.warn(
                    f"skipping the rest of training shard {url}: {short_error(err)}", stacklevel=1
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
        samples = tar_samples(url)
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
    mode = _mode(channels(cfg))
    batches = StreamBatches(sum(train_counts), batch, world, cfg.epoch_size)
    defer = _on_gpu(device)
    train = TrainStream(
        train_urls, batches, batch, rank, seed, transforms(cfg, True), mode, defer=defer
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
        _mode(channels(cfg)),
        keep=keep,
        strict=False,
        defer=_on_gpu(device),
    )
    return web_loader(ds, ds.batcher, _loader_kwargs(cfg, False), device)
