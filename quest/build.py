"""What every stage builds from a recipe: the accelerator, the loaders, the teacher, the student, the
resolved QuEST levels; and the command-line wrapper of every stage (`cli`).

The stages (`quest.train`, `quest.codebook`, `quest.evaluate`, `quest.visual_words`) and
tools/bench_step.py use these builders; nothing here imports a stage.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from . import data, distributed, shards
from . import recipe as recipes
from .data import Loaders
from .errors import QuestError, TrainingError
from .losses import CosineHead
from .models import build_model, feature_layer
from .recipe import Level, Recipe
from .student import (
    FrozenTeacher,
    ModelError,
    Student,
    load_state,
    load_strict,
    map_shapes,
    probe_input,
)


def build_loaders(cfg: recipes.Data, *, seed: int, rank: int, world: int, pin=False, device=None):
    """This rank's training and evaluation loaders: the one place that picks map-style data
    (folders, built-in datasets) or shard streams."""
    kw = {"seed": seed, "rank": rank, "world": world, "pin": pin, "device": device}
    if cfg.dataset == "wds":
        return shards.build_wds_loaders(cfg, **kw)
    return data.build_loaders(cfg, **kw)


def feature_loader(
    cfg: recipes.Data, *, seed: int, rank: int, world: int, max_images=0, device=None
):
    """The training images under the evaluation transforms, split across ranks (codebook stage)."""
    kw = {"seed": seed, "rank": rank, "world": world, "max_images": max_images, "device": device}
    if cfg.dataset == "wds":
        return shards.wds_feature_loader(cfg, **kw)
    return data.feature_loader(cfg, **kw)


def lazy_feature_loader(
    cfg: recipes.Data, accelerator, *, seed: int, max_images: int
) -> Callable[[], Iterable]:
    """This rank's `feature_loader`, built when called: `ensure_codebooks` builds it only when a
    codebook is missing, so reusing artifacts costs no scan of the data."""
    return functools.partial(
        feature_loader,
        cfg,
        seed=seed,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        max_images=max_images,
        device=accelerator.device,
    )


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


def teacher_layers(levels: list[Level]) -> tuple[list[str], list[int]]:
    """The teacher's tapped layers and their pools, one per resolved level (`quest_levels`)."""
    return [lv.teacher_layer for lv in levels], [lv.pool for lv in levels]


def student_layers(levels: list[Level]) -> list[str]:
    """The student's tapped layers, one per resolved level (`quest_levels`)."""
    return [lv.student_layer for lv in levels]


@dataclass(frozen=True)
class InputShape:
    """What the models are built for: classes, image channels, training resolution."""

    num_classes: int
    in_channels: int
    image_size: int


def input_shape(loaders: Loaders) -> InputShape:
    return InputShape(loaders.num_classes, loaders.in_channels, loaders.image_size)


def build_teacher(
    cfg: recipes.Teacher, levels: list[Level], shape: InputShape, device=None
) -> FrozenTeacher:
    """The teacher with strictly loaded weights: a checkpoint file, or a torchvision weights name.
    It taps the maps of the resolved `levels` (`quest_levels`); none = logits only (KD, evaluation)."""
    source = cfg.checkpoint
    if not source:
        raise ModelError(
            "teacher.checkpoint is empty: give a state-dict file or a torchvision weights name"
        )
    is_file_like = "/" in source or source.endswith((".pt", ".pth", ".bin"))
    if Path(source).is_file():
        model = build_model(cfg.arch, shape.num_classes, shape.in_channels)
        load_strict(model, load_state(source), f"teacher checkpoint {source}")
    elif is_file_like:
        raise ModelError(
            f"teacher checkpoint not found: {source} (train the teacher with distill.method = 'none' "
            "and point teacher.checkpoint at its student.pt, or give a torchvision weights name)"
        )
    else:  # a torchvision weights enum name such as IMAGENET1K_V1 (downloaded to the torch cache)
        model = build_model(cfg.arch, 1000, 3, weights=source)
    layers, pools = teacher_layers(levels)
    example = probe_input(shape.in_channels, shape.image_size)
    teacher = FrozenTeacher(model, layers, pools, example)
    return teacher.to(device) if device is not None else teacher


