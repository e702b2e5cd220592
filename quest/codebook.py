"""The codebook stage: teacher features → k-means visual words → a versioned artifact.

`python -m quest.codebook RECIPE [section.key=value ...]` (or `accelerate launch -m quest.codebook`):
builds the codebooks the recipe lacks; an existing artifact is validated against the recipe and reused,
never overwritten (delete it to rebuild it). Every rank passes its part of the training set (evaluation
transforms) through the teacher and keeps its vectors (or a uniform random sample of its share of
codebook.max_vectors); rank 0 gathers every rank's part, runs faiss k-means (GPU when present), and the
centroids are broadcast so every rank holds the same codebook. Optionally, distributed Lloyd iterations
over every vector refine the faiss result.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import artifacts, distributed
from . import recipe as recipes
from .build import build_teacher, cli, input_shape, lazy_feature_loader, quest_levels, setup
from .errors import QuestError
from .kmeans import KMeansResult, fit_kmeans, lloyd_refine
from .losses import flatten_locations
from .vectors import VectorSample, gather_sizes, gather_to_main

FORMAT = "quest-codebook/2"  # /2: a content hash of the centroids and the features' precision
# Fields that must agree between an existing artifact and the recipe that wants to reuse it.
MATCH_FIELDS = (
    "teacher_arch",
    "teacher_weights",
    "layer",
    "pool",
    "size",
    "seed",
    "feature_precision",
)
# The precision autocast computes the teacher's features in, by accelerate's mixed_precision name.
FEATURE_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


class CodebookError(QuestError, ValueError):
    """A codebook artifact that is missing, corrupt or made for another teacher/layer."""


@dataclass
class Codebook:
    centroids: torch.Tensor  # K×C float32
    meta: dict
    digest: str = ""  # centroids_sha256(centroids); computed when not given

    def __post_init__(self):
        self.sq_norms = self.centroids.square().sum(1)  # cached: soft_assign needs them every step
        self.digest = self.digest or centroids_sha256(self.centroids)

    def to(self, device) -> Codebook:
        return Codebook(self.centroids.to(device), self.meta, self.digest)


def centroids_sha256(centroids: torch.Tensor) -> str:
    """The content hash of a codebook: sha256 of its float32, C-contiguous, little-endian bytes."""
    data = centroids.detach().float().cpu().contiguous().numpy().astype("<f4", copy=False)
    return hashlib.sha256(data).hexdigest()


def kmeans_seed(cfg: recipes.Codebook, seed: int) -> int:
    """codebook.seed, or the recipe's `seed` when it is -1."""
    return seed if cfg.seed < 0 else cfg.seed


def expected_meta(
    teacher: recipes.Teacher,
    level: recipes.Level,
    cfg: recipes.Codebook,
    *,
    seed: int,
    mixed_precision: str,
) -> dict:
    """What an artifact for this resolved level must say about itself (MATCH_FIELDS).
    seed: the recipe's (kmeans_seed); mixed_precision: the accelerator's ('no', 'bf16', 'fp16'),
    the teacher features' precision."""
    return {
        "teacher_arch": teacher.arch,
        "teacher_weights": teacher_weights_id(teacher.checkpoint),
        "layer": level.teacher_layer,
        "pool": level.pool,
        "size": cfg.size,
        "seed": kmeans_seed(cfg, seed),
        "feature_precision": FEATURE_PRECISION.get(mixed_precision, mixed_precision),
    }


def teacher_weights_id(checkpoint: str) -> str:
    """A file's content hash, or the torchvision weights name."""
    path = Path(checkpoint)
    return f"sha256:{artifacts.file_sha256(path, 16)}" if path.is_file() else checkpoint


