"""Load-time checks of a recipe that no single type can express: signs and finiteness of every number,
cross-field rules, architectures and weights names, the run directory. `validate` raises
RecipeError with one line naming the key, its value and what is allowed."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

from .errors import RecipeError

# Numeric keys that may be negative (a documented -1 meaning); every other number must be ≥ 0.
SIGNED = frozenset({"codebook.seed", "teacher.min_top1"})


def flat(recipe) -> dict[str, Any]:
    """Every key of the recipe with its value, flat ('optim.lr', 'levels[0].beta')."""
    out: dict[str, Any] = {}
    for key, value in dataclasses.asdict(recipe).items():
        if key == "levels":
            for i, level in enumerate(value):
                out.update({f"levels[{i}].{k}": v for k, v in level.items()})
        elif isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _numbers(recipe) -> dict[str, float]:
    """Every number of the recipe, list items included ('optim.milestones[1]')."""
    items = []
    for key, value in flat(recipe).items():
        items += (
            [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else []
        )
        items.append((key, value))
    return {k: v for k, v in items if isinstance(v, int | float) and not isinstance(v, bool)}


def _check_archs(recipe) -> None:
    from .models import _TORCHVISION_ARCHS, canonical_arch

    for key, arch in (("student.arch", recipe.student.arch), ("teacher.arch", recipe.teacher.arch)):
        if key == "teacher.arch" and not recipe.uses_teacher:
            continue
        try:
            canonical_arch(arch)
        except ValueError as err:
            raise RecipeError(f"'{key}': {err}") from None
    source = recipe.teacher.checkpoint
    if recipe.uses_teacher and source and not _looks_like_a_file(source):
        name = canonical_arch(recipe.teacher.arch)
        if name not in _TORCHVISION_ARCHS and not name.startswith("tv:"):
            raise RecipeError(
                f"'teacher.checkpoint' = {source!r} is not a file, and a torchvision weights name "
                f"only exists for the torchvision archs ({sorted(_TORCHVISION_ARCHS)}, 'tv:<name>'), "
                f"not {recipe.teacher.arch!r}: give the teacher's state-dict file (or set "
                "teacher.recipe to train it first)"
            )


def _looks_like_a_file(source: str) -> bool:
    return "/" in source or source.endswith((".pt", ".pth", ".bin")) or Path(source).exists()


def validate(recipe) -> None:
    """Cross-field checks that no single type can express."""
    for key, value in _numbers(recipe).items():
        if not math.isfinite(value):
            raise RecipeError(f"'{key}' must be a finite number, got {value}")
        if value < 0 and key not in SIGNED:
            raise RecipeError(f"'{key}' must not be negative, got {value}")
    if recipe.data.num_classes == 1:
        raise RecipeError(
            "'data.num_classes' = 1 leaves nothing to classify: use 0 (the dataset's "
            "own count) or at least 2"
        )
    if Path(recipe.run.dir).exists() and not Path(recipe.run.dir).is_dir():
        raise RecipeError(f"'run.dir' = {recipe.run.dir!r} is an existing file, not a directory")
    positive = {
        "data.batch_size": recipe.data.batch_size,
        "optim.epochs": recipe.optim.epochs,
        "codebook.size": recipe.codebook.size,
        "codebook.iterations": recipe.codebook.iterations,
        "run.grad_accum": recipe.run.grad_accum,
        "run.log_every": recipe.run.log_every,
        "run.eval_every": recipe.run.eval_every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise RecipeError(f"'{key}' must be positive, got {value}")
    if not recipe.run.timeout_minutes > 0:
        raise RecipeError(
            f"'run.timeout_minutes' must be positive, got {recipe.run.timeout_minutes}"
        )
    if recipe.optim.lr <= 0:
        raise RecipeError(f"'optim.lr' must be positive, got {recipe.optim.lr}")
    if recipe.optim.nesterov and recipe.optim.momentum <= 0:
        raise RecipeError(
            "'optim.nesterov' needs optim.momentum > 0: set nesterov = false or a momentum"
        )
    if not 0.0 <= recipe.data.val_fraction < 1.0:
        raise RecipeError(f"'data.val_fraction' must be in [0, 1), got {recipe.data.val_fraction}")
    if not 0.0 < recipe.data.keep_fraction <= 1.0:
        raise RecipeError(
            f"'data.keep_fraction' must be in (0, 1], got {recipe.data.keep_fraction}"
        )
    milestones = recipe.optim.milestones
    if any(b <= a for a, b in itertools.pairwise(milestones)):
        raise RecipeError(f"'optim.milestones' must increase, got {recipe.optim.milestones}")
    if recipe.uses_teacher and not recipe.teacher.arch:
        raise RecipeError(
            f"distill.method = '{recipe.distill.method}' needs a teacher: set 'teacher.arch' "
            "and 'teacher.checkpoint' (or use method 'none')"
        )
    if not recipe.student.arch:
        raise RecipeError("'student.arch' is required (see quest.models.ARCHS)")
    _check_archs(recipe)
    if recipe.uses_quest:
        for i, level in enumerate(recipe.quest_levels()):
            if not level.codebook:
                where = f"levels[{i}].codebook" if recipe.levels else "codebook.path"
                raise RecipeError(f"QuEST needs a codebook path: set '{where}'")
            if level.pool < 1 or level.beta <= 0:
                raise RecipeError(f"level {i}: pool must be ≥ 1 and beta > 0")
    if recipe.data.dataset == "wds" and not (recipe.data.train_shards and recipe.data.val_shards):
        raise RecipeError("data.dataset = 'wds' needs 'data.train_shards' and 'data.val_shards'")
