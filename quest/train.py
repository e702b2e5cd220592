"""Train a student: plain supervised ("none"), Hinton KD, QuEST, or QuEST + KD.

    python -m quest.train RECIPE [section.key=value ...]
    accelerate launch [--multi_gpu --num_processes N] -m quest.train RECIPE [...]

One loop, top to bottom. Only the student (backbone + classifier + codeword heads) and the optimizer go
through `accelerator.prepare`; the teacher and codebooks are frozen inputs. The LR is a pure function
of the optimizer step. A run directory that holds a complete checkpoint resumes from it; a STOP file
in the run directory makes every rank save a checkpoint and exit 0.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from tqdm import tqdm

from . import artifacts, checkpoint, distributed, metrics
from . import recipe as recipes
from .codebook import (
    Codebook,
    CodebookError,
    build_codebooks,
    expected_meta,
    load_codebook,
    teacher_weights_id,
)
from .data import DataError, Loaders, build_loaders, feature_loader
from .evaluate import evaluate
from .losses import (
    CosineHead,
    flatten_locations,
    kd_loss,
    quest_loss,
    soft_assign,
    total_loss,
    word_diagnostics,
)
from .metrics import MetricLogger, plot_curves
from .models import build_model, feature_layer
from .recipe import Optim, Recipe
from .student import (
    FrozenTeacher,
    ModelError,
    Student,
    load_state,
    load_strict,
    map_shapes,
    probe_input,
)

STOP_FILE = "STOP"


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, a teacher that does not know the task, ...)."""


# --------------------------------------------------------------------------------------- setup


def make_accelerator(run: recipes.Run) -> Accelerator:
    """The recipe is the single source of truth: explicit arguments beat the launcher's environment."""
    use_cuda = torch.cuda.is_available() and not run.cpu
    precision, why = resolve_precision(run.precision, use_cuda)
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=run.cpu,
        log_with="wandb" if run.wandb else None,
        # Bounds every collective; the k-means wait has its own longer limit (quest.distributed).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=run.timeout_minutes))],
    )
    if run.precision == "auto" and accelerator.is_main_process:
        print(f"precision: auto -> {precision} ({why})", flush=True)
    if precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "run.precision = 'bf16' on a CPU without native bf16 (AVX512-BF16/AMX): autocast is emulated "
            "and was ~10x slower than fp32 on such a CPU; set run.precision = 'auto' or 'no'",
            stacklevel=2,
        )
    expected = int(os.environ.get("WORLD_SIZE", 1))
    if accelerator.num_processes != expected:
        raise TrainingError(
            f"{expected} processes were launched but Accelerate sees {accelerator.num_processes}: on a "
            "CPU-only machine use `accelerate launch --multi_gpu --num_processes N` with run.cpu = true"
        )
    distributed.init(accelerator.num_processes)
    return accelerator


def resolve_precision(requested: str, cuda: bool) -> tuple[str, str]:
    """run.precision 'auto': bf16 where the device computes it natively, else fp32 ('no').
    Returns the precision and why."""
    if requested != "auto":
        return requested, "the recipe's"
    if cuda:
        if torch.cuda.is_bf16_supported():
            return "bf16", "CUDA device with bf16"
        return "no", "CUDA device without bf16"
    if cpu_has_native_bf16():
        return "bf16", "CPU with native bf16: AVX512-BF16 or AMX"
    return "no", "CPU without AVX512-BF16/AMX, where bf16 is emulated and slower than fp32"


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """AVX512-BF16 or AMX: bf16 autocast about 2x faster than fp32 (measured); without them
    (AVX2 alone) it is emulated, about 10x slower."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:  # not Linux: ask oneDNN
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def setup(path: str, overrides: list[str]) -> tuple[Recipe, Accelerator, Loaders]:
    recipe = recipes.load(path, overrides)
    accelerator = make_accelerator(recipe.run)
    check_batch_split(recipe.data.batch_size, recipe.run.grad_accum, accelerator.num_processes)
    set_seed(recipe.seed, device_specific=False)
    loaders = build_loaders(
        recipe.data,
        seed=recipe.seed,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        pin=accelerator.device.type == "cuda",
        device=accelerator.device,
    )
    return recipe, accelerator, loaders


def check_batch_split(batch_size: int, grad_accum: int, processes: int) -> None:
    """The global batch splits into equal per-process batches, each into grad_accum equal
    micro-batches: an uneven split would leave the ranks' gradients unsynchronised."""
    if batch_size % (processes * grad_accum):
        raise recipes.RecipeError(
            f"data.batch_size = {batch_size} does not split into run.grad_accum = {grad_accum} "
            f"equal micro-batches on each of {processes} processes: use a multiple of "
            f"{processes * grad_accum}"
        )


