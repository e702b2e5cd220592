"""Metrics to three sinks: one stdout line, run_dir/metrics.jsonl, and W&B when enabled.
Only the main process writes. Also draws curves.png from metrics.jsonl at the end of a run."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

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


def plot_curves(run_dir: Path) -> Path | None:
    """curves.png: training loss (and its parts) per step, evaluation top-1 per epoch."""
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "ce", "quest", "kd"):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            ax1.plot(*zip(*pts), label=key)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_yscale("log")
    ax1.legend()
    if evals:
        ax2.plot([r["epoch"] for r in evals], [r["top1"] for r in evals], marker="o", label="top-1")
        ax2.plot([r["epoch"] for r in evals], [r["top5"] for r in evals], marker=".", label="top-5")
        ax2.legend()
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("evaluation accuracy (%)")
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    artifacts.atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out
