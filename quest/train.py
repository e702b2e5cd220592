"""Train a student: plain supervised ("none"), Hinton KD, QuEST, or QuEST + KD.

    python -m quest.train RECIPE [section.key=value ...]
    accelerate launch [--multi_gpu --num_processes N] -m quest.train RECIPE [...]

`main` is the command: it checks the recipe, trains the teacher first when teacher.recipe says so,
then calls `train`: builders and checks (`prepare`), then one loop, top to bottom. Only the student
(backbone + classifier + codeword heads) and the optimizer go through `accelerator.prepare`; the
teacher and codebooks are frozen inputs of the Distiller. The LR is a pure function of the step.
A run directory that holds a complete checkpoint of the same run resumes from it; a STOP file in
the run directory makes every rank save a checkpoint and exit 0.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from . import artifacts, checkpoint, distributed, metrics, report
from . import recipe as recipes
from .build import (
    build_optimizer,
    build_student,
    build_teacher,
    check_models,
    cli,
    input_shape,
    quest_levels,
    setup,
)
from .codebook import recipe_codebooks, teacher_weights_id
from .data import Loaders, eval_batch
from .distiller import Distiller
from .errors import TrainingError
from .evaluate import check_teacher, evaluate, evaluate_student
from .metrics import MetricLogger, reduce_mean
from .recipe import Optim, Recipe

STOP_FILE = "STOP"


def lr_at(step: int, optim: Optim, steps_per_epoch: int, base_lr: float) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up, then step/cosine/constant."""
    epoch = step / steps_per_epoch
    if optim.warmup > 0 and epoch < optim.warmup:
        return base_lr * (step + 1) / (optim.warmup * steps_per_epoch)
    if optim.schedule == "step":
        return base_lr * optim.decay ** sum(epoch >= m for m in optim.milestones)
    if optim.schedule == "cosine":
        progress = (epoch - optim.warmup) / max(optim.epochs - optim.warmup, 1e-9)
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return base_lr


@dataclass(frozen=True)
class Step:
    """How one optimizer step runs: micro-batches per step (run.grad_accum) and gradient clipping."""

    micro_batches: int = 1
    clip: float = 0.0  # 0 = no clipping (the norm is still returned)


