"""The codebook stage: teacher features → k-means visual words → a versioned artifact.

`python -m quest.codebook RECIPE [section.key=value ...]` (or `accelerate launch -m quest.codebook`):
every rank passes its part of the training set (evaluation transforms) through the teacher and keeps
an equal-size uniform random sample of its feature vectors; rank 0 gathers the samples, runs faiss
k-means (GPU when present), and the centroids are broadcast so every rank holds the same codebook.
Optionally, distributed Lloyd iterations over every vector refine the faiss result.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import artifacts
from .kmeans import KMeansResult, fit_kmeans, lloyd_refine
from .losses import flatten_locations
from .recipe import Level, Recipe

FORMAT = "quest-codebook/1"
# Fields that must agree between an existing artifact and the recipe that wants to reuse it.
MATCH_FIELDS = ("teacher_arch", "teacher_weights", "layer", "pool", "size")


class CodebookError(ValueError):
    """A codebook artifact that is missing, corrupt or made for another teacher/layer."""


@dataclass
class Codebook:
    centroids: torch.Tensor  # K×C float32
    meta: dict

    def __post_init__(self):
        self.sq_norms = self.centroids.square().sum(1)  # cached: soft_assign needs them every step

    def to(self, device) -> Codebook:
        return Codebook(self.centroids.to(device), self.meta)


def expected_meta(recipe: Recipe, level: Level) -> dict:
    """What an artifact for this recipe level must say about itself."""
    return {
        "teacher_arch": recipe.teacher.arch,
        "teacher_weights": teacher_weights_id(recipe.teacher.checkpoint),
        "layer": level.teacher_layer,
        "pool": level.pool,
        "size": recipe.codebook.size,
    }


def teacher_weights_id(checkpoint: str) -> str:
    """A file's content hash, or the torchvision weights name."""
    path = Path(checkpoint)
    return f"sha256:{artifacts.file_sha256(path, 16)}" if path.is_file() else checkpoint


def save_codebook(path: str | Path, centroids: torch.Tensor, meta: dict) -> Path:
    meta = {"format": FORMAT, **meta, **artifacts.provenance()}
    return artifacts.save_torch(
        {"centroids": centroids.float().cpu().contiguous(), "meta": meta}, path
    )