def teacher_layers(recipe: Recipe) -> tuple[list[str], list[int]]:
    levels = recipe.quest_levels()
    layers = [lv.teacher_layer or feature_layer(recipe.teacher.arch) for lv in levels]
    return layers, [lv.pool for lv in levels]


def student_layers(recipe: Recipe) -> list[str]:
    return [lv.student_layer or feature_layer(recipe.student.arch) for lv in recipe.quest_levels()]


def build_teacher(recipe: Recipe, loaders: Loaders, device=None) -> FrozenTeacher:
    """The teacher with strictly loaded weights: a checkpoint file, or a torchvision weights name."""
    cfg = recipe.teacher
    source = cfg.checkpoint
    if not source:
        raise ModelError(
            "teacher.checkpoint is empty: give a state-dict file or a torchvision weights name"
        )
    is_file_like = "/" in source or source.endswith((".pt", ".pth", ".bin"))
    if Path(source).is_file():
        model = build_model(cfg.arch, loaders.num_classes, loaders.in_channels)
        load_strict(model, load_state(source), f"teacher checkpoint {source}")
    elif is_file_like:
        raise ModelError(
            f"teacher checkpoint not found: {source} (train the teacher with distill.method = 'none' "
            "and point teacher.checkpoint at its student.pt, or give a torchvision weights name)"
        )
    else:  # a torchvision weights enum name such as IMAGENET1K_V1 (downloaded to the torch cache)
        model = build_model(cfg.arch, 1000, 3, weights=source)
    layers, pools = teacher_layers(recipe)
    example = probe_input(loaders.in_channels, loaders.image_size)
    teacher = FrozenTeacher(model, layers, pools, example)
    return teacher.to(device) if device is not None else teacher


def check_teacher(recipe: Recipe, teacher: FrozenTeacher, loaders: Loaders, accelerator) -> float:
    """Refuse a teacher that does not know the task (a random or wrong checkpoint), before any cost."""
    floor = recipe.teacher.min_top1 if recipe.teacher.min_top1 >= 0 else 200.0 / loaders.num_classes
    if floor == 0:
        return float("nan")
    n_batches = max(
        1, math.ceil(512 / max(recipe.data.eval_batch_size or 2 * recipe.data.batch_size, 1))
    )
    result = evaluate(
        teacher.model,
        loaders.eval,
        accelerator,
        max_batches=n_batches,
        channels_last=recipe.run.channels_last,
    )
    if result["top1"] < floor:
        raise TrainingError(
            f"teacher {recipe.teacher.arch} from {recipe.teacher.checkpoint} reaches only "
            f"{result['top1']:.1f}% top-1 on {result['count']} evaluation images (floor {floor:.1f}%): "
            "wrong or untrained weights? Set teacher.min_top1 = 0 to skip this check"
        )
    if accelerator.is_main_process:
        print(
            f"teacher check: {result['top1']:.1f} % top-1 on {result['count']} images "
            f"(floor {floor:.1f} %)",
            flush=True,
        )
    return result["top1"]


def ensure_codebooks(recipe: Recipe, teacher: FrozenTeacher, accelerator) -> list[Codebook]:
    """Each level's codebook: an existing artifact is loaded and must match this recipe (teacher,
    layer, pool, K, seed, feature precision); only the missing ones are built, in one teacher pass.
    An artifact is never rebuilt or overwritten: to rebuild one, delete it."""
    levels = recipe.quest_levels()
    layers, _ = teacher_layers(recipe)
    resolved = [
        recipes.Level(**{**vars(lv), "teacher_layer": layer}) for lv, layer in zip(levels, layers)
    ]
    recipe = recipes.Recipe(**{**vars(recipe), "levels": resolved})
    # Existing artifacts are validated first: a mismatch fails before any teacher pass.
    books = [
        load_codebook(lv.codebook, expected_meta(recipe, lv, accelerator.mixed_precision))
        if Path(lv.codebook).is_file()
        else None
        for lv in resolved
    ]
    missing = [i for i, book in enumerate(books) if book is None]
    if not missing:
        return books
    if not recipe.codebook.build:
        raise CodebookError(
            f"codebook.build = false and {[resolved[i].codebook for i in missing]} do not exist: "
            "build them first with `python -m quest.codebook` on the recipe that defines them (the "
            "recipe header says which)"
        )
    loader = feature_loader(
        recipe.data,
        seed=recipe.seed,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        max_images=recipe.codebook.max_images,
        device=accelerator.device,
    )
    for i, book in zip(missing, build_codebooks(recipe, teacher, accelerator, loader, missing)):
        books[i] = book
    return books