def quest_levels(recipe: Recipe) -> list[Level]:
    """The QuEST levels with their layers resolved (an empty layer key = the architecture's map).
    The one place levels are resolved from a Recipe: each entry point calls it once and passes the
    result down, so every builder below sees the same layers."""
    return [
        dataclasses.replace(
            lv,
            teacher_layer=lv.teacher_layer or feature_layer(recipe.teacher.arch),
            student_layer=lv.student_layer or feature_layer(recipe.student.arch),
        )
        for lv in recipe.quest_levels()
    ]


def check_models(
    teacher_arch: str, student_arch: str, levels: list[Level], shape: InputShape
) -> None:
    """Layers exist and teacher and student maps of every resolved level share H×W: checked on
    randomly initialised models before anything costly (training a teacher, k-means) runs. No
    levels (no QuEST): only the student is built."""
    student = build_model(student_arch, shape.num_classes, shape.in_channels)
    if not levels:
        return
    layers = student_layers(levels)
    shapes = map_shapes(student, layers, shape.in_channels, shape.image_size)
    teacher = build_model(teacher_arch, shape.num_classes, shape.in_channels)
    t_layers, pools = teacher_layers(levels)
    t_shapes = map_shapes(teacher, t_layers, shape.in_channels, shape.image_size)
    for i, (layer, s_shape, (c, h, w), p) in enumerate(zip(layers, shapes, t_shapes, pools)):
        t_shape = (c, h // p, w // p)
        if s_shape[1:] != t_shape[1:]:
            raise ModelError(
                f"level {i}: student map {layer} is {tuple(s_shape)} (C×H×W) but the teacher map is "
                f"{t_shape}: the H×W must agree — set teacher.pool (e.g. 2 for a 2× smaller "
                "student map) or choose other layers"
            )


def build_student(
    cfg: recipes.Student,
    head: recipes.Distill,
    levels: list[Level],
    shape: InputShape,
    codebooks: list,
    teacher_shapes,
) -> Student:
    """The backbone plus one cosine codeword head per resolved level (`head`: their γ and bias);
    no levels (no QuEST): the backbone alone."""
    backbone = build_model(cfg.arch, shape.num_classes, shape.in_channels)
    if not levels:
        return Student(backbone, [], [])
    layers = student_layers(levels)
    shapes = map_shapes(backbone, layers, shape.in_channels, shape.image_size)
    heads = []
    for i, (s_shape, t_shape, book) in enumerate(zip(shapes, teacher_shapes, codebooks)):
        if book.centroids.shape[1] != t_shape[0]:
            raise ModelError(
                f"level {i}: codebook has {book.centroids.shape[1]}-dim words but the teacher map has "
                f"{t_shape[0]} channels: rebuild the codebook for this teacher layer"
            )
        heads.append(
            CosineHead(s_shape[0], book.centroids.shape[0], head.gamma, head.learn_gamma, head.bias)
        )
    return Student(backbone, layers, heads)


def build_optimizer(params, cfg: recipes.Optim) -> torch.optim.SGD:
    """SGD as [optim] says, for the run and tools/bench_step.py alike; the LR is set every step
    (train.lr_at). The fused kernel where the parameters' device has one: the same update in one
    pass per tensor (ResNet-18 + a 4096-word head on 2 CPU threads: 6.6 ms vs 29.7 ms foreach)."""
    params = list(params)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        fused=all(p.device.type in ("cpu", "cuda") for p in params),
    )


def cli(entry) -> None:
    """Run a stage's main; a user error prints one clear line (no traceback) and exits 2."""
    try:
        entry(sys.argv[1:])
    except (QuestError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
