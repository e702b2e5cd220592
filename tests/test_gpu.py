"""GPU readiness: a bf16 train step, faiss-gpu k-means, uint8 batches normalised on the GPU, and one
epoch under `accelerate launch` on the GPU. Marked `gpu` and skipped without CUDA (CI runs on CPU);
`bash tools/gpu_check.sh` runs them on a GPU machine with QUEST_GPU_CHECK=1, where a missing piece
(faiss without GPU support) fails instead of skipping. The last test runs everywhere: it checks that
script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import synthetic_shards, tiny

from quest import build, train
from quest import recipe as recipes
from quest.codebook import Codebook, load_codebook
from quest.data import transforms
from quest.distiller import Distiller
from quest.kmeans import faiss_has_gpu, fit_kmeans
from quest.models import build_model
from quest.recipe import Data
from quest.shards import Batcher, build_wds_loaders
from quest.student import FrozenTeacher, probe_input

REPO = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO / "tools" / "gpu_check.sh"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def unavailable(reason: str) -> None:
    """Skip, or fail when tools/gpu_check.sh runs the tests (there a missing piece is the finding)."""
    if os.environ.get("QUEST_GPU_CHECK") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


# ------------------------------------------------------------------------ (1) a bf16 train step


def bf16_step(tmp_path: Path, device: str) -> None:
    """quest.train.train_step on a tiny QuEST student (resnet8, one level, 16 random words) under
    Accelerator(mixed_precision="bf16"), built with the trainer's own builders (quest.build) as
    tools/bench_step.py builds it."""
    from accelerate import Accelerator

    recipe = recipes.load(
        tiny(tmp_path, "step", method="quest", teacher=tmp_path / "unused.pt", run__cpu=False)
    )
    accelerator = Accelerator(mixed_precision="bf16", cpu=device == "cpu")
    assert accelerator.device.type == device
    shape = build.InputShape(num_classes=4, in_channels=3, image_size=16)
    torch.manual_seed(0)
    levels = build.quest_levels(recipe)
    layers, pools = build.teacher_layers(levels)
    teacher = FrozenTeacher(build_model("resnet8", 4, 3), layers, pools, probe_input(3, 16))
    teacher.model.to(accelerator.device)
    shapes = teacher.map_shapes(3, 16)
    books = [Codebook(torch.randn(16, s[0]), {}).to(accelerator.device) for s in shapes]
    student = build.build_student(recipe.student, recipe.distill, levels, shape, books, shapes)
    student = student.to(accelerator.device)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    student, optimizer = accelerator.prepare(student, optimizer)
    distiller = Distiller(teacher, books, levels, recipe.distill, accelerator.autocast)
    seen = []  # the head's output dtype (the prepared model returns its outputs as float32)
    accelerator.unwrap_model(student).heads[0].register_forward_hook(
        lambda m, i, out: seen.append(out.dtype)
    )
    before = {k: p.detach().clone() for k, p in student.named_parameters()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 16, 16, generator=g).to(accelerator.device)
    y = torch.randint(0, 4, (32,), generator=g).to(accelerator.device)

    loss, parts, grad_norm = train.train_step(
        student, distiller, optimizer, accelerator, (x, y), train.Step()
    )

    assert loss.device.type == device
    assert torch.isfinite(loss) and torch.isfinite(grad_norm) and grad_norm > 0
    assert {"ce", "quest", "loss"} <= parts.keys()
    assert all(torch.isfinite(v) for v in parts.values())
    assert seen == [torch.bfloat16]  # the student ran under bf16 autocast
    diagnostics = distiller.diagnostics(accelerator.unwrap_model(student).heads)
    assert {"agreement", "perplexity", "gamma"} <= diagnostics.keys()
    assert all(torch.isfinite(v) for v in diagnostics.values())
    after = dict(student.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    changed = {k for k, p in after.items() if not torch.equal(p.detach(), before[k])}
    head = {k for k in after if k.startswith("heads.")}
    assert head and head <= changed, f"head parameters not updated: {head - changed}"
    assert any(k.startswith("backbone.") for k in changed)


@pytest.mark.gpu
@needs_cuda
def test_bf16_train_step_on_cuda_is_finite_and_updates_the_weights(tmp_path):
    if not torch.cuda.is_bf16_supported():
        unavailable("this CUDA device has no bf16")
    bf16_step(tmp_path, "cuda")


# ---------------------------------------------------------------------- (2) faiss-gpu k-means


def blobs(k: int = 8, d: int = 16, per: int = 500, seed: int = 0) -> torch.Tensor:
    """k tight clusters far apart: one right answer, so backends can only differ by labels."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 10
    return (centers.repeat_interleave(per, 0) + 0.1 * torch.randn(k * per, d, generator=g))[
        torch.randperm(k * per, generator=g)
    ]


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> list[int]:
    return torch.cdist(x, centroids).argmin(1).tolist()


def same_partition(a: list[int], b: list[int]) -> dict[int, int]:
    """The label map a -> b when a and b split the points the same way up to relabelling."""
    pairs = set(zip(a, b))
    assert len(pairs) == len(set(a)) == len(set(b)), "the two partitions differ"
    return dict(pairs)


