"""The codebook stage on two processes (gloo): ranks with unequal numbers of images each contribute
every vector they collected, and rank 0 clusters exactly the vectors one process would."""

from __future__ import annotations

import contextlib
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quest import codebook
from quest import recipe as R
from quest.build import quest_levels
from quest.kmeans import KMeansResult

pytestmark = pytest.mark.slow
IMAGES = (100, 93)  # per rank: unequal on purpose
LOCATIONS, CHANNELS = 4, 3  # each "image" is a 3×2×2 teacher map: 4 vectors of 3 dims


class FakeAccelerator:
    """What build_codebooks uses of accelerate.Accelerator, over the default process group."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0
        self.device = torch.device("cpu")
        self.mixed_precision = "no"

    def autocast(self):
        return contextlib.nullcontext()

    def gather(self, t):
        if self.num_processes == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.num_processes)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def reduce(self, t, reduction="sum"):
        if self.num_processes > 1:
            dist.all_reduce(t)
        return t


def images(first: int, count: int) -> torch.Tensor:
    """`count` 3×2×2 maps whose vectors are all distinct: vector v of the stream is [v, -v, 10v]."""
    v = torch.arange(first * LOCATIONS, (first + count) * LOCATIONS, dtype=torch.float32)
    return torch.stack([v, -v, 10 * v]).T.reshape(count, 2, 2, CHANNELS).permute(0, 3, 1, 2)


def loader(first: int, count: int, batch: int = 16):
    maps = images(first, count)
    return [
        (maps[s : s + batch], torch.zeros(len(maps[s : s + batch]))) for s in range(0, count, batch)
    ]


def teacher(x):
    return None, [x]  # the "images" are the teacher's map


def recipe(tmp, name: str, **codebook_keys) -> R.Recipe:
    """A recipe whose codebook `name` goes to tmp; the teacher file is tmp.parent / teacher.pt."""
    return R.from_dict(
        {
            "teacher": {
                "arch": "resnet8",
                "checkpoint": str(tmp.parent / "teacher.pt"),
                "layer": "layer3",
            },
            "student": {"arch": "resnet8"},
            "codebook": {
                "path": str(tmp / f"{name}.pt"),
                "size": 8,
                "iterations": 1,
                **codebook_keys,
            },
        }
    )


def recording_kmeans(seen: list):
    """fit_kmeans that records its input (the pooled vectors) and returns its first k rows."""

    def fit(x, k, iterations, seed, max_points, gpu):
        seen.append(x.clone())
        return KMeansResult(x[:k].clone(), [0.0], torch.zeros(k, dtype=torch.long), len(x), "fake")

    return fit


CASES = {  # name: codebook keys
    "every_vector": {},
    "capped": {"max_vectors": 301},
    "refine_capped": {"max_vectors": 301, "refine_iterations": 1},
    "k_too_large": {"size": 773},  # one more than the 772 vectors of both ranks
}


def run_cases(tmp, rank: int, world: int, data) -> dict:
    """build_codebooks on every case; what k-means received on rank 0, or the error message."""
    out, real = {}, codebook.fit_kmeans
    for name, keys in CASES.items():
        seen: list = []
        codebook.fit_kmeans = recording_kmeans(seen)
        try:
            r = recipe(tmp, name, **keys)
            (book,) = codebook.build_codebooks(
                r.codebook,
                quest_levels(r),
                teacher,
                FakeAccelerator(rank, world),
                data,
                teacher_cfg=r.teacher,
                seed=r.seed,
            )
            # numpy: travels between processes by value (a tensor travels as a file descriptor)
            out[name] = (seen[0].numpy() if seen else None, book.meta["vectors_seen"])
        except codebook.CodebookError as err:
            out[name] = str(err)
        finally:
            codebook.fit_kmeans = real
    return out


def _rank(rank: int, world: int, port: int, tmp, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    first = sum(IMAGES[:rank])
    queue.put((rank, run_cases(tmp, rank, world, loader(first, IMAGES[rank]))))
    dist.barrier()
    dist.destroy_process_group()


def sorted_rows(x: np.ndarray) -> np.ndarray:
    return x[x[:, 0].argsort()]


def test_unequal_ranks_cluster_every_vector_one_process_would(tmp_path):
    total = sum(IMAGES) * LOCATIONS
    (tmp_path / "teacher.pt").write_bytes(b"weights")  # hashed into the metadata, never loaded
    one = run_cases(tmp_path / "one", 0, 1, loader(0, sum(IMAGES)))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_rank, args=(r, 2, port, tmp_path / "two", queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    two, other = results[0], results[1]

    # Every vector of both ranks reaches k-means, exactly the vectors of one process.
    pooled, seen = two["every_vector"]
    assert pooled.shape == (total, CHANNELS) and seen == total
    np.testing.assert_array_equal(sorted_rows(pooled), sorted_rows(one["every_vector"][0]))
    assert other["every_vector"][0] is None  # only rank 0 holds the pooled matrix

    # A cap: exactly max_vectors distinct vectors of the stream, from both ranks.
    for name in ("capped", "refine_capped"):
        pooled, _ = two[name]
        assert pooled.shape == (301, CHANNELS) and one[name][0].shape == (301, CHANNELS)
        ids = pooled[:, 0].astype(int)
        assert len(set(ids.tolist())) == 301 and ids.min() >= 0 and ids.max() < total
        np.testing.assert_array_equal(
            pooled[:, 1:], np.stack([-pooled[:, 0], 10 * pooled[:, 0]], 1)
        )
        on_rank_1 = int((ids >= IMAGES[0] * LOCATIONS).sum())
        assert 140 <= on_rank_1 <= 151  # an equal share each: ceil(301 / 2) = 151 per rank

    # K larger than the vectors: both ranks fail with the true total.
    for result in (two, other, one):
        assert isinstance(result["k_too_large"], str)
        assert (
            "K=773" in result["k_too_large"] and f"{total} teacher feature" in result["k_too_large"]
        )
