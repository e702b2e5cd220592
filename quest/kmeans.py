"""k-means for the codebook: faiss on one process, optional distributed Lloyd refinement.

Plain Euclidean k-means on raw vectors: no normalisation, no PCA, not spherical (docs/method.md §1).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # K×D float32
    objective: list[float]  # sum of squared distances after each iteration
    cluster_sizes: torch.Tensor  # K int64: vectors of x nearest to each centroid (all of x)
    vectors_used: int
    backend: str  # "faiss-cpu", "faiss-gpu" or "torch"


def import_faiss():
    """faiss is an optional dependency installed as an extra (faiss-cpu and faiss-gpu clobber each other)."""
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "faiss is not installed: `pip install 'quest[cpu]'` (faiss-cpu) or, on a GPU machine, "
            "`pip install 'quest[gpu]'` (faiss-gpu); install only one of the two"
        ) from None
    return faiss


def faiss_has_gpu(faiss) -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def fit_kmeans(
    x: torch.Tensor,
    k: int,
    iterations: int = 20,
    seed: int = 0,
    max_points: int = 0,
    gpu: bool = True,
    verbose: bool = False,
) -> KMeansResult:
    """faiss k-means of the N×D rows of x into k centroids.

    max_points: cluster about this many vectors (ceil(max_points / k) per centroid; faiss subsamples
    with `seed`); 0 = use every vector.
    faiss's own default (256 per centroid) would silently subsample, so it is always set explicitly.
    """
    faiss = import_faiss()
    n, d = x.shape
    if k > n:
        raise ValueError(
            f"codebook.size K={k} is larger than the {n} feature vectors available: lower "
            "codebook.size or give k-means more images (codebook.max_images, codebook.max_vectors)"
        )
    data = x.detach().float().cpu().contiguous().numpy()
    per_centroid = math.ceil(max_points / k) if max_points else math.ceil(n / k) + 1
    use_gpu = gpu and faiss_has_gpu(faiss)
    km = faiss.Kmeans(
        d,
        k,
        niter=iterations,
        seed=seed,
        max_points_per_centroid=per_centroid,
        gpu=use_gpu,
        verbose=verbose,
    )
    # Launchers set OMP_NUM_THREADS=1 per process; k-means runs on one rank and wants every core.
    # faiss and torch can share one OpenMP runtime, so the thread count is restored afterwards:
    # otherwise the training that follows runs on every core beside the other ranks (measured here:
    # 2-3x slower steps for two runs side by side on 2 cores).
    faiss_threads, torch_threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(available_cpus())
    try:
        km.train(data)
        _, assign = km.index.search(data, 1)
    finally:
        faiss.omp_set_num_threads(faiss_threads)
        torch.set_num_threads(torch_threads)
    centroids = torch.from_numpy(km.centroids.copy())
    sizes = torch.bincount(torch.from_numpy(assign[:, 0]).long(), minlength=k)
    return KMeansResult(
        centroids=centroids,
        objective=[float(v) for v in km.obj],
        cluster_sizes=sizes,
        vectors_used=min(n, per_centroid * k),
        backend="faiss-gpu" if use_gpu else "faiss-cpu",
    )


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def assign_chunked(
    x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row of x (N×D) and its squared distance, in chunks of rows."""
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dmin = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    c = centroids.float()
    c_sq = c.square().sum(1)
    for s in range(0, x.shape[0], chunk):
        xc = x[s : s + chunk].float()
        # ||x||² does not change the argmin: add it to the minimum only (one N×K pass saved).
        dmin[s : s + chunk], idx[s : s + chunk] = torch.addmm(c_sq, xc, c.T, alpha=-2.0).min(1)
        dmin[s : s + chunk] += xc.square().sum(1)
    return idx, dmin.clamp_min_(0)


def lloyd_refine(
    local: torch.Tensor, centroids: torch.Tensor, iterations: int, chunk: int = 65536
) -> tuple[torch.Tensor, list[float]]:
    """Lloyd iterations over vectors spread across ranks (each rank passes its own N_r×D rows).

    One pass per iteration: every rank assigns its rows chunk by chunk and accumulates per-centroid
    sums (float64) and counts; those and the objective are all-reduced, so the result equals Lloyd on
    the pooled vectors. An empty centroid keeps its position. Returns the centroids with the lowest
    objective seen (the seed included, so never worse than its seed) and the objective of the seed
    followed by one per iteration.
    """
    c = centroids.float().to(local.device).clone()
    k, d = c.shape
    history: list[float] = []
    best, best_obj = c.clone(), math.inf
    for it in range(iterations + 1):
        sums = torch.zeros(k, d, dtype=torch.float64, device=local.device)
        counts = torch.zeros(k, dtype=torch.float64, device=local.device)
        obj = torch.zeros(1, dtype=torch.float64, device=local.device)
        for s in range(0, local.shape[0], chunk):
            xc = local[s : s + chunk].float()
            idx, dmin = assign_chunked(xc, c, chunk)
            obj += dmin.sum(dtype=torch.float64)
            sums.index_add_(0, idx, xc.double())
            counts += torch.bincount(idx, minlength=k)
        history.append(float(_all_reduce(obj)))
        if history[-1] < best_obj:
            best, best_obj = c.clone(), history[-1]
        if it == iterations:
            break
        _all_reduce(sums)
        _all_reduce(counts)
        nonempty = counts > 0
        c[nonempty] = (sums[nonempty] / counts[nonempty, None]).float()
    return best, history
