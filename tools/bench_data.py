"""Images/s of the shard reader against torchvision ImageFolder + DataLoader on the same JPEG files.

Both sides get the same training transforms (ImageNet family: RandomResizedCrop + flip, float
normalise), batch size and number of workers, persistent workers, and are timed alternately in one
run after a warm-up epoch each (which also brings the files into the page cache):

- folder: `torchvision.datasets.ImageFolder` with its default PIL loader, v2 transforms on PIL images,
  `DataLoader(shuffle=True)`;
- shards: `quest.shards.build_wds_loaders(...).train` as CPU training uses it (tar streaming,
  `torchvision.io.decode_image`, v2 transforms on uint8 tensors, each image scaled and normalised into
  its slot of the float batch in the worker; with a CUDA device the workers would ship uint8 batches
  and the GPU would normalise them, which this CPU benchmark does not time);
- shards+PIL (`--pil-shards`): the shard reader decoding with PIL instead, to separate the effect of
  the decoder from that of reading tar shards.

Without --folder it writes a synthetic ImageNet-layout folder of 320×240 JPEGs first.

    python tools/bench_data.py --images 3000 --workers 2 --batch 64 --repeats 3 [--pil-shards]
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.io import encode_jpeg
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quest import shards
from quest.data import STATS, _loader_kwargs
from quest.recipe import Data


def synthetic_folder(root: Path, images: int, classes: int, width: int, height: int) -> Path:
    """root/train/<class>/<n>.JPEG: smooth random scenes with texture, JPEG quality 90
    (about 40 kB each at 320×240, close to ImageNet's bytes per pixel)."""
    train = root / "train"
    if train.is_dir() and sum(1 for _ in train.rglob("*.JPEG")) == images:
        return root
    g = torch.Generator().manual_seed(0)
    for i in range(images):
        folder = train / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        low = torch.rand(1, 3, 6, 8, generator=g)
        img = torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic")[0]
        img = img + torch.randn(3, height, width, generator=g) * 0.08
        data = encode_jpeg((img.clamp(0, 1) * 255).to(torch.uint8), quality=90)
        (folder / f"n{i % classes:08d}_{i}.JPEG").write_bytes(data.numpy().tobytes())
    return root


def pil_transforms(size: int) -> v2.Compose:
    mean, std = STATS["imagenet"]
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


class PILTrainStream(shards.TrainStream):
    """The shard reader with PIL decoding and the PIL-side transforms of the folder baseline."""

    def load(self, sample: dict) -> tuple[torch.Tensor, int]:
        from PIL import Image

        field = next(f for f in shards.IMAGE_FIELDS if f in sample)
        with Image.open(io.BytesIO(sample[field])) as im:
            return self.batcher.image(im.convert("RGB")), int(sample["cls"])


def _cpu_seconds(pids: list[int]) -> float:
    """user + system CPU time of processes (Linux /proc), robust to other load on the machine."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _pids(loader) -> list[int]:
    dl = loader if isinstance(loader, DataLoader) else loader.pipeline[0]  # WebLoader wraps one
    workers = dl._iterator._workers if dl._iterator is not None else []
    return [os.getpid(), *(w.pid for w in workers)]


def epoch_rate(loader, before=None) -> tuple[float, float]:
    """(images/s, CPU ms per image over the main process and the workers) for one epoch."""
    if before:
        before()
    it = iter(loader)
    pids = _pids(loader)
    n, cpu, start = 0, _cpu_seconds(pids), time.perf_counter()
    for x, _ in it:
        n += len(x)
    wall, cpu = time.perf_counter() - start, _cpu_seconds(pids) - cpu
    return n / wall, cpu / n * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default="", help="ImageNet-layout folder (train/<class>/<jpeg>)")
    p.add_argument("--work", default="/tmp/quest-bench", help="synthetic folder and shards go here")
    p.add_argument("--images", type=int, default=3000, help="synthetic images")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--size", type=int, default=224, help="RandomResizedCrop output")
    p.add_argument("--workers", type=int, default=2, help="loader workers, both sides")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per side, interleaved")
    p.add_argument("--pil-shards", action="store_true", help="also time shards decoded with PIL")
    args = p.parse_args(argv)

    work = Path(args.work)
    src = Path(args.folder) if args.folder else work / "folder"
    if not args.folder:
        synthetic_folder(src, args.images, args.classes, args.width, args.height)
    out = work / "shards"
    index = shards.convert(
        src,
        out,
        splits=("train",),
        shard_size=args.shard_size,
        workers=args.workers,
        progress=False,
    )
    pattern = str(out / index["splits"]["train"]["pattern"])
    torch.manual_seed(0)

    folder_set = ImageFolder(str(src / "train"), transform=pil_transforms(args.size))
    folder = DataLoader(
        folder_set,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers else None,
    )
    cfg = Data(
        dataset="wds",
        train_shards=pattern,
        val_shards=pattern,
        transforms="imagenet",
        image_size=args.size,
        batch_size=args.batch,
        num_workers=args.workers,
    )
    loaders = shards.build_wds_loaders(cfg, seed=0, rank=0, world=1, pin=False)

    def epochs(batches: shards.StreamBatches):
        """Each side counts its own epochs: a stream carries over only into the next epoch."""
        count = itertools.count()
        return lambda: batches.set_epoch(next(count))

    sides = {
        "folder": (folder, None),
        "shards": (loaders.train, epochs(loaders.train_batches)),
    }
    ds = loaders.train.pipeline[0].dataset  # the TrainStream behind the WebLoader
    variants = {
        "shards+PIL": (args.pil_shards, PILTrainStream, pil_transforms(args.size)),
    }
    for name, (wanted, stream, transform) in variants.items():
        if wanted:
            batches = shards.StreamBatches(ds.batches.samples, ds.batch, 1)
            side = stream(ds.urls, batches, ds.batch, 0, 0, transform, ds.mode)
            loader = shards.web_loader(side, side.batcher, _loader_kwargs(cfg, False))
            sides[name] = (loader, epochs(batches))

    n_images = len(folder_set)
    print(
        f"{n_images} JPEGs from {src}, {len(index['splits']['train']['shards'])} shards, "
        f"batch {args.batch}, {args.workers} workers, {args.size} px RandomResizedCrop + flip, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before"
    )
    rates: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for loader, before in sides.values():  # warm-up: workers start, page cache fills
        epoch_rate(loader, before)
    for _ in range(args.repeats):
        for name, (loader, before) in sides.items():
            rate, ms = epoch_rate(loader, before)
            rates[name].append(rate)
            cpu[name].append(ms)
    for name, values in rates.items():
        spread = ", ".join(f"{v:.0f}" for v in values)
        print(
            f"{name:>14}: {statistics.median(values):7.1f} images/s (median of {spread}), "
            f"{statistics.median(cpu[name]):.2f} CPU ms/image"
        )
    print(f"load average {os.getloadavg()[0]:.1f} after (other processes distort both rates)")
    for other in rates:  # the reference last: tools and tests read the final line
        if other != "shards":
            cpu_ratio = statistics.median(cpu[other]) / statistics.median(cpu["shards"])
            print(f"CPU time per image {other}/shards = {cpu_ratio:.2f}")
    for other in [*list(rates)[2:], "folder"]:
        ratio = statistics.median(rates["shards"]) / statistics.median(rates[other])
        print(f"shards/{other} = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