def compare_kmeans(gpu: bool) -> None:
    x, k = blobs(), 8
    cpu = fit_kmeans(x, k, iterations=20, seed=0, gpu=False)
    other = fit_kmeans(x, k, iterations=20, seed=0, gpu=gpu)
    assert cpu.backend == "faiss-cpu"
    assert other.backend == ("faiss-gpu" if gpu else "faiss-cpu")
    relabel = same_partition(nearest(x, cpu.centroids), nearest(x, other.centroids))
    assert sorted(cpu.cluster_sizes.tolist()) == sorted(other.cluster_sizes.tolist())
    order = [relabel[i] for i in range(k)]
    torch.testing.assert_close(other.centroids[order], cpu.centroids, rtol=0, atol=1e-3)
    assert other.objective[-1] == pytest.approx(cpu.objective[-1], rel=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_faiss_gpu_kmeans_agrees_with_cpu():
    try:
        import faiss
    except ImportError:
        unavailable("faiss is not installed (pip install -e '.[gpu]')")
    if not faiss_has_gpu(faiss):
        unavailable("faiss has no GPU support here (faiss-cpu installed instead of faiss-gpu?)")
    compare_kmeans(gpu=True)


# -------------------------------------------------------- (3) uint8 batches normalised on the GPU


def normalise_on(device: str) -> None:
    """The deferred path for a CUDA training device: workers ship uint8 batches, `ToModelInput`
    finishes them on `device`; the result equals the CPU one and the v2 pipeline."""
    transform = transforms(Data(transforms="imagenet", image_size=16), False)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 20, 24), generator=g, dtype=torch.uint8) for _ in range(6)]
    expected = torch.stack([transform(x) for x in images])
    batcher = Batcher(transform, defer=True)
    raw, labels = batcher.batch([(batcher.image(x), i) for i, x in enumerate(images)])
    assert raw.dtype == torch.uint8
    on_cpu, _ = batcher.to_model_input("cpu")((raw, labels))
    pinned = raw.pin_memory() if device == "cuda" else raw
    on_device, same_labels = batcher.to_model_input(device)((pinned, labels))
    assert on_device.device.type == device and on_device.dtype == torch.float32
    assert torch.equal(same_labels, labels)
    torch.testing.assert_close(on_device.cpu(), on_cpu, rtol=0, atol=1e-6)
    torch.testing.assert_close(on_cpu, expected, rtol=0, atol=2e-6)


def wds_batches_on(tmp_path: Path, device: str) -> None:
    """Shard batches for a training device arrive there, normalised, equal to the CPU loader's."""
    patterns = synthetic_shards(tmp_path, shard_size=64, val_shard_size=32)
    cfg = Data(
        dataset="wds", batch_size=32, num_workers=0, transforms="cifar", image_size=16, **patterns
    )
    on_cpu = build_wds_loaders(cfg, seed=0, rank=0, world=1, pin=False)
    on_device = build_wds_loaders(cfg, seed=0, rank=0, world=1, pin=device == "cuda", device=device)
    pairs = list(zip(on_cpu.eval, on_device.eval, strict=True))
    assert sum(len(y) for (_, y), _ in pairs) == 64  # every validation image, once
    for (x_cpu, y_cpu), (x_dev, y_dev) in pairs:
        assert x_dev.device.type == device and x_dev.dtype == torch.float32
        assert torch.equal(y_dev.cpu(), y_cpu)
        torch.testing.assert_close(x_dev.cpu(), x_cpu, rtol=0, atol=2e-6)
    x, _ = next(iter(on_device.train))
    assert x.device.type == device and x.dtype == torch.float32 and x.shape == (32, 3, 16, 16)


@pytest.mark.gpu
@needs_cuda
def test_uint8_batches_normalised_on_cuda_equal_the_cpu_ones():
    normalise_on("cuda")


@pytest.mark.gpu
@needs_cuda
def test_shard_batches_arrive_on_cuda_normalised(tmp_path):
    wds_batches_on(tmp_path, "cuda")


# ----------------------------------------------------- (4) one epoch under `accelerate launch`


def launch_one_process(*args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` with one process on the default device (here: the GPU)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "bf16", "--dynamo_backend", "no",
        *args,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["WANDB_MODE"] = "disabled"
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.slow
def test_one_quest_epoch_under_accelerate_launch_on_the_gpu(tmp_path, trained_teacher):
    recipe = tiny(
        tmp_path,
        "gpu",
        method="quest",
        teacher=trained_teacher,
        optim__epochs=1,
        run__precision="bf16",
    )
    out = launch_one_process("-m", "quest.train", str(recipe), "run.cpu=false")
    run_dir = tmp_path / "gpu"
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 1
    assert summary["steps"] == 256 // 32
    assert summary["eval_count"] == 64
    assert 0 <= summary["top1"] <= 100
    assert "final_agreement" in summary and "final_perplexity" in summary
    env = json.loads((run_dir / "env.json").read_text())
    assert env["precision"] == "bf16"
    assert (run_dir / "curves.png").exists() and (run_dir / "student.pt").exists()
    book = load_codebook(tmp_path / "codebook.pt")
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None and faiss_has_gpu(faiss):
        assert book.meta["backend"] == "faiss-gpu"


# ------------------------------------------------------------- tools/gpu_check.sh (CPU, always)


def test_gpu_check_script_parses_and_runs_the_three_stages():
    out = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = GPU_CHECK.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    for stage in (
        "pip install -e '.[gpu,test]'",
        "python -m pytest -q -m gpu tests/test_gpu.py",
        "python tools/bench_step.py recipes/imagenet_rn34_rn18.toml run.precision=bf16",
    ):
        assert stage in text, f"tools/gpu_check.sh does not run `{stage}`"
    assert (REPO / "recipes" / "imagenet_rn34_rn18.toml").is_file()
