"""The end of a run: summary.json, student.pt, curves.png and the table on stdout, written from the
final checkpoint's state alone (a run re-entered after it finished writes the same files)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import artifacts, checkpoint
from . import recipe as recipes
from .errors import TrainingError
from .metrics import plot_curves
from .recipe import Recipe


def finish(recipe: Recipe, accelerator, student, state: checkpoint.LoopState, loaders) -> dict:
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
    method = summary["method"]
    who = (
        f"{recipe.student.arch} trained alone"
        if method == "none"
        else f"student {recipe.student.arch} ({method})"
    )
    rows.append((who, f"{summary['top1']:.2f}"))
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
