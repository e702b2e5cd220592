"""From raw samples to model input: decoding, per-image transforms, batches and the loader around them."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import webdataset as wds
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from ..data import (
    DataError,
    short_error,
)
from .shardlist import IMAGE_FIELDS


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
