"""Two processes on CPU (gloo): the pipeline under `accelerate launch` (from arrays and from shards),
exact evaluation across ranks, and the distributed Lloyd refinement of the codebook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import chained, synthetic_shards, tiny

from quest import evaluate
from quest.codebook import load_codebook
from quest.kmeans import lloyd_refine

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def launch(module: str, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    return launch_script("-m", module, *args, processes=processes)


def launch_script(*args, processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        *map(str, args),
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return out


def test_two_processes_train_quest_and_evaluate_every_sample_once(tmp_path, trained_teacher):
    recipe = tiny(
        tmp_path, "ddp", method="quest", teacher=trained_teacher, optim__epochs=2, run__cpu=True
    )
    out = launch("quest.train", str(recipe))
    # Two-process gloo runs can abort at interpreter exit after finishing: judge by the artifacts.
    summary_file = tmp_path / "ddp" / "summary.json"
    assert summary_file.exists(), out.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    assert summary["world_size"] == 2
    assert summary["eval_count"] == 64  # the synthetic test split, each image counted exactly once
    assert summary["steps"] == 2 * (256 // 32)  # batch_size is global: 16 per rank
    assert summary["top1"] > 50
    book = load_codebook(tmp_path / "codebook.pt")
    assert book.meta["world_size"] == 2 and book.meta["ranks_checked_identical"] == 2

    # The same student evaluated by two processes and by one gives the same numbers.
    two = launch("quest.evaluate", str(recipe))
    line = [x for x in two.stdout.splitlines() if x.startswith("{")]
    assert line, two.stderr[-3000:]
    result_two = json.loads(line[-1])
    result_one = evaluate.main([str(recipe)])
    assert result_two["count"] == result_one["count"] == 64
    assert result_two["top1"] == pytest.approx(result_one["top1"])
    assert result_two["loss"] == pytest.approx(result_one["loss"], rel=1e-5)


def test_two_processes_train_the_teacher_first_with_cpu_given_as_an_override(tmp_path):
    """The README's `accelerate launch --multi_gpu --num_processes 2 ... run.cpu=true` on a recipe
    whose teacher is trained first: the override reaches the teacher run too."""
    recipe = chained(tmp_path)
    out = launch("quest.train", str(recipe), "run.cpu=true")
    assert (tmp_path / "s" / "summary.json").exists(), out.stderr[-3000:]
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["world_size"] == 2


def test_two_processes_two_workers_each_stream_shards(tmp_path, trained_teacher):
    """QuEST from WebDataset shards under `accelerate launch`, 2 ranks × 2 loader workers: the
    codebook pass sees every training image once, both ranks take the same number of steps (unequal
    counts would hang DDP), and evaluation counts every validation image once."""
    patterns = synthetic_shards(tmp_path, shard_size=48, val_shard_size=24)
    recipe = tiny(
        tmp_path,
        "wds",
        method="quest",
        teacher=trained_teacher,
        optim__epochs=2,
        run__cpu=True,
        data__dataset="wds",
        data__train_shards=patterns["train_shards"],
        data__val_shards=patterns["val_shards"],
        data__num_workers=2,
        data__transforms="cifar",
    )
    out = launch("quest.train", str(recipe))
    summary_file = tmp_path / "wds" / "summary.json"
    assert summary_file.exists(), out.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    assert summary["world_size"] == 2
    assert summary["eval_count"] == 64
    assert summary["steps"] == 2 * (256 // 32)
    assert summary["top1"] > 50
    book = load_codebook(tmp_path / "codebook.pt")
    assert book.meta["world_size"] == 2
    assert book.meta["vectors_seen"] == 256 * 4 * 4  # resnet8 layer3 at 16 px: 4 × 4 per image


def _lloyd_rank(
    rank: int, world: int, port: int, x: torch.Tensor, seed: torch.Tensor, iters: int, out
):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    local = x[rank::world]  # each rank holds a different part of the vectors
    centroids, history = lloyd_refine(local, seed, iters, chunk=37)
    if rank == 0:
        out.put((centroids, history))
    dist.barrier()
    dist.destroy_process_group()


def test_distributed_lloyd_equals_pooled_lloyd(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g) + torch.randint(0, 4, (600, 1), generator=g) * 3.0
    seed = x[torch.randperm(600, generator=g)[:6]].clone()
    pooled, pooled_history = lloyd_refine(x, seed, 4)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_lloyd_rank, args=(r, 2, port, x, seed, 4, queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    centroids, history = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    torch.testing.assert_close(centroids, pooled, rtol=1e-5, atol=1e-5)
    assert history == pytest.approx(pooled_history, rel=1e-6)
    assert min(history) <= history[0]  # never worse than its seed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_net() -> torch.nn.Module:
    """No batch statistics: a rank's gradient depends on its own samples only."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )


def _accum_rank(rank: int, world: int, port: int, images, labels, accum: int, out) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        ACCELERATE_USE_CPU="1",
    )
    from accelerate import Accelerator

    from quest import recipe, train
    from quest.distiller import Distiller
    from quest.student import Student

    accelerator = Accelerator(cpu=True)
    student = Student(_tiny_net(), [], [])
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)  # the step is minus the gradient
    student, optimizer = accelerator.prepare(student, optimizer)
    per_rank = images.shape[0] // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    distiller = Distiller(None, [], [], recipe.Distill(method="none"))
    batch = (images[mine], labels[mine])
    train.train_step(student, distiller, optimizer, accelerator, batch, train.Step(accum))
    flat = torch.cat([p.detach().flatten() for p in student.parameters()])
    gathered = accelerator.gather(flat[None])  # every rank's parameters, bit for bit
    if rank == 0:
        out.put(gathered)
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_grad_accum_over_two_ranks_keeps_them_identical_and_equals_one_big_step():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_accum_rank, args=(r, 2, port, images, labels, 2, queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    gathered = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert torch.equal(gathered[0], gathered[1]), "the ranks' weights differ"
    # The same optimizer step in one process, one micro-batch, over the whole global batch.
    net = _tiny_net()
    torch.nn.functional.cross_entropy(net(images), labels).backward()
    expected = torch.cat([(p - p.grad).detach().flatten() for p in net.parameters()])
    torch.testing.assert_close(gathered[0], expected, rtol=1e-5, atol=1e-6)


HANGING_RANK = """
import sys, time
from quest import train

original = train.lr_at

def lr_at(step, *args):
    if step == 3 and train.distributed.dist.get_rank() == 1:
        time.sleep(90)  # a stuck rank: rank 0 waits for it in the gradient all-reduce
    return original(step, *args)

train.lr_at = lr_at
train.cli(train.main)
"""


def test_a_stuck_rank_ends_the_job_with_the_stage_named(tmp_path):
    recipe = tiny(tmp_path, "hang", optim__epochs=1, run__cpu=True, run__timeout_minutes=0.1)
    script = tmp_path / "hang.py"
    script.write_text(HANGING_RANK)
    t0 = time.time()
    out = launch_script(script, str(recipe))
    assert out.returncode != 0
    assert time.time() - t0 < 80, "the job waited for the stuck rank"
    assert "rank 0 waited more than run.timeout_minutes = 0.1" in out.stderr, out.stderr[-3000:]
    assert "during training step 4" in out.stderr
