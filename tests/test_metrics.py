"""curves.png: the run's name as its title, the loss parts, the evaluation accuracy, the learning
rate and, for QuEST runs, the codebook diagnostics (word agreement, target perplexity, γ) per level."""

from __future__ import annotations

import json
import math
from pathlib import Path

from quest.metrics import curve_series, curves_figure, plot_curves, run_title

QUEST_PANELS = [
    "training loss",
    "evaluation accuracy",
    "learning rate",
    "word agreement, student vs teacher",
    "target perplexity (words in use)",
    "γ (cosine-head scale)",
]


def quest_records(levels: int = 1) -> list[dict]:
    """metrics.jsonl records as quest.train writes them for a QuEST run of 2 epochs of 4 steps."""
    records = []
    for step in (2, 4, 6, 8):
        record = {"kind": "train", "step": step, "epoch": (step - 1) // 4, "lr": 0.1 / step}
        record.update(loss=2.0 / step, ce=1.5 / step, quest=0.5 / step, grad_norm=1.0)
        for level in range(levels):
            suffix = f"_{level}" if level else ""
            if levels > 1:
                record[f"quest_{level}"] = 0.25 / step
            record[f"agreement{suffix}"] = 0.1 * step / 8 + level
            record[f"perplexity{suffix}"] = 10.0 + step + level
            record[f"max_prob{suffix}"] = 0.5
            record[f"gamma{suffix}"] = 3.0 + step / 100
        record["img_per_s"] = 1000.0
        records.append(record)
        if step % 4 == 0:
            records.append(
                {
                    "kind": "eval",
                    "step": step,
                    "epoch": step // 4,
                    "top1": 40.0 + step,
                    "top5": 80.0 + step,
                    "loss": 1.0,
                    "count": 64,
                    "best_top1": 40.0 + step,
                }
            )
    return records


def kd_records() -> list[dict]:
    """A Hinton-KD run: loss parts ce and kd, no codebook diagnostics."""
    return [
        {"kind": "train", "step": 4, "epoch": 0, "lr": 0.1, "loss": 1.0, "ce": 0.6, "kd": 0.4},
        {"kind": "train", "step": 8, "epoch": 1, "lr": 0.01, "loss": 0.8, "ce": 0.5, "kd": 0.3},
        {"kind": "eval", "step": 8, "epoch": 2, "top1": 55.0, "top5": 95.0, "count": 64},
    ]


def write_run(run_dir: Path, records: list[dict], name: str | None = "my-quest-run") -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if name is not None:
        (run_dir / "recipe.json").write_text(json.dumps({"name": name, "seed": 0}))
    return run_dir


def test_quest_run_has_every_panel_with_its_points():
    panels = curve_series(quest_records())
    assert list(panels) == QUEST_PANELS
    assert list(panels["training loss"]) == ["loss", "ce", "quest"]
    assert panels["training loss"]["loss"] == [(2, 1.0), (4, 0.5), (6, 2 / 6), (8, 0.25)]
    assert panels["evaluation accuracy"] == {
        "top1": [(4, 44.0), (8, 48.0)],
        "top5": [(4, 84.0), (8, 88.0)],
    }
    assert panels["learning rate"] == {"lr": [(2, 0.05), (4, 0.025), (6, 0.1 / 6), (8, 0.0125)]}
    assert panels["word agreement, student vs teacher"] == {
        "agreement": [(2, 0.025), (4, 0.05), (6, 0.1 * 6 / 8), (8, 0.1)]
    }
    assert panels["target perplexity (words in use)"] == {
        "perplexity": [(2, 12.0), (4, 14.0), (6, 16.0), (8, 18.0)]
    }
    assert [v for _, v in panels["γ (cosine-head scale)"]["gamma"]] == [3.02, 3.04, 3.06, 3.08]
    drawn = {key for series in panels.values() for key in series}
    assert not drawn & {"grad_norm", "img_per_s", "max_prob", "epoch", "count", "best_top1"}


def test_every_level_is_its_own_line():
    panels = curve_series(quest_records(levels=3))
    assert list(panels["training loss"]) == ["loss", "ce", "quest", "quest_0", "quest_1", "quest_2"]
    assert list(panels["word agreement, student vs teacher"]) == [
        "agreement",
        "agreement_1",
        "agreement_2",
    ]
    assert list(panels["target perplexity (words in use)"]) == [
        "perplexity",
        "perplexity_1",
        "perplexity_2",
    ]
    assert list(panels["γ (cosine-head scale)"]) == ["gamma", "gamma_1", "gamma_2"]
    assert panels["target perplexity (words in use)"]["perplexity_2"][0] == (2, 14.0)


def test_kd_and_supervised_runs_have_no_diagnostics_panels():
    panels = curve_series(kd_records())
    assert list(panels) == ["training loss", "evaluation accuracy", "learning rate"]
    assert list(panels["training loss"]) == ["loss", "ce", "kd"]
    supervised = [
        {k: v for k, v in r.items() if k not in ("kd", "loss")} for r in kd_records()
    ]  # a record with ce alone
    assert list(curve_series(supervised)["training loss"]) == ["ce"]
    assert curve_series([]) == {}


def test_non_finite_and_non_numeric_values_are_left_out():
    records = quest_records()
    train = [r for r in records if r["kind"] == "train"]  # steps 2, 4, 6, 8
    train[0]["loss"] = math.nan
    train[1]["agreement"] = math.inf
    train[2]["gamma"] = None
    train[3]["perplexity"] = True
    records.append({"kind": "train", "lr": 0.5})  # no step: not drawn
    panels = curve_series(records)
    assert [s for s, _ in panels["training loss"]["loss"]] == [4, 6, 8]
    assert [s for s, _ in panels["word agreement, student vs teacher"]["agreement"]] == [2, 6, 8]
    assert [s for s, _ in panels["γ (cosine-head scale)"]["gamma"]] == [2, 4, 8]
    assert [s for s, _ in panels["target perplexity (words in use)"]["perplexity"]] == [2, 4, 6]
    assert [s for s, _ in panels["learning rate"]["lr"]] == [2, 4, 6, 8]


def test_plot_curves_writes_a_png_titled_with_the_run_name(tmp_path):
    run_dir = write_run(tmp_path / "run", quest_records(levels=2))
    out = plot_curves(run_dir)
    assert out == run_dir / "curves.png"
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and out.stat().st_size > 10_000
    assert run_title(run_dir) == "my-quest-run"


def test_the_figure_draws_what_curve_series_says():
    import matplotlib.pyplot as plt

    records = quest_records(levels=2)
    fig = curves_figure(records, "my-quest-run")
    try:
        assert fig._suptitle.get_text() == "my-quest-run"
        axes = [ax for ax in fig.axes if ax.get_visible()]
        panels = curve_series(records)
        assert [ax.get_title() for ax in axes] == list(panels)
        for ax, series in zip(axes, panels.values()):
            assert [line.get_label() for line in ax.get_lines()] == list(series)
            for line, points in zip(ax.get_lines(), series.values()):
                assert list(zip(line.get_xdata(), line.get_ydata())) == points
        scales = {ax.get_title(): ax.get_yscale() for ax in axes}
        assert scales["training loss"] == "log" and scales["evaluation accuracy"] == "linear"
    finally:
        plt.close(fig)
    kd = curves_figure(kd_records(), "kd")
    try:
        assert [ax.get_title() for ax in kd.axes if ax.get_visible()] == [
            "training loss",
            "evaluation accuracy",
            "learning rate",
        ]
    finally:
        plt.close(kd)


def test_title_falls_back_to_the_folder_name(tmp_path):
    assert run_title(write_run(tmp_path / "no-recipe", kd_records(), name=None)) == "no-recipe"
    broken = write_run(tmp_path / "broken", kd_records(), name=None)
    (broken / "recipe.json").write_text("{not json")
    assert run_title(broken) == "broken"
    listed = write_run(tmp_path / "listed", kd_records(), name=None)
    (listed / "recipe.json").write_text("[1, 2]")
    assert run_title(listed) == "listed"
    assert plot_curves(listed).exists()


def test_no_records_no_png(tmp_path):
    run_dir = write_run(tmp_path / "empty", [])
    assert plot_curves(run_dir) is None
    assert not (run_dir / "curves.png").exists()