def load_codebook(
    path: str | Path, expect: dict | None = None, channels: int | None = None
) -> Codebook:
    """Load and validate an artifact; `expect` fields (MATCH_FIELDS) must equal the artifact's."""
    path = Path(path)
    if not path.is_file():
        raise CodebookError(f"codebook not found: {path} (run `python -m quest.codebook RECIPE`)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        centroids, meta = obj["centroids"], obj["meta"]
        if not torch.is_tensor(centroids) or not isinstance(meta, dict):
            raise TypeError("expected a tensor 'centroids' and a dict 'meta'")
    except Exception as err:
        raise CodebookError(f"{path} is not a readable quest codebook: {err}") from None
    if meta.get("format") != FORMAT:
        raise CodebookError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if (
        centroids.ndim != 2
        or centroids.shape[0] != meta.get("size")
        or not torch.isfinite(centroids).all()
    ):
        raise CodebookError(
            f"{path}: centroids {tuple(centroids.shape)} are malformed or not finite"
        )
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise CodebookError(
                f"{path} was built for {key} = {meta.get(key)!r}, but the recipe has {value!r}: "
                "point codebook.path elsewhere or delete the file to rebuild it"
            )
    if channels is not None and centroids.shape[1] != channels:
        raise CodebookError(
            f"{path}: codewords have {centroids.shape[1]} dims but the teacher map has {channels} channels"
        )
    return Codebook(centroids.float(), meta)


class VectorSample:
    """A uniform random sample without replacement of at most `capacity` rows from a stream of
    batches (random keys, keep the smallest): memory stays bounded by capacity + one batch."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity, self.g = capacity, generator
        self.rows: torch.Tensor | None = None
        self.keys = torch.empty(0)
        self.seen = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().cpu()
        self.seen += rows.shape[0]
        keys = torch.rand(rows.shape[0], generator=self.g)
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if self.capacity and rows.shape[0] > self.capacity:
            keys, idx = keys.topk(self.capacity, largest=False)
            rows = rows[idx]
        self.rows, self.keys = rows, keys

    def take(self, n: int) -> torch.Tensor:
        """n rows of the sample in random-key order (still a uniform sample)."""
        order = self.keys.argsort()[:n]
        return self.rows[order]


def _gather_to_main(x: torch.Tensor, world: int) -> torch.Tensor | None:
    """Concatenate equal-size per-rank tensors on rank 0 (not on every rank: the matrix can be large)."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)] if dist.get_rank() == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts) if parts is not None else None


@torch.no_grad()
def extract_samples(
    teacher, loader, capacities: list[int], device, autocast, seed: int, rank: int
) -> list[VectorSample]:
    """One pass of the teacher over this rank's images; a bounded sample of vectors per level."""
    samples = [
        VectorSample(c, torch.Generator().manual_seed(seed * 1000 + rank)) for c in capacities
    ]
    for images, _ in tqdm(
        loader, desc="teacher features", disable=rank != 0 or not sys.stderr.isatty(), leave=False
    ):
        with autocast():
            _, maps = teacher(images.to(device, non_blocking=True))
        for sample, fmap in zip(samples, maps):
            sample.add(flatten_locations(fmap))
    return samples


def build_codebooks(recipe: Recipe, teacher, accelerator, loader) -> list[Codebook]:
    """Fit one codebook per QuEST level from the teacher's features and write the artifacts (rank 0)."""
    cb = recipe.codebook
    levels = recipe.quest_levels()
    world, rank = accelerator.num_processes, accelerator.process_index
    seed = recipe.seed if cb.seed < 0 else cb.seed
    # Refinement needs every local vector; otherwise each rank keeps a bounded uniform sample.
    per_rank = -(-cb.max_vectors // world) if cb.max_vectors else 0
    capacity = 0 if cb.refine_iterations > 0 else per_rank
    t0 = time.time()
    samples = extract_samples(
        teacher,
        loader,
        [capacity] * len(levels),
        accelerator.device,
        accelerator.autocast,
        seed,
        rank,
    )
    books = []
    for level, sample in zip(levels, samples):
        if sample.rows is None:
            raise CodebookError(f"rank {rank} received no training images for the codebook")
        # Equal per-rank counts: every rank contributes the same number of vectors.
        counts = torch.tensor([sample.rows.shape[0]], device=accelerator.device)
        n_rank = int(accelerator.gather(counts).min())
        local = sample.take(min(n_rank, per_rank) if per_rank else n_rank).to(accelerator.device)
        if (
            local.shape[0] * world < cb.size
        ):  # every rank knows the total: all fail with one message
            raise CodebookError(
                f"codebook.size K={cb.size} is larger than the {local.shape[0] * world} teacher feature "
                f"vectors gathered for level {level.teacher_layer}: lower codebook.size or raise "
                "codebook.max_vectors / codebook.max_images"
            )
        pooled = _gather_to_main(local, world)
        centroids = torch.empty(cb.size, local.shape[1], device=accelerator.device)
        result: KMeansResult | None = None
        if accelerator.is_main_process:
            result = fit_kmeans(pooled.cpu(), cb.size, cb.iterations, seed, 0, cb.gpu)
            centroids.copy_(result.centroids)
        if world > 1:
            dist.broadcast(centroids, src=0)
        refine_history: list[float] = []
        if cb.refine_iterations > 0:
            everything = sample.rows.to(accelerator.device)
            centroids, refine_history = lloyd_refine(everything, centroids, cb.refine_iterations)
        # Every rank must now hold the same words: compare fingerprints rather than trust it.
        fingerprint = centroids.double().sum(1)
        if world > 1 and not (accelerator.gather(fingerprint[None]) == fingerprint).all():
            raise CodebookError("ranks disagree on the codebook after the broadcast")
        meta = {
            **expected_meta(recipe, level),
            "ranks_checked_identical": world,
            "beta": level.beta,
            "seed": seed,
            "iterations": cb.iterations,
            "vectors_seen": int(
                accelerator.reduce(torch.tensor([sample.seen], device=accelerator.device), "sum")
            ),
            "vectors_used": result.vectors_used if result else None,
            "objective": result.objective if result else None,
            "refine_objective": refine_history,
            "cluster_sizes": result.cluster_sizes.tolist() if result else None,
            "backend": result.backend if result else None,
            "faiss": _faiss_version(),
            "world_size": world,
            "seconds": round(time.time() - t0, 2),
        }
        if accelerator.is_main_process:
            save_codebook(level.codebook, centroids, meta)
        accelerator.wait_for_everyone()
        books.append(Codebook(centroids.float(), meta))
    return books


def _faiss_version() -> str | None:
    try:
        import faiss

        return faiss.__version__
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> list[Codebook]:
    from .train import build_teacher, ensure_codebooks, setup

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit("usage: python -m quest.codebook RECIPE [section.key=value ...]")
    recipe, accelerator, loaders = setup(argv[0], argv[1:])
    teacher = build_teacher(recipe, loaders, accelerator.device)
    books = ensure_codebooks(recipe, teacher, accelerator, rebuild=True)
    if accelerator.is_main_process:
        for level, book in zip(recipe.quest_levels(), books):
            print(
                f"codebook {level.codebook}: K={book.centroids.shape[0]} dims={book.centroids.shape[1]} "
                f"vectors={book.meta['vectors_used']} objective={book.meta['objective'][-1]:.4g} "
                f"in {book.meta['seconds']} s"
            )
    return books


if __name__ == "__main__":
    from .train import cli

    cli(main)
