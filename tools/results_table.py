"""Regenerate the Fashion-MNIST results table: student alone vs KD vs QuEST vs QuEST + KD, over seeds.

    python tools/results_table.py [--seeds 3] [--epochs N] [--jobs N] [--out runs/results]
                                  [--recipes recipes/fashion_mnist] [section.key=value ...]

Trains the teacher once (recipes/fashion_mnist/teacher.toml, reused when its student.pt exists) and
builds the QuEST codebook once (reused when present), then runs every method recipe of
recipes/fashion_mnist/ for each seed, `--jobs` at a time (each a `python -m quest.train` process with
cores/jobs threads: the same code path as any run; on few cores, single-threaded runs side by side
beat one run on every core). Writes OUT/results.md (last-epoch top-1 mean ± std, per-seed values,
wall time per run and per stage, codebook diagnostics) and OUT/results.png (bars with ±1 std).
Extra `section.key=value` arguments apply to every student run (e.g. data.per_class=600).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quest import artifacts  # noqa: E402
from quest import recipe as recipes  # noqa: E402
from quest.codebook import kmeans_seed  # noqa: E402

METHODS = [  # (label, recipe file in --recipes)
    ("student alone", "student_alone.toml"),
    ("KD", "kd.toml"),
    ("QuEST", "quest.toml"),
    ("QuEST + KD", "quest_kd.toml"),
]


def run(module: str, recipe: str, overrides: list[str], threads: int) -> None:
    env = {
        **os.environ,
        "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
    }
    cmd = [sys.executable, "-m", module, recipe, *overrides]
    print(f"$ OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {' '.join(cmd)}", flush=True)  # one write
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")


def train(recipe: str, overrides: list[str], threads: int) -> dict:
    run("quest.train", recipe, overrides, threads)
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.dir="))
    return json.loads((REPO / run_dir / "summary.json").read_text())


def prepare_teacher_and_codebook(quest_recipe: str, common: list[str], threads: int) -> dict:
    """Train the teacher and build the codebook once, before the parallel student runs (which
    would otherwise race to create them). Returns the seconds each stage took (0 when reused)."""
    seconds = {"teacher": 0.0, "codebook": 0.0}
    r = recipes.load(quest_recipe, common)
    if not (REPO / r.teacher.checkpoint).exists():
        if not r.teacher.recipe:
            sys.exit(f"no teacher at {r.teacher.checkpoint} and no teacher.recipe to train one")
        t = time.time()
        run("quest.train", r.teacher.recipe, [], threads)
        seconds["teacher"] = time.time() - t
    if not (REPO / r.codebook.path).exists():
        t = time.time()
        run("quest.codebook", quest_recipe, common, threads)
        seconds["codebook"] = time.time() - t
    return seconds


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value for every student run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--epochs", type=int, default=0, help="override optim.epochs of the student runs"
    )
    parser.add_argument("--out", default="runs/results")
    parser.add_argument(
        "--recipes",
        default="recipes/fashion_mnist",
        help="folder with student_alone.toml, kd.toml, quest.toml and quest_kd.toml",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="student runs side by side, each with cores/jobs threads (default: one per core)",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    t0 = time.time()
    out = Path(args.out)
    cores = os.cpu_count() or 1
    common = list(args.overrides) + ([f"optim.epochs={args.epochs}"] if args.epochs else [])
    methods = [(label, str(Path(args.recipes) / name)) for label, name in METHODS]
    quest_recipe = str(
        Path(args.recipes) / "quest.toml"
    )  # the teacher, codebook and K of the table
    # Every seed reuses the one codebook: pin its k-means seed (codebook.seed = -1 follows the run's
    # seed, and an artifact built with another seed is refused).
    table_recipe = recipes.load(quest_recipe, common)
    same_codebook = f"codebook.seed={kmeans_seed(table_recipe.codebook, table_recipe.seed)}"
    try:
        stage_s = prepare_teacher_and_codebook(quest_recipe, common, threads=cores)
    except RuntimeError as e:
        sys.exit(str(e))
    t_students = time.time()

    def student(job: tuple[str, int]) -> dict:
        recipe, seed = job
        run_dir = out / Path(recipe).stem / f"seed{seed}"
        summary_file = REPO / run_dir / "summary.json"
        if summary_file.exists():  # a finished run is reused: the table can be resumed
            return json.loads(summary_file.read_text())
        overrides = [f"seed={seed}", f"run.dir={run_dir}", *common, same_codebook]
        return train(recipe, overrides, threads=max(1, cores // args.jobs))

    jobs = [(recipe, seed) for _, recipe in methods for seed in range(args.seeds)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        try:
            done = list(pool.map(student, jobs))
        except RuntimeError as e:
            sys.exit(str(e))
    stage_s["students"] = time.time() - t_students
    rows = [
        (label, recipe, done[i * args.seeds : (i + 1) * args.seeds])
        for i, (label, recipe) in enumerate(methods)
    ]
    teacher_top1 = rows[2][2][0]["teacher_top1"]  # measured by the QuEST runs on the full test set
    r0 = recipes.load(quest_recipe, common)
    lines = [
        "# Fashion-MNIST: QuEST vs KD vs student alone",
        "",
        f"Teacher {r0.teacher.arch} ({r0.teacher.checkpoint}): top-1 {teacher_top1:.2f} % on the 10,000 test images.",
        f"Student {r0.student.arch}, {r0.optim.epochs} epochs, {args.seeds} seeds (0..{args.seeds - 1}); "
        f"last-epoch top-1 on the test set, mean ± std. Extra settings: {' '.join(common) or 'none'}.",
        "",
        "| method | top-1 (%) mean ± std | per seed | wall s / run | word agreement | target perplexity | max target prob |",
        "|---|---|---|---|---|---|---|",
    ]
    stats = []
    for label, recipe, summaries in rows:
        top1 = [s["top1"] for s in summaries]
        m, sd = mean_std(top1)
        stats.append((label, m, sd))
        wall = statistics.mean(s["wall_s"] for s in summaries)
        diag = [
            f"{statistics.mean(s[k] for s in summaries):.3g}" if f"{k}" in summaries[0] else "–"
            for k in ("final_agreement", "final_perplexity", "final_max_prob")
        ]
        per_seed = ", ".join(f"{v:.2f}" for v in top1)
        lines.append(
            f"| {label} (`{recipe}`) | **{m:.2f} ± {sd:.2f}** | {per_seed} | {wall:.0f} | {' | '.join(diag)} |"
        )
    lines += [
        "",
        f"Generated by `python tools/results_table.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
        f"in {time.time() - t0:.0f} s on {cores} CPU cores, {args.jobs} runs at a time "
        f"(teacher {stage_s['teacher']:.0f} s, codebook {stage_s['codebook']:.0f} s, "
        f"student runs {stage_s['students']:.0f} s; 0 = reused, as are finished runs).",
    ]
    artifacts.save_text("\n".join(lines) + "\n", out / "results.md")
    plot(stats, teacher_top1, out / "results.png")
    print("\n".join(lines))


def plot(stats, teacher_top1, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels, means, stds = zip(*stats)
    ax.bar(
        labels,
        means,
        yerr=stds,
        capsize=6,
        color=["#999999", "#4c72b0", "#dd8452", "#55a868"][: len(labels)],
    )
    if teacher_top1 is not None:
        ax.axhline(
            teacher_top1,
            color="k",
            linestyle="--",
            linewidth=1,
            label=f"teacher {teacher_top1:.2f}",
        )
        ax.legend(loc="lower right")
    low = min(m - s for _, m, s in stats)
    ax.set_ylim(max(0, low - 2), max(max(means) + max(stds), teacher_top1 or 0) + 1)
    ax.set_ylabel("test top-1 (%), mean ± std")
    fig.tight_layout()
    artifacts.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


if __name__ == "__main__":
    main()
