"""Metrics to three sinks: one stdout line, run_dir/metrics.jsonl, and W&B when enabled.
Only the main process writes. Also draws curves.png from metrics.jsonl at the end of a run."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import torch

from . import artifacts


class MetricLogger:
    def __init__(
        self,
        accelerator,
        run_dir: Path,
        recipe_dict: dict,
        wandb: bool,
        project: str,
        name: str,
        wandb_after: int = -1,
    ):
        """wandb_after: the last step an earlier attempt of this run logged; W&B already holds the
        records up to it (the same values on a deterministic resume), so they are not sent twice."""
        self.accelerator, self.run_dir = accelerator, Path(run_dir)
        self.main = accelerator.is_main_process
        self.wandb, self.wandb_after = wandb, wandb_after
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if wandb:
            # The id lives in the run directory so a restarted (requeued) run re-attaches to its W&B run.
            id_file = self.run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            if self.main and not id_file.exists():
                artifacts.save_text(run_id + "\n", id_file)
            accelerator.init_trackers(
                project,
                config=recipe_dict,
                init_kwargs={
                    "wandb": {
                        "id": run_id,
                        "resume": "allow",
                        "dir": str(self.run_dir),
                        "name": name,
                    }
                },
            )
            if self.main:
                run = accelerator.get_tracker("wandb", unwrap=True)
                # Steps replayed after a resume would be dropped by W&B's own step: use ours.
                run.define_metric("step")
                run.define_metric("*", step_metric="step")

    def log(self, values: dict, kind: str = "train") -> None:
        if not self.main:
            return
        record = {"kind": kind, **{k: _plain(v) for k, v in values.items()}}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(format_line(record), flush=True)
        if self.wandb and record.get("step", 0) > self.wandb_after:
            self.accelerator.log(
                {f"{kind}/{k}" if k != "step" else k: v for k, v in record.items() if k != "kind"}
            )

    def close(self) -> None:
        if not self.wandb:
            return
        self.accelerator.end_training()  # run.finish() on the main process
        if self.main:
            # run.finish() returns once W&B's service process (wandb-core) has acknowledged the exit
            # record, but the service writes the run's last block of records (offline:
            # run-ID.wandb) only when it closes the run's stream, on a finish request that the SDK
            # sends without waiting. teardown() waits until the service has closed every stream and
            # exited, so all records are on disk when the trainer returns.
            import wandb

            wandb.teardown()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return round(v, 6) if isinstance(v, float) and math.isfinite(v) else v


def format_line(record: dict) -> str:
    parts = [record["kind"]]
    for k, v in record.items():
        if k == "kind":
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def drop_after(run_dir: Path, step: int) -> int:
    """Remove the records of steps after `step` (a resumed run replays them) from metrics.jsonl;
    returns the last step the file held before (-1 when none)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = read_metrics(run_dir)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) < len(records):
        artifacts.save_text("".join(json.dumps(r) + "\n" for r in kept), path)
    return max((r.get("step", 0) for r in records), default=-1)


# curves.png: one panel per quantity, in this order, each drawn only when some record holds one of
# its keys (a plain supervised or KD run has no codebook diagnostics). Keys: "name" matches exactly,
# "name*" matches name and its per-level variants (quest_1, agreement_1, ...), each its own line.
# (title, y label, record kind, keys, y scale: "log", "linear" or "auto" = log when it spans 20x)
PANELS = (
    ("training loss", "loss", "train", ("loss", "ce", "quest*", "kd"), "log"),
    ("evaluation accuracy", "accuracy (%)", "eval", ("top1", "top5"), "linear"),
    ("learning rate", "learning rate", "train", ("lr",), "auto"),
    (
        "word agreement, student vs teacher",
        "fraction of locations",
        "train",
        ("agreement*",),
        "linear",
    ),
    ("target perplexity (words in use)", "perplexity", "train", ("perplexity*",), "linear"),
    ("γ (cosine-head scale)", "γ", "train", ("gamma*",), "linear"),
)


def _matches(key: str, pattern: str) -> bool:
    return key.startswith(pattern[:-1]) if pattern.endswith("*") else key == pattern


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def curve_series(records: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """What curves.png draws: panel title -> series (the record key) -> [(step, value)], panels in
    PANELS order. Non-finite and non-numeric values are left out, and so is a panel without points."""
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for title, _, kind, patterns, _ in PANELS:
        rows = [r for r in records if r.get("kind") == kind and _number(r.get("step"))]
        series: dict[str, list[tuple[int, float]]] = {}
        for pattern in patterns:
            keys = {k for r in rows for k in r if k != "step" and _matches(k, pattern)}
            for key in sorted(keys, key=lambda k: (len(k), k)):  # quest, quest_0, ..., quest_10
                points = [(r["step"], r[key]) for r in rows if _number(r.get(key))]
                if points and key not in series:
                    series[key] = points
        if series:
            panels[title] = series
    return panels


def run_title(run_dir: Path) -> str:
    """The run's name: recipe.json "name" when the run directory has one, else the folder name."""
    run_dir = Path(run_dir)
    try:
        name = json.loads((run_dir / "recipe.json").read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) and name else run_dir.resolve().name


def curves_figure(records: list[dict], title: str):
    """The matplotlib figure of curve_series(records): a grid of up to 3 panels a row, all against
    the optimizer step; the run's name as its title. None when there is nothing to draw."""
    panels = curve_series(records)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = {p[0]: p for p in PANELS}
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows + 0.5), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (name, series) in zip(axes.flat, panels.items()):
        _, ylabel, kind, _, scale = specs[name]
        for key, points in series.items():
            ax.plot(*zip(*points), label=key, marker="o" if kind == "eval" else None, ms=3)
        values = [v for points in series.values() for _, v in points]
        positive = min(values) > 0
        if positive and (scale == "log" or (scale == "auto" and max(values) >= 20 * min(values))):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(run_dir: Path) -> Path | None:
    """curves.png in run_dir from its metrics.jsonl (see curves_figure); None when there are no
    records to draw."""
    fig = curves_figure(read_metrics(run_dir), run_title(run_dir))
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    out = Path(run_dir) / "curves.png"
    artifacts.atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out


def reduce_mean(accelerator, values: dict[str, torch.Tensor], n: int) -> dict[str, float]:
    """Mean over ranks of each value divided by n (one host sync per key, at log steps only)."""
    return {k: float(accelerator.reduce(v.detach().float(), "mean")) / n for k, v in values.items()}