def save_codebook(path: str | Path, centroids: torch.Tensor, meta: dict) -> Path:
    """Write a new artifact; an existing file is never replaced (CodebookError), even one another
    process writes meanwhile."""
    centroids = centroids.float().cpu().contiguous()
    meta = {
        "format": FORMAT,
        **meta,
        "centroids_sha256": centroids_sha256(centroids),
        **artifacts.provenance(),
    }
    try:
        return artifacts.save_torch({"centroids": centroids, "meta": meta}, path, overwrite=False)
    except FileExistsError:
        raise CodebookError(
            f"{path} exists (perhaps written by another process meanwhile) and a codebook is never "
            "overwritten: use it, or delete it to rebuild it"
        ) from None


def load_codebook(
    path: str | Path, expect: dict | None = None, channels: int | None = None
) -> Codebook:
    """Load and validate an artifact; `expect` fields (MATCH_FIELDS) must equal the artifact's."""
    path = Path(path)
    rebuild = "delete it and rebuild it (`python -m quest.codebook RECIPE`)"
    if not path.is_file():
        raise CodebookError(f"codebook not found: {path} (run `python -m quest.codebook RECIPE`)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        centroids, meta = obj["centroids"], obj["meta"]
        if not torch.is_tensor(centroids) or not isinstance(meta, dict):
            raise TypeError("expected a tensor 'centroids' and a dict 'meta'")
    except Exception as err:
        # torch's own message advises weights_only=False: never repeat that for a file of unknown origin
        raise CodebookError(
            f"{path} is not a readable quest codebook ({type(err).__name__}): a damaged file or "
            "another format; quest loads tensors only and never unpickles arbitrary objects"
        ) from None
    if meta.get("format") == "quest-codebook/1":
        raise CodebookError(
            f"{path} is a quest-codebook/1 artifact, written before codebooks carried a content hash "
            f"of their centroids and the precision of their features: {rebuild}"
        )
    if meta.get("format") != FORMAT:
        raise CodebookError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    digest = centroids_sha256(centroids)
    if meta.get("centroids_sha256") != digest:
        raise CodebookError(
            f"{path}: the centroids do not match the content hash written with them: the file is "
            f"corrupt or altered; {rebuild}"
        )
    if (
        centroids.ndim != 2
        or centroids.shape[0] != meta.get("size")
        or not torch.isfinite(centroids).all()
    ):
        raise CodebookError(
            f"{path}: centroids {tuple(centroids.shape)} are malformed or not finite"
        )
    for key, value in (expect or {}).items():
        have = meta.get(key)
        # Words from fp32 features serve a run at any precision; bf16/fp16 ones only their own.
        if have != value and not (key == "feature_precision" and have == "fp32"):
            raise CodebookError(_mismatch(path, key, have, value))
    if channels is not None and centroids.shape[1] != channels:
        raise CodebookError(
            f"{path}: codewords have {centroids.shape[1]} dims but the teacher map has {channels} channels"
        )
    return Codebook(centroids.float(), meta, digest)


def _mismatch(path: Path, key: str, have, want) -> str:
    """Why an artifact does not fit the recipe, and the ways out."""
    if key == "feature_precision":
        setting = {v: k for k, v in FEATURE_PRECISION.items()}.get(have, have)
        return (
            f"{path} was built from {have} teacher features, but this run computes {want} ones: "
            f"set run.precision = '{setting}', or delete the file to rebuild it (a codebook from fp32 "
            "features serves every precision)"
        )
    reuse = f"set codebook.seed = {have!r} to reuse it, " if key == "seed" else ""
    where = " (codebook.seed; -1 = the recipe's seed)" if key == "seed" else ""
    return (
        f"{path} was built for {key} = {have!r}, but the recipe has {want!r}{where}: {reuse}"
        "point codebook.path elsewhere or delete the file to rebuild it"
    )


@torch.no_grad()
def extract_samples(
    teacher, loader, levels: list[int], capacity: int, device, autocast, seed: int, rank: int
) -> list[VectorSample]:
    """One pass of the teacher over this rank's images; a sample of vectors for each of `levels`
    (indices of the teacher's maps)."""
    samples = [
        VectorSample(capacity, torch.Generator().manual_seed(seed * 1000 + rank)) for _ in levels
    ]
    for images, _ in tqdm(
        loader, desc="teacher features", disable=rank != 0 or not sys.stderr.isatty(), leave=False
    ):
        with autocast():
            _, maps = teacher(images.to(device, non_blocking=True))
        for sample, i in zip(samples, levels):
            sample.add(flatten_locations(maps[i]))
    return samples


def build_codebooks(
    cb: recipes.Codebook,
    levels: list[recipes.Level],
    teacher,
    accelerator,
    loader,
    which: list[int] | None = None,
    *,
    teacher_cfg: recipes.Teacher,
    seed: int,
) -> list[Codebook]:
    """Fit the codebooks of the QuEST `levels` (layers resolved) numbered `which` (default all) from
    one pass of the teacher and write their artifacts (rank 0; an existing file is never replaced).
    teacher_cfg: the [teacher] section the artifacts record; seed: the recipe's (kmeans_seed)."""
    which = list(range(len(levels))) if which is None else which
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    k_seed = kmeans_seed(cb, seed)
    # A cap gives every rank an equal share, ceil(max_vectors / world), and rank 0 clusters the
    # first max_vectors of the pooled shares (a uniform sample within each rank; the ranks' parts
    # of the data are equal up to a few images). Refinement needs every local vector.
    per_rank = -(-cb.max_vectors // world) if cb.max_vectors else 0
    capacity = 0 if cb.refine_iterations > 0 else per_rank
    t0 = time.time()
    samples = extract_samples(
        teacher, loader, which, capacity, device, accelerator.autocast, k_seed, rank
    )
    books = []
    for i, sample in zip(which, samples):
        level = levels[i]
        # In random-key order: the rows past a cap are a random subset, and k-means gets them shuffled.
        local = sample.take(per_rank or sample.seen) if sample.seen else None
        sizes = gather_sizes(0 if local is None else local.shape[0], world, device)
        if 0 in sizes:  # every rank knows the sizes: all fail with one message
            raise CodebookError(
                f"rank {sizes.index(0)} received no training images for the codebook"
            )
        total = min(sum(sizes), cb.max_vectors or sum(sizes))
        if total < cb.size:
            raise CodebookError(
                f"codebook.size K={cb.size} is larger than the {total} teacher feature vectors "
                f"gathered for level {level.teacher_layer}: lower codebook.size or raise "
                "codebook.max_vectors / codebook.max_images"
            )
        centroids = torch.empty(cb.size, local.shape[1], device=device)
        pooled = gather_to_main(local.to(device), sizes)
        del local  # a copy: refinement below needs the memory for every local vector
        result: KMeansResult | None = None
        if accelerator.is_main_process:
            result = fit_kmeans(pooled[:total].cpu(), cb.size, cb.iterations, k_seed, 0, cb.gpu)
            centroids.copy_(result.centroids)
        del pooled
        distributed.wait_for_main()  # k-means may take hours: the long limit, not run.timeout_minutes
        if world > 1:
            dist.broadcast(centroids, src=0)
        refine_history: list[float] = []
        if cb.refine_iterations > 0:
            everything = sample.rows.to(device)
            centroids, refine_history = lloyd_refine(everything, centroids, cb.refine_iterations)
        # Every rank must now hold the same words: compare fingerprints rather than trust it.
        fingerprint = centroids.double().sum(1)
        if world > 1 and not (accelerator.gather(fingerprint[None]) == fingerprint).all():
            raise CodebookError("ranks disagree on the codebook after the broadcast")
        meta = {
            **expected_meta(
                teacher_cfg, level, cb, seed=seed, mixed_precision=accelerator.mixed_precision
            ),
            "ranks_checked_identical": world,
            "beta": level.beta,
            "iterations": cb.iterations,
            "vectors_seen": int(
                accelerator.reduce(torch.tensor([sample.seen], device=device), "sum")
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
        error = None
        if accelerator.is_main_process:
            try:
                save_codebook(level.codebook, centroids, meta)
            except CodebookError as err:
                error = err
        # Every rank learns whether rank 0 wrote the artifact (and waits for it).
        if int(accelerator.reduce(torch.tensor([error is not None], device=device).int(), "sum")):
            raise error or CodebookError(f"rank 0 did not write {level.codebook} (see its error)")
        if accelerator.is_main_process:
            print(
                f"codebook {level.codebook}: {total} vectors x {centroids.shape[1]} dims, "
                f"K = {cb.size} words, {meta['seconds']} s",
                flush=True,
            )
        books.append(Codebook(centroids.float(), meta))
    return books


def ensure_codebooks(
    cfg: recipes.Codebook,
    levels: list[recipes.Level],
    teacher,
    accelerator,
    *,
    teacher_cfg: recipes.Teacher,
    seed: int,
    features: Callable[[], Iterable],
) -> list[Codebook]:
    """Each resolved level's codebook: an existing artifact is loaded and must match (teacher, layer,
    pool, K, seed, feature precision); only the missing ones are built, in one teacher pass over
    `features()` (called only then: this rank's feature loader). An artifact is never rebuilt or
    overwritten: to rebuild one, delete it. seed: the recipe's (kmeans_seed)."""

    def expect(level: recipes.Level) -> dict:
        return expected_meta(
            teacher_cfg, level, cfg, seed=seed, mixed_precision=accelerator.mixed_precision
        )

    # Existing artifacts are validated first: a mismatch fails before any teacher pass.
    books = [
        load_codebook(lv.codebook, expect(lv)) if Path(lv.codebook).is_file() else None
        for lv in levels
    ]
    missing = [i for i, book in enumerate(books) if book is None]
    if not missing:
        return books
    if not cfg.build:
        raise CodebookError(
            f"codebook.build = false and {[levels[i].codebook for i in missing]} do not exist: "
            "build them first with `python -m quest.codebook` on the recipe that defines them (the "
            "recipe header says which)"
        )
    built = build_codebooks(
        cfg, levels, teacher, accelerator, features(), missing, teacher_cfg=teacher_cfg, seed=seed
    )
    for i, book in zip(missing, built):
        books[i] = book
    return books


def recipe_codebooks(
    recipe: recipes.Recipe, levels: list[recipes.Level], teacher, accelerator
) -> list[Codebook]:
    """`ensure_codebooks` with a recipe's sections: the one call of the entry points (quest.train,
    quest.codebook); the features are this rank's share of the training data."""
    return ensure_codebooks(
        recipe.codebook,
        levels,
        teacher,
        accelerator,
        teacher_cfg=recipe.teacher,
        seed=recipe.seed,
        features=lazy_feature_loader(
            recipe.data, accelerator, seed=recipe.seed, max_images=recipe.codebook.max_images
        ),
    )


def _faiss_version() -> str | None:
    try:
        import faiss

        return faiss.__version__
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> list[Codebook]:

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit("usage: python -m quest.codebook RECIPE [section.key=value ...]")
    recipe, accelerator, loaders = setup(argv[0], argv[1:])
    with distributed.bounded(recipe.run.timeout_minutes, accelerator.process_index):
        distributed.stage("the codebook stage")
        levels = quest_levels(recipe)
        teacher = build_teacher(recipe.teacher, levels, input_shape(loaders), accelerator.device)
        existed = [Path(level.codebook).is_file() for level in levels]
        books = recipe_codebooks(recipe, levels, teacher, accelerator)
    if accelerator.is_main_process:
        for level, book, reused in zip(levels, books, existed):
            how = "reused (it exists and matches this recipe)" if reused else "built"
            print(
                f"codebook {level.codebook} {how}: K={book.centroids.shape[0]} "
                f"dims={book.centroids.shape[1]} vectors={book.meta['vectors_used']} "
                f"objective={book.meta['objective'][-1]:.4g} in {book.meta['seconds']} s"
            )
    return books


if __name__ == "__main__":
    cli(main)