def check_models(recipe: Recipe, loaders: Loaders) -> None:
    """Layers exist and teacher and student maps of every level share H×W: checked on randomly
    initialised models before anything costly (training a teacher, k-means) runs."""
    student = build_model(recipe.student.arch, loaders.num_classes, loaders.in_channels)
    if not recipe.uses_quest:
        return
    layers = student_layers(recipe)
    shapes = map_shapes(student, layers, loaders.in_channels, loaders.image_size)
    teacher = build_model(recipe.teacher.arch, loaders.num_classes, loaders.in_channels)
    t_layers, pools = teacher_layers(recipe)
    t_shapes = map_shapes(teacher, t_layers, loaders.in_channels, loaders.image_size)
    for i, (layer, s_shape, (c, h, w), p) in enumerate(zip(layers, shapes, t_shapes, pools)):
        t_shape = (c, h // p, w // p)
        if s_shape[1:] != t_shape[1:]:
            raise ModelError(
                f"level {i}: student map {layer} is {tuple(s_shape)} (C×H×W) but the teacher map is "
                f"{t_shape}: the H×W must agree — set teacher.pool (e.g. 2 for a 2× smaller "
                "student map) or choose other layers"
            )


def build_student(
    recipe: Recipe, loaders: Loaders, codebooks: list[Codebook], teacher_shapes
) -> Student:
    backbone = build_model(recipe.student.arch, loaders.num_classes, loaders.in_channels)
    if not recipe.uses_quest:
        return Student(backbone, [], [])
    layers = student_layers(recipe)
    shapes = map_shapes(backbone, layers, loaders.in_channels, loaders.image_size)
    d = recipe.distill
    heads = []
    for i, (s_shape, t_shape, book) in enumerate(zip(shapes, teacher_shapes, codebooks)):
        if book.centroids.shape[1] != t_shape[0]:
            raise ModelError(
                f"level {i}: codebook has {book.centroids.shape[1]}-dim words but the teacher map has "
                f"{t_shape[0]} channels: rebuild the codebook for this teacher layer"
            )
        heads.append(
            CosineHead(s_shape[0], book.centroids.shape[0], d.gamma, d.learn_gamma, d.bias)
        )
    return Student(backbone, layers, heads)


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


def distill_loss(
    student, teacher, codebooks, levels, distill: recipes.Distill, images, labels, autocast
):
    """One micro-batch: (loss, named parts, student word scores, teacher targets)."""
    teacher_logits, targets = None, []
    if teacher is not None:
        with torch.no_grad(), autocast():
            teacher_logits, maps = teacher(images)
        if codebooks:
            targets = [
                soft_assign(flatten_locations(m), cb.centroids, lv.beta, cb.sq_norms)
                for m, cb, lv in zip(maps, codebooks, levels)
            ]
    with autocast():
        logits, scores = student(images)
    kd = None
    if distill.method in ("kd", "quest+kd"):
        kd = kd_loss(logits, teacher_logits, distill.kd_temperature)
    loss, parts = total_loss(
        logits,
        labels,
        ce_weight=distill.ce_weight,
        quest_parts=[quest_loss(s, t) for s, t in zip(scores, targets)],
        level_weights=[lv.weight for lv in levels],
        quest_weight=distill.quest_weight,
        kd=kd,
        kd_weight=distill.kd_weight,
    )
    return loss, parts, scores, targets


def train_step(
    student,
    teacher,
    codebooks,
    levels,
    distill,
    optimizer,
    accelerator,
    images,
    labels,
    accum,
    clip,
):
    """One optimizer step over `accum` equal micro-batches (gradient sync on the last one only).
    Returns the last micro-batch's (loss, parts, scores, targets) and the gradient norm, all on device:
    no host sync here. tools/bench_step.py times exactly this function."""
    # split, not chunk: chunk(n) may return fewer than n pieces, and then no micro-batch would sync.
    if images.shape[0] % accum:
        raise TrainingError(
            f"a batch of {images.shape[0]} does not split into {accum} micro-batches"
        )
    micro = images.shape[0] // accum
    for i, (x, y) in enumerate(zip(images.split(micro), labels.split(micro))):
        with nullcontext() if i == accum - 1 else accelerator.no_sync(student):
            loss, parts, scores, targets = distill_loss(
                student, teacher, codebooks, levels, distill, x, y, accelerator.autocast
            )
            accelerator.backward(loss / accum)
    grad_norm = accelerator.clip_grad_norm_(student.parameters(), clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, parts, scores, targets, grad_norm


# --------------------------------------------------------------------------------------- the loop


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return {}
    recipe, accelerator, loaders = setup(argv[0], argv[1:])  # every load-time check first
    check_models(recipe, loaders)
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


def train(recipe: Recipe, accelerator: Accelerator, loaders: Loaders) -> dict:
    run, dcfg, o = recipe.run, recipe.distill, recipe.optim
    run_dir, device = Path(run.dir), accelerator.device
    main_proc = accelerator.is_main_process
    memory = torch.channels_last if run.channels_last else torch.contiguous_format

    # A run.dir with checkpoints must hold this very run: checked before anything is written there.
    distributed.stage("the checkpoint scan")
    found = checkpoint.candidates(accelerator, run_dir)
    # run.precision 'auto' may resolve differently on another machine: the resolved one counts.
    identity = {
        "recipe": {**recipes.math_fields(recipe), "run.precision": accelerator.mixed_precision}
    }
    if recipe.uses_teacher:
        identity["recipe"]["teacher.weights"] = teacher_weights_id(recipe.teacher.checkpoint)
    check_same_run(accelerator, found, identity, run_dir)

    teacher, codebooks = None, []
    levels = recipe.quest_levels() if recipe.uses_quest else []
    if recipe.uses_teacher:
        distributed.stage("the teacher check")
        teacher = build_teacher(recipe, loaders, device)
        teacher.model.to(memory_format=memory)
        check_teacher(recipe, teacher, loaders, accelerator)
    teacher_shapes = []
    if recipe.uses_quest:
        teacher_shapes = teacher.map_shapes(loaders.in_channels, loaders.image_size)
        distributed.stage("the codebook stage")
        codebooks = [cb.to(device) for cb in ensure_codebooks(recipe, teacher, accelerator)]
        identity["codebooks"] = {f"level {i} sha256": cb.digest for i, cb in enumerate(codebooks)}
        check_same_run(accelerator, found, identity, run_dir)
    torch.manual_seed(recipe.seed)  # the student's init must not depend on what ran before it
    student = build_student(recipe, loaders, codebooks, teacher_shapes).to(
        device, memory_format=memory
    )
    base_lr = o.lr * recipe.data.batch_size / o.lr_batch if o.lr_batch else o.lr
    optimizer = torch.optim.SGD(
        student.parameters(),
        lr=base_lr,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
    )
    if run.compile:
        student = torch.compile(student)
        if teacher is not None:
            teacher.model = torch.compile(teacher.model)
    student, optimizer = accelerator.prepare(student, optimizer)
    distributed.stage("loading the checkpoint")
    resumed = checkpoint.resume(accelerator, found)
    state = resumed[0] if resumed else checkpoint.LoopState()

    # Checks passed: from here on the run directory is written.
    logged_until = -1
    if main_proc:
        if resumed:
            print(f"resumed from {resumed[1]} (step {state.step}, epoch {state.epoch})", flush=True)
        # Records past the checkpoint are replayed by this attempt: drop them so no step is there twice.
        logged_until = metrics.drop_after(run_dir, state.step)
        artifacts.save_text(recipes.to_toml(recipe), run_dir / "recipe.toml")
        artifacts.save_json(recipes.to_dict(recipe), run_dir / "recipe.json")
        if loaders.classes is not None:  # label i is classes[i]
            artifacts.save_json(loaders.classes, run_dir / "classes.json")
        artifacts.save_json(
            {
                **artifacts.provenance(),
                "world_size": accelerator.num_processes,
                "precision": accelerator.mixed_precision,
            },
            run_dir / "env.json",
        )
    log = MetricLogger(
        accelerator,
        run_dir,
        recipes.to_dict(recipe),
        run.wandb,
        run.wandb_project,
        recipe.name,
        wandb_after=logged_until,
    )

    spe = loaders.train_batches.batches_per_epoch
    total_steps = o.epochs * spe if not run.max_steps else min(run.max_steps, o.epochs * spe)
    sums: dict[str, torch.Tensor] = {}
    bad_step = torch.tensor(-1, device=device)
    t_log, n_log, t_save = time.time(), 0, time.time()
    t_attempt, train_s_before, skipped_before = (
        time.time(),
        state.train_s,
        state.skipped_train_samples,
    )
    stop_path = run_dir / STOP_FILE

    def save_checkpoint():
        check_finite(bad_step)
        state.train_s = round(train_s_before + time.time() - t_attempt, 1)
        state.skipped_train_samples = skipped_before + skipped(loaders, accelerator)
        checkpoint.save(accelerator, run_dir, state, identity, run.keep_checkpoints)

    stopped = False
    while state.step < total_steps and not stopped:
        epoch = state.epoch
        loaders.train_batches.set_epoch(epoch, state.batch_in_epoch)
        student.train()
        bar = tqdm(
            total=spe,
            initial=state.batch_in_epoch,
            desc=f"epoch {epoch}",
            disable=not (main_proc and sys.stderr.isatty()),
            leave=False,
        )
        for images, labels in loaders.train:
            distributed.stage(f"training step {state.step + 1}")
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory)
            labels = labels.to(device, non_blocking=True)
            lr = lr_at(state.step, o, spe, base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, parts, scores, targets, grad_norm = train_step(
                student,
                teacher,
                codebooks,
                levels,
                dcfg,
                optimizer,
                accelerator,
                images,
                labels,
                run.grad_accum,
                o.clip_grad,
            )
            bad_step = torch.where(
                (bad_step < 0) & ~torch.isfinite(loss.detach()), state.step, bad_step
            )
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v
            sums["grad_norm"] = sums.get("grad_norm", 0) + grad_norm.detach().float()
            state.step += 1
            state.batch_in_epoch += 1
            n_log += 1
            bar.update(1)
            last_step = state.step == total_steps
            end_of_epoch = state.batch_in_epoch >= spe
            if state.step % run.log_every == 0 or last_step:
                distributed.stage(f"logging at step {state.step}")
                check_finite(bad_step)
                values = {
                    k: float(accelerator.reduce(v.detach().float(), "mean")) / n_log
                    for k, v in sums.items()
                }
                if scores:
                    state.diagnostics = {
                        k: float(accelerator.reduce(v, "mean"))
                        for k, v in word_diagnostics(scores[0], targets[0]).items()
                    }
                    state.diagnostics["gamma"] = float(
                        accelerator.unwrap_model(student).heads[0].gamma.detach()
                    )
                elapsed = time.time() - t_log
                log.log(
                    {
                        "step": state.step,
                        "epoch": epoch,
                        "lr": lr,
                        **values,
                        **state.diagnostics,
                        "img_per_s": n_log * recipe.data.batch_size / max(elapsed, 1e-9),
                    }
                )
                sums, n_log, t_log = {}, 0, time.time()
            if end_of_epoch:
                state.epoch, state.batch_in_epoch = epoch + 1, 0
            if last_step or (end_of_epoch and state.epoch % run.eval_every == 0):
                distributed.stage(f"the evaluation at step {state.step}")
                t_eval = time.time()
                student.eval()
                state.last_eval = evaluate(
                    _logits_only(student),
                    loaders.eval,
                    accelerator,
                    channels_last=run.channels_last,
                )
                student.train()
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
            if last_step and teacher is not None and recipe.teacher.min_top1 != 0:
                distributed.stage("the teacher's full evaluation")
                state.teacher_top1 = evaluate(
                    teacher.model, loaders.eval, accelerator, channels_last=run.channels_last
                )["top1"]
            stop_now = timed = False
            if state.step % 10 == 0 or last_step:
                distributed.stage(f"the STOP-file poll at step {state.step}")
                stop_now, timed = poll(accelerator, stop_path, t_save, run.save_minutes)
            if (
                stop_now
                or timed
                or last_step
                or (run.save_every and state.step % run.save_every == 0)
                or (not run.save_every and end_of_epoch)
            ):
                distributed.stage(f"the checkpoint at step {state.step}")
                save_checkpoint()
                t_save = time.time()
            if stop_now:
                stopped = True
                if main_proc:
                    stop_path.unlink(missing_ok=True)
                    print(
                        f"STOP file seen: checkpoint written at step {state.step}, exiting",
                        flush=True,
                    )
                break
            if last_step:
                break
        bar.close()

    summary = {}
    if not stopped:
        distributed.stage("the summary")
        summary = finish(recipe, accelerator, student, state, loaders)
    log.close()
    accelerator.wait_for_everyone()
    return summary


def check_same_run(accelerator, found: list[str], identity: dict, run_dir: Path) -> None:
    """Refuse to resume a checkpoint made by another run (its math fields or artifacts differ)."""
    if not found:
        return
    problem = None
    if accelerator.is_main_process:
        try:
            problem = checkpoint.identity_mismatch(checkpoint.read_identity(found[0]), identity)
        except (OSError, ValueError) as err:
            problem = f"its {checkpoint.IDENTITY} is unreadable ({err})"
    problem = checkpoint.broadcast(accelerator, problem)
    if problem:
        raise checkpoint.CheckpointError(
            f"run.dir {run_dir} holds a checkpoint of another run ({problem}): resuming would mix "
            "two runs; use a new run.dir (or put those values back to resume)"
        )


def _logits_only(student):
    def forward(x):
        return student(x)[0]

    return forward


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


def finish(recipe, accelerator, student, state: checkpoint.LoopState, loaders) -> dict:
    """summary.json, student.pt, curves.png and the table, from the final checkpoint's state alone:
    a run re-entered after it finished writes the same summary."""
    run_dir = Path(recipe.run.dir)
    model = accelerator.unwrap_model(student)
    check_ranks_agree(model, accelerator)
    summary = {
        "name": recipe.name,
        "method": recipe.distill.method,
        "top1": state.last_eval.get("top1"),
        "top5": state.last_eval.get("top5"),
        "best_top1": state.best_top1,
        "teacher_top1": state.teacher_top1,
        "steps": state.step,
        "epochs": state.epoch,
        "world_size": accelerator.num_processes,
        "eval_count": state.last_eval.get("count"),
        "skipped_train_samples": state.skipped_train_samples,
        "wall_s": state.train_s,
        **{f"final_{k}": v for k, v in state.diagnostics.items()},
    }
    if accelerator.is_main_process:
        meta = {
            "arch": recipe.student.arch,
            "num_classes": loaders.num_classes,
            "in_channels": loaders.in_channels,
            "classes": loaders.classes,
            "recipe": recipes.to_dict(recipe),
            "summary": summary,
        }
        checkpoint.export_student(run_dir / "student.pt", model.backbone, model.heads, meta)
        artifacts.save_text(checkpoint.plain_json(summary) + "\n", run_dir / "summary.json")
        plot_curves(run_dir)
        print(summary_table(summary, recipe), flush=True)
    return summary


def check_ranks_agree(model: torch.nn.Module, accelerator) -> None:
    """Every rank must end with the same weights (a missed gradient sync leaves them apart)."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    weights = torch.linspace(1, 2, flat.numel(), dtype=torch.float64, device=flat.device)
    checksum = torch.stack([flat.sum(), (flat * weights).sum()])[None]
    gathered = accelerator.gather(checksum)
    if not (gathered == gathered[0]).all():
        raise TrainingError(
            f"the ranks ended with different weights (checksums {gathered[:, 0].tolist()}): their "
            "gradients were not synchronised; please report this with the recipe"
        )


def summary_table(summary: dict, recipe: Recipe) -> str:
    rows = []
    if summary["teacher_top1"] is not None:  # a teacher was used
        rows.append((f"teacher {recipe.teacher.arch}", f"{summary['teacher_top1']:.2f}"))
    rows.append((f"student {recipe.student.arch} ({summary['method']})", f"{summary['top1']:.2f}"))
    if "final_perplexity" in summary:
        rows.append(
            (
                "codebook usage (target perplexity)",
                f"{summary['final_perplexity']:.1f} of {recipe.codebook.size} words",
            )
        )
        rows.append(("student-teacher word agreement", f"{100 * summary['final_agreement']:.1f} %"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  top-1 (%)"] + [f"{a:{width}}  {b}" for a, b in rows]
    if summary["skipped_train_samples"]:
        lines.append(f"{summary['skipped_train_samples']} unreadable training samples skipped")
    return (
        "\n".join(lines) + f"\n{summary['steps']} steps, {summary['wall_s']} s -> {recipe.run.dir}"
    )


USER_ERRORS = (
    recipes.RecipeError,
    checkpoint.CheckpointError,
    distributed.CollectiveTimeout,
    DataError,
    ModelError,
    CodebookError,
    TrainingError,
    ImportError,
)


def cli(entry) -> None:
    """Run a stage's main; a user error prints one clear line (no traceback) and exits 2."""
    try:
        entry(sys.argv[1:])
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli(main)
