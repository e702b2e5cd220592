"""The inspection tool and the step benchmark stay runnable (tiny sizes, no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny

from quest import inspect, train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_inspect_draws_the_most_used_words(tmp_path, trained_teacher):
    recipe = tiny(tmp_path, "q", method="quest", teacher=trained_teacher, optim__epochs=1)
    train.main([str(recipe)])
    out = inspect.main([str(recipe), "--images", "40", "--words", "3", "--patches", "4"])
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


def test_bench_step_runs_and_prints_the_ratio(tmp_path):
    recipe = tiny(tmp_path, "b", method="quest", teacher=tmp_path / "unused.pt")
    out = subprocess.run(
        [
            sys.executable,
            "tools/bench_step.py",
            str(recipe),
            "--batch",
            "4",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--kmeans",
            "2000,16,8",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("quest/reference = ")
    assert float(lines[-1].split("=")[1]) > 0
    assert any(line.startswith("original") for line in lines) and any(
        line.startswith("quest ") for line in lines
    )
    assert any("% of the quest step" in line for line in lines) and any(
        "fit_kmeans" in line for line in lines
    )
