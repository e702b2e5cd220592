"""Evaluation: top-1/top-5 and loss, exact across ranks (per-rank sums reduced once after the loop).

`python -m quest.evaluate RECIPE [--checkpoint PATH] [--teacher] [section.key=value ...]`
evaluates the run's exported student (run.dir/student.pt by default), a given checkpoint, or the teacher.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import Loaders
from .errors import TrainingError
from .recipe import Teacher
from .student import FrozenTeacher


@torch.no_grad()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader,
    accelerator,
    max_batches: int = 0,
    channels_last: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """forward(images) → logits. Each sample counted once: the loaders give every rank disjoint samples."""
    device = accelerator.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss, count
    for i, (images, labels) in enumerate(
        tqdm(
            loader,
            desc=desc,
            disable=not (accelerator.is_main_process and sys.stderr.isatty()),
            leave=False,
        )
    ):
        if max_batches and i >= max_batches:
            break
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with accelerator.autocast():
            logits = forward(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        sums += torch.stack(
            [
                hits[:, 0].sum(),
                hits.any(dim=1).sum(),
                F.cross_entropy(logits, labels, reduction="sum"),
                torch.tensor(labels.shape[0], device=device),
            ]
        ).double()
    sums = accelerator.reduce(sums, "sum") if accelerator.num_processes > 1 else sums
    c1, c5, loss, n = sums.tolist()
    n = max(n, 1.0)
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n, "count": int(sums[3])}


def evaluate_student(student, loaders: Loaders, accelerator, channels_last: bool) -> dict:
    """`evaluate` on a training student's logits; it is back in train mode afterwards."""
    student.eval()
    result = evaluate(
        lambda x: student(x)[0], loaders.eval, accelerator, channels_last=channels_last
    )
    student.train()
    return result


def check_teacher(
    cfg: Teacher,
    teacher: FrozenTeacher,
    loaders: Loaders,
    accelerator,
    *,
    eval_batch_size: int,
    channels_last: bool,
) -> float:
    """Refuse a teacher that does not know the task (a random or wrong checkpoint), before any cost.
    eval_batch_size: the global evaluation batch (quest.data.eval_batch), to count 512 images."""
    floor = cfg.min_top1 if cfg.min_top1 >= 0 else 200.0 / loaders.num_classes
    if floor == 0:
        return float("nan")
    n_batches = max(1, math.ceil(512 / max(eval_batch_size, 1)))
    result = evaluate(
        teacher.model,
        loaders.eval,
        accelerator,
        max_batches=n_batches,
        channels_last=channels_last,
    )
    if result["top1"] < floor:
        raise TrainingError(
            f"teacher {cfg.arch} from {cfg.checkpoint} reaches only "
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


def main(argv: list[str] | None = None) -> dict:
    from . import build

    parser = argparse.ArgumentParser(prog="python -m quest.evaluate", description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument(
        "--checkpoint",
        help="student weights: a training checkpoint folder (run.dir/checkpoints/step_N), its "
        "model.safetensors, or a state-dict file (default: run.dir/student.pt)",
    )
    parser.add_argument("--teacher", action="store_true", help="evaluate the teacher instead")
    args = parser.parse_args(argv)
    recipe, accelerator, loaders = build.setup(args.recipe, args.overrides)
    if args.teacher:
        # Only its logits are evaluated: no level maps to tap.
        model = build.build_teacher(recipe.teacher, [], build.input_shape(loaders)).model
        what = f"teacher {recipe.teacher.arch} ({recipe.teacher.checkpoint})"
    else:
        from .checkpoint import backbone_weights
        from .models import build_model
        from .student import load_strict

        path = Path(args.checkpoint or Path(recipe.run.dir) / "student.pt")
        model = build_model(recipe.student.arch, loaders.num_classes, loaders.in_channels)
        load_strict(model, backbone_weights(path), str(path))
        what = f"student {recipe.student.arch} ({path})"
    model = model.to(accelerator.device).eval()
    if recipe.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    result = evaluate(model, loaders.eval, accelerator, channels_last=recipe.run.channels_last)
    if accelerator.is_main_process:
        print(
            f"{what}: top1 {result['top1']:.2f} top5 {result['top5']:.2f} loss {result['loss']:.4f} "
            f"on {result['count']} images"
        )
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    from .build import cli

    cli(main)
