"""The inspection tool and the benchmarks stay runnable (tiny sizes, no timing assertions)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny

from quest import train, visual_words

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_inspect_draws_the_most_used_words(tmp_path, trained_teacher):
    recipe = tiny(tmp_path, "q", method="quest", teacher=trained_teacher, optim__epochs=1)
    train.main([str(recipe)])
    out = visual_words.main([str(recipe), "--images", "40", "--words", "3", "--patches", "4"])
    assert (out["out"] / "words.png").stat().st_size > 0 and (
        out["out"] / "usage.png"
    ).stat().st_size > 0
    h, w = out["grid"]
    assert (h, w) == (4, 4)  # resnet8 layer3 at 16 px
    assert (
        int(out["usage"].sum()) == out["images"] * h * w == 40 * 16
    )  # every location assigned once
    counts = out["usage"][out["top"]]
    assert torch.all(counts[:-1] >= counts[1:]) and int(counts[0]) == int(out["usage"].max())


def run_tool(script: str, *args: str, timeout: int = 300) -> list[str]:
    """tools/<script> in a subprocess, as a user runs it; its stdout lines."""
    out = subprocess.run(
        [sys.executable, f"tools/{script}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_bench_step_runs_and_prints_the_ratio(tmp_path):
    recipe = tiny(tmp_path, "b", method="quest", teacher=tmp_path / "unused.pt")
    args = "--batch 4 --warmup 0 --repeats 1 --kmeans 2000,16,8"
    lines = run_tool("bench_step.py", str(recipe), *args.split())
    assert lines[-1].startswith("quest/reference = ")
    assert float(lines[-1].split("=")[1]) > 0
    assert any(line.startswith("original") for line in lines) and any(
        line.startswith("quest ") for line in lines
    )
    assert any("% of the quest step" in line for line in lines) and any(
        "fit_kmeans" in line for line in lines
    )


def test_bench_codebook_times_n_and_4n_and_prints_the_scaling():
    lines = run_tool("bench_codebook.py", "--n", "20000", "--repeats", "1")
    assert lines[-1].startswith("collect_scaling = ") and float(lines[-1].split("=")[1]) > 0
    assert lines[-2].startswith("peak/kept = ") and float(lines[-2].split("=")[1].split()[0]) > 0
    rows = [line.split() for line in lines if line.startswith(("N ", "4N "))]
    assert [r[0] for r in rows] == ["N", "4N"]
    assert [int(r[1].replace(",", "")) for r in rows] == [20000, 80000]
    assert all(float(x) > 0 for r in rows for x in r[2:])


def test_bench_data_times_every_side_on_the_same_images(tmp_path):
    args = "--images 48 --classes 3 --width 64 --height 48 --size 32 --batch 8 --workers 1"
    args += f" --repeats 1 --pil-shards --shard-size 20 --work {tmp_path}"
    lines = run_tool("bench_data.py", *args.split())
    assert lines[0].startswith("48 JPEGs") and ", 3 shards," in lines[0]
    sides = [line.split(":")[0].strip() for line in lines if "images/s" in line]
    assert sides == ["folder", "shards", "shards+PIL"]
    assert lines[-1].startswith("shards/folder = ") and float(lines[-1].split("=")[1]) > 0


def test_results_table_runs_every_method_over_seeds_side_by_side(tmp_path, trained_teacher):
    recipes_dir = tmp_path / "recipes"
    recipes_dir.mkdir()
    for name, method in [
        ("student_alone", "none"),
        ("kd", "kd"),
        ("quest", "quest"),
        ("quest_kd", "quest+kd"),
    ]:
        tiny(recipes_dir, name, method=method, teacher=trained_teacher, optim__epochs=1)
    out_dir = tmp_path / "out"
    args = f"--recipes {recipes_dir} --seeds 2 --jobs 2 --out {out_dir}"
    run_tool("results_table.py", *args.split(), timeout=600)
    assert (recipes_dir / "codebook.pt").exists()  # built once, before the parallel runs
    table = (out_dir / "results.md").read_text()
    for slug, label in [("student_alone", "student alone"), ("kd", "KD"), ("quest", "QuEST")]:
        top1 = [
            json.loads((out_dir / slug / f"seed{s}" / "summary.json").read_text())["top1"]
            for s in (0, 1)
        ]
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} ("))
        mean, std = statistics.mean(top1), statistics.stdev(top1)
        assert f"**{mean:.2f} ± {std:.2f}**" in row and f"{top1[0]:.2f}, {top1[1]:.2f}" in row
    assert (out_dir / "results.png").stat().st_size > 0
    assert "2 runs at a time" in table
