"""How much the teacher's soft targets change when its forward runs in bf16 instead of fp32.

    python tools/bench_precision.py RECIPE [--images 256] [--words 256] [section.key=value ...]
    python tools/bench_precision.py RECIPE --random-teacher --size 224 --images 32

The recipe's teacher (its checkpoint, or random weights with --random-teacher for a large map without
a trained model) sees the recipe's evaluation images (or, with --random-teacher, Gaussian images of
--size px); k-means on its fp32 features gives a codebook of --words words (the recipe's codebook
artifact is not needed). Then the soft assignment p_T of every feature vector is computed from fp32
features and from bf16-autocast features. Prints the map shape, the argmax agreement of the two
targets, the mean KL(p_fp32 || p_bf16) in nats, and the mean largest target probability.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quest import build
from quest.kmeans import fit_kmeans
from quest.losses import flatten_locations, soft_assign
from quest.models import build_model
from quest.student import FrozenTeacher


@torch.no_grad()
def features(teacher: FrozenTeacher, images: list[torch.Tensor], bf16: bool) -> torch.Tensor:
    rows = []
    for x in images:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, maps = teacher(x)
        rows.append(flatten_locations(maps[0]).float())
    return torch.cat(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--words", type=int, default=256)
    parser.add_argument("--random-teacher", action="store_true")
    parser.add_argument("--size", type=int, default=0)
    args = parser.parse_intermixed_args(argv)
    recipe, _, loaders = build.setup(args.recipe, ["run.cpu=true", *args.overrides])
    levels = build.quest_levels(recipe)
    layers, pools = build.teacher_layers(levels)
    if args.random_teacher:
        torch.manual_seed(0)
        model = build_model(recipe.teacher.arch, loaders.num_classes, loaders.in_channels)
        teacher = FrozenTeacher(model, layers[:1], pools[:1])
        size = args.size or loaders.image_size
        g = torch.Generator().manual_seed(0)
        images = [
            torch.randn(min(16, args.images - i), loaders.in_channels, size, size, generator=g)
            for i in range(0, args.images, 16)
        ]
    else:
        teacher = build.build_teacher(recipe.teacher, levels, build.input_shape(loaders))
        images, seen = [], 0
        for x, _ in loaders.eval:
            images.append(x[: args.images - seen])
            seen += images[-1].shape[0]
            if seen >= args.images:
                break
    f32, f16 = features(teacher, images, False), features(teacher, images, True)
    book = fit_kmeans(f32, args.words, 20, seed=0, gpu=False).centroids
    beta = levels[0].beta
    p32, p16 = soft_assign(f32, book, beta), soft_assign(f16, book, beta)
    kl = (p32 * (p32.clamp_min(1e-12).log() - p16.clamp_min(1e-12).log())).sum(1).mean()
    result = {
        "map": f"{f32.shape[0]} vectors x {f32.shape[1]} dims ({len(images)} batches)",
        "argmax_agreement": float((p32.argmax(1) == p16.argmax(1)).float().mean()),
        "kl_nats": float(kl),
        "max_prob_fp32": float(p32.max(1).values.mean()),
    }
    for k, v in result.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return result


if __name__ == "__main__":
    main()