def train_step(student, distiller: Distiller, optimizer, accelerator, batch, step: Step):
    """One optimizer step over `step.micro_batches` equal micro-batches (gradients synchronised on
    the last one only). Returns the last micro-batch's loss and parts and the gradient norm, on
    device: no host sync here. tools/bench_step.py times exactly this function."""
    images, labels = batch
    n = step.micro_batches
    # split, not chunk: chunk(n) may return fewer than n pieces, and then no micro-batch would sync.
    if images.shape[0] % n:
        raise TrainingError(f"a batch of {images.shape[0]} does not split into {n} micro-batches")
    size = images.shape[0] // n
    for i, (x, y) in enumerate(zip(images.split(size), labels.split(size))):
        with nullcontext() if i == n - 1 else accelerator.no_sync(student):
            loss, parts = distiller(student, x, y)
            accelerator.backward(loss / n)
    grad_norm = accelerator.clip_grad_norm_(student.parameters(), step.clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, parts, grad_norm


# --------------------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return {}
    recipe, accelerator, loaders = setup(argv[0], argv[1:])  # every load-time check first
    levels = quest_levels(recipe) if recipe.uses_quest else []
    check_models(recipe.teacher.arch, recipe.student.arch, levels, input_shape(loaders))
    with distributed.bounded(recipe.run.timeout_minutes, accelerator.process_index):
        if (
            recipe.uses_teacher
            and recipe.teacher.recipe
            and not Path(recipe.teacher.checkpoint).exists()
        ):
            trained = train_teacher(recipe, argv[1:], accelerator)
            recipe = recipes.load(argv[0], [*argv[1:], f"teacher.checkpoint={json.dumps(trained)}"])
        return train(recipe, accelerator, loaders)


# Overrides that reach a teacher trained through teacher.recipe: where and how it runs. The
# student's model, method, schedule and run.dir are its own.
TEACHER_OVERRIDES = (
    "run.cpu",
    "run.precision",
    "run.channels_last",
    "run.compile",
    "run.timeout_minutes",
    "run.wandb",
    "run.wandb_project",
    "data.root",
    "data.num_workers",
)


def train_teacher(recipe: Recipe, overrides: list[str], accelerator) -> str:
    """Train the teacher with teacher.recipe unless its run has finished; returns its student.pt.
    It runs in this process with the student's device and precision (one Accelerate state)."""
    passed = [o for o in overrides if o.split("=", 1)[0].strip() in TEACHER_OVERRIDES]
    passed += [
        f"run.cpu={json.dumps(recipe.run.cpu)}",
        f"run.precision={json.dumps(recipe.run.precision)}",
    ]
    teacher_recipe = recipes.load(recipe.teacher.recipe, passed)
    trained = Path(teacher_recipe.run.dir) / "student.pt"
    if not trained.exists():
        if accelerator.is_main_process:
            print(
                f"teacher {recipe.teacher.checkpoint} missing: training it with "
                f"{recipe.teacher.recipe} -> {trained}",
                flush=True,
            )
        _, _, loaders = setup(recipe.teacher.recipe, passed)
        train(teacher_recipe, accelerator, loaders)
        del loaders
        # Its loader iterators are cyclic garbage now: collect them before this run's loaders
        # fork workers, or a worker's gc collects them and tries to stop workers not its own.
        gc.collect()
    return str(trained)


def prepare(recipe: Recipe, accelerator, loaders: Loaders):
    """Everything before the loop: the identity check against run.dir's checkpoints, teacher and its
    check, codebooks, student and optimizer, the resumed state. Nothing is written to run.dir here."""
    run_dir, device = Path(recipe.run.dir), accelerator.device
    memory = torch.channels_last if recipe.run.channels_last else torch.contiguous_format
    distributed.stage("the checkpoint scan")
    found = checkpoint.candidates(accelerator, run_dir)
    # run.precision 'auto' may resolve differently on another machine: the resolved one counts.
    identity = {
        "recipe": {**checkpoint.math_fields(recipe), "run.precision": accelerator.mixed_precision}
    }
    if recipe.uses_teacher:
        identity["recipe"]["teacher.weights"] = teacher_weights_id(recipe.teacher.checkpoint)
    checkpoint.check_same_run(accelerator, found, identity, run_dir)

    teacher, codebooks, teacher_shapes = None, [], []
    levels = quest_levels(recipe) if recipe.uses_quest else []
    if recipe.uses_teacher:
        distributed.stage("the teacher check")
        teacher = build_teacher(recipe.teacher, levels, input_shape(loaders), device)
        teacher.model.to(memory_format=memory)
        check_teacher(
            recipe.teacher,
            teacher,
            loaders,
            accelerator,
            eval_batch_size=eval_batch(recipe.data),
            channels_last=recipe.run.channels_last,
        )
    if recipe.uses_quest:
        teacher_shapes = teacher.map_shapes(loaders.in_channels, loaders.image_size)
        distributed.stage("the codebook stage")
        books = recipe_codebooks(recipe, levels, teacher, accelerator)
        codebooks = [cb.to(device) for cb in books]
        identity["codebooks"] = {f"level {i} sha256": cb.digest for i, cb in enumerate(codebooks)}
        checkpoint.check_same_run(accelerator, found, identity, run_dir)
    torch.manual_seed(recipe.seed)  # the student's init must not depend on what ran before it
    student = build_student(
        recipe.student, recipe.distill, levels, input_shape(loaders), codebooks, teacher_shapes
    )
    student = student.to(device, memory_format=memory)
    optimizer = build_optimizer(student.parameters(), recipe.optim)
    if recipe.run.compile:
        student = torch.compile(student)
        if teacher is not None:
            teacher.model = torch.compile(teacher.model)
    student, optimizer = accelerator.prepare(student, optimizer)
    distributed.stage("loading the checkpoint")
    resumed = checkpoint.resume(accelerator, found)
    if resumed and accelerator.is_main_process:
        print(f"resumed from {resumed[1]} (step {resumed[0].step}, epoch {resumed[0].epoch})")
    state = resumed[0] if resumed else checkpoint.LoopState()
    distiller = Distiller(teacher, codebooks, levels, recipe.distill, accelerator.autocast)
    return distiller, student, optimizer, state, identity


def open_run_dir(recipe: Recipe, accelerator, loaders: Loaders, step: int) -> MetricLogger:
    """The checks passed: write the run's records and open its metrics (rank 0 writes)."""
    run_dir, logged_until = Path(recipe.run.dir), -1
    if accelerator.is_main_process:
        # Records past the checkpoint are replayed by this attempt: drop them so no step is there twice.
        logged_until = metrics.drop_after(run_dir, step)
        artifacts.save_text(recipes.to_toml(recipe), run_dir / "recipe.toml")
        artifacts.save_json(recipes.to_dict(recipe), run_dir / "recipe.json")
        if loaders.classes is not None:  # label i is classes[i]
            artifacts.save_json(loaders.classes, run_dir / "classes.json")
        env = {"world_size": accelerator.num_processes, "precision": accelerator.mixed_precision}
        artifacts.save_json({**artifacts.provenance(), **env}, run_dir / "env.json")
    return MetricLogger(
        accelerator,
        run_dir,
        recipes.to_dict(recipe),
        recipe.run.wandb,
        recipe.run.wandb_project,
        recipe.name,
        wandb_after=logged_until,
    )


def train(recipe: Recipe, accelerator: Accelerator, loaders: Loaders) -> dict:
    """Train one recipe's student; returns its summary ({} when stopped by a STOP file)."""
    run, o = recipe.run, recipe.optim
    run_dir, device, main_proc = Path(run.dir), accelerator.device, accelerator.is_main_process
    memory = torch.channels_last if run.channels_last else torch.contiguous_format
    distiller, student, optimizer, state, identity = prepare(recipe, accelerator, loaders)
    log = open_run_dir(recipe, accelerator, loaders, state.step)

    spe = loaders.train_batches.batches_per_epoch
    total_steps = min(run.max_steps or o.epochs * spe, o.epochs * spe)
    base_lr = o.lr * recipe.data.batch_size / o.lr_batch if o.lr_batch else o.lr
    step_cfg = Step(run.grad_accum, o.clip_grad)
    sums: dict[str, torch.Tensor] = {}
    bad_step = torch.tensor(-1, device=device)
    t_log, n_log, t_save = time.time(), 0, time.time()
    t_attempt, train_s, skipped_before = time.time(), state.train_s, state.skipped_train_samples
    stopped = state.step >= total_steps  # a finished run re-entered: only its summary is rewritten

    while not stopped:
        epoch = state.epoch
        loaders.train_batches.set_epoch(epoch, state.batch_in_epoch)
        student.train()
        quiet = not (main_proc and sys.stderr.isatty())
        bar = tqdm(total=spe, initial=state.batch_in_epoch, leave=False, disable=quiet)
        for images, labels in loaders.train:
            distributed.stage(f"training step {state.step + 1}")
            batch = (
                images.to(device, non_blocking=True).contiguous(memory_format=memory),
                labels.to(device, non_blocking=True),
            )
            lr = lr_at(state.step, o, spe, base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, parts, grad_norm = train_step(
                student, distiller, optimizer, accelerator, batch, step_cfg
            )
            bad_step = torch.where((bad_step < 0) & ~loss.isfinite(), state.step, bad_step)
            for k, v in {**parts, "grad_norm": grad_norm.float()}.items():
                sums[k] = sums.get(k, 0) + v.detach()
            state.step += 1
            state.batch_in_epoch += 1
            n_log += 1
            bar.update(1)
            last_step = state.step == total_steps
            end_of_epoch = state.batch_in_epoch >= spe
            if end_of_epoch:
                state.epoch, state.batch_in_epoch = epoch + 1, 0

            if state.step % run.log_every == 0 or last_step:
                distributed.stage(f"logging at step {state.step}")
                check_finite(bad_step)
                heads = accelerator.unwrap_model(student).heads
                state.diagnostics = reduce_mean(accelerator, distiller.diagnostics(heads), 1)
                elapsed = time.time() - t_log
                log.log(
                    {
                        "step": state.step,
                        "epoch": epoch,
                        "lr": lr,
                        **reduce_mean(accelerator, sums, n_log),
                        **state.diagnostics,
                        "img_per_s": n_log * recipe.data.batch_size / max(elapsed, 1e-9),
                    }
                )
                sums, n_log, t_log = {}, 0, time.time()

            if last_step or (end_of_epoch and state.epoch % run.eval_every == 0):
                distributed.stage(f"the evaluation at step {state.step}")
                t_eval = time.time()
                state.last_eval = evaluate_student(student, loaders, accelerator, run.channels_last)
                state.best_top1 = max(state.best_top1, state.last_eval["top1"])
                n_skipped = skipped_before + skipped(loaders, accelerator)
                log.log(
                    {
                        "step": state.step,
                        "epoch": state.epoch,
                        **state.last_eval,
                        "best_top1": state.best_top1,
                        "eval_s": time.time() - t_eval,
                        **({"skipped_train_samples": n_skipped} if n_skipped else {}),
                    },
                    kind="eval",
                )
                t_log += time.time() - t_eval  # throughput excludes evaluation
            if last_step and distiller.teacher is not None and recipe.teacher.min_top1 != 0:
                distributed.stage("the teacher's full evaluation")
                teacher = distiller.teacher.model
                state.teacher_top1 = evaluate(teacher, loaders.eval, accelerator)["top1"]

            stop = timed = False
            if state.step % 10 == 0 or last_step:
                distributed.stage(f"the STOP-file poll at step {state.step}")
                stop, timed = poll(accelerator, run_dir / STOP_FILE, t_save, run.save_minutes)
            every = run.save_every and state.step % run.save_every == 0
            if stop or timed or last_step or every or (not run.save_every and end_of_epoch):
                distributed.stage(f"the checkpoint at step {state.step}")
                check_finite(bad_step)
                state.train_s = round(train_s + time.time() - t_attempt, 1)
                state.skipped_train_samples = skipped_before + skipped(loaders, accelerator)
                checkpoint.save(accelerator, run_dir, state, identity, run.keep_checkpoints)
                t_save = time.time()
            if stop and main_proc:
                (run_dir / STOP_FILE).unlink(missing_ok=True)
                print(
                    f"STOP file seen: checkpoint written at step {state.step}, exiting", flush=True
                )
            if stop or last_step:
                stopped = True
                break
        bar.close()

    summary = {}
    if state.step >= total_steps:
        distributed.stage("the summary")
        summary = report.finish(recipe, accelerator, student, state, loaders)
    log.close()
    accelerator.wait_for_everyone()
    return summary


def skipped(loaders, accelerator) -> int:
    """Unreadable training samples skipped by this run's processes so far, summed over ranks
    (collective: call it on every rank)."""
    count = torch.tensor(float(loaders.train_batches.corrupt), device=accelerator.device)
    return int(accelerator.reduce(count, "sum"))


def check_finite(bad_step: torch.Tensor) -> None:
    step = int(bad_step)
    if step >= 0:
        raise TrainingError(
            f"the loss became NaN/inf at optimizer step {step}: stopping. The last good checkpoint is "
            "the newest complete one in run.dir/checkpoints (no checkpoint is written after this); "
            "lower optim.lr, enable optim.clip_grad or use run.precision = 'bf16' instead of 'fp16'"
        )


def poll(accelerator, stop_path: Path, t_save: float, save_minutes: float) -> tuple[bool, bool]:
    """Rank 0 decides (STOP file present, wall-clock save due); every rank gets the same answer."""
    main = accelerator.is_main_process
    due = save_minutes > 0 and time.time() - t_save > 60 * save_minutes
    flags = torch.tensor(
        [float(main and stop_path.exists()), float(main and due)], device=accelerator.device
    )
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "max")
    return bool(flags[0]), bool(flags[1])


if __name__ == "__main__":
    cli(main)
