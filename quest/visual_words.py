"""What the teacher's visual words look like.

    python -m quest.visual_words RECIPE [--images 2000] [--words 8] [--patches 8] [--out DIR]

For the most used words of the recipe's (first-level) codebook, draws the input patches whose teacher
feature is nearest to the word (the image region under that feature-map location, with some context),
and a histogram of codeword usage. Writes words.png and usage.png (default: run.dir/inspect/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import artifacts
from .codebook import load_codebook
from .data import STATS, family
from .kmeans import assign_chunked
from .losses import flatten_locations, perplexity


@torch.no_grad()
def collect(teacher, loader, centroids, max_images: int, device):
    """Per location: (image index, row, col, word, squared distance); the images themselves (CPU)."""
    images, records = [], []
    seen = 0
    for x, _ in loader:
        x = x[: max_images - seen]
        _, maps = teacher(x.to(device))
        fmap = maps[0]
        words, dist = assign_chunked(flatten_locations(fmap).float(), centroids)
        b, _, h, w = fmap.shape
        idx = torch.arange(b * h * w)
        records.append(
            torch.stack(
                [idx // (h * w) + seen, (idx // w) % h, idx % w, words.cpu(), dist.cpu()], dim=1
            )
        )
        images.append(x.cpu())
        seen += b
        if seen >= max_images:
            break
    return torch.cat(images), torch.cat(records), (h, w)


def patch(
    image: torch.Tensor, row: int, col: int, grid: tuple[int, int], context: float = 4.0
) -> torch.Tensor:
    """The image region under feature location (row, col) of an h×w map, enlarged `context` times."""
    _, H, W = image.shape
    h, w = grid
    cy, cx = (row + 0.5) * H / h, (col + 0.5) * W / w
    ry, rx = context * H / h / 2, context * W / w / 2
    y0, y1 = max(0, round(cy - ry)), min(H, round(cy + ry))
    x0, x1 = max(0, round(cx - rx)), min(W, round(cx + rx))
    return image[:, y0:y1, x0:x1]


def main(argv: list[str] | None = None) -> dict:
    from .build import build_teacher, feature_loader, input_shape, quest_levels, setup

    parser = argparse.ArgumentParser(prog="python -m quest.visual_words", description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument(
        "--images", type=int, default=2000, help="training images passed through the teacher"
    )
    parser.add_argument("--words", type=int, default=8, help="most used words to draw")
    parser.add_argument("--patches", type=int, default=8, help="patches per word")
    parser.add_argument("--out", help="output folder (default run.dir/inspect)")
    args = parser.parse_args(argv)
    recipe, accelerator, loaders = setup(args.recipe, args.overrides)
    levels = quest_levels(recipe)
    teacher = build_teacher(recipe.teacher, levels, input_shape(loaders), accelerator.device)
    level = levels[0]
    book = load_codebook(level.codebook)
    loader = feature_loader(recipe.data, seed=recipe.seed, rank=0, world=1, max_images=args.images)
    images, rec, grid = collect(
        teacher, loader, book.centroids.to(accelerator.device), args.images, accelerator.device
    )
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in STATS[family(recipe.data)])
    images = (images * std + mean).clamp(0, 1)
    k = book.centroids.shape[0]
    usage = torch.bincount(rec[:, 3].long(), minlength=k)
    top = usage.argsort(descending=True)[: args.words].tolist()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out or Path(recipe.run.dir) / "inspect")
    fig, axes = plt.subplots(
        len(top), args.patches, figsize=(1.3 * args.patches, 1.4 * len(top)), squeeze=False
    )
    for r, word in enumerate(top):
        mine = rec[rec[:, 3] == word]
        mine = mine[mine[:, 4].argsort()]  # nearest to the word first
        chosen, used = [], set()
        for row in mine.tolist():  # one patch per image, nearest first
            if int(row[0]) not in used:
                used.add(int(row[0]))
                chosen.append(row)
            if len(chosen) == args.patches:
                break
        for c in range(args.patches):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(chosen):
                img_i, row_i, col_i = (int(v) for v in chosen[c][:3])
                p = patch(images[img_i], row_i, col_i, grid)
                ax.imshow(
                    p.permute(1, 2, 0).squeeze(-1).numpy(),
                    cmap="gray" if p.shape[0] == 1 else None,
                    vmin=0,
                    vmax=1,
                )
        axes[r][0].set_title(
            f"word {word} ({100 * usage[word] / usage.sum():.1f} %)", fontsize=7, loc="left"
        )
    fig.suptitle(
        f"{recipe.teacher.arch} {level.teacher_layer}: the most used of {k} words, nearest patches",
        fontsize=9,
    )
    fig.tight_layout()
    artifacts.atomic_write(out / "words.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(k), usage.sort(descending=True).values.numpy() / usage.sum().item(), width=1.0)
    ax.set_xlabel("visual word (sorted by usage)")
    ax.set_ylabel("fraction of locations")
    ax.set_title(
        f"codeword usage: {int((usage > 0).sum())} of {k} words used, "
        f"perplexity {perplexity(usage / usage.sum()):.0f}"
    )
    fig.tight_layout()
    artifacts.atomic_write(out / "usage.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    print(f"wrote {out / 'words.png'} and {out / 'usage.png'}")
    return {"usage": usage, "top": top, "out": out, "grid": grid, "images": images.shape[0]}


if __name__ == "__main__":
    from .build import cli

    cli(main)
