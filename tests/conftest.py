"""Shared test helpers: tiny recipes on synthetic data, and a clean Accelerate state per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and it does not stall when another process holds
    the other core (two spinning OpenMP threads then take seconds per forward)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean slate."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write_recipe(path: Path, sections: dict) -> Path:
    """Write {"seed": 0, "data": {...}, ...} as TOML."""
    lines = [f"{k} = {toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    for name, table in sections.items():
        if isinstance(table, dict):
            lines += [f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny(
    tmp_path: Path,
    name: str,
    method: str = "none",
    arch: str = "resnet8",
    teacher: Path | None = None,
    **overrides,
) -> Path:
    """A recipe for a few-second run on the synthetic 4-class task at 16 px."""
    sections = {
        "name": name,
        "seed": 0,
        "run": {"dir": str(tmp_path / name), "log_every": 4, "channels_last": False},
        "data": {
            "dataset": "synthetic",
            "batch_size": 32,
            "num_workers": 0,
            "image_size": 16,
            "synthetic_size": 256,
        },
        "student": {"arch": arch},
        "distill": {"method": method},
        "optim": {"epochs": 3, "lr": 0.05},
    }
    if method != "none":
        sections["teacher"] = {
            "arch": "resnet8",
            "checkpoint": str(teacher or tmp_path / "teacher" / "student.pt"),
        }
        sections["codebook"] = {"path": str(tmp_path / "codebook.pt"), "size": 16, "iterations": 5}
    for key, value in overrides.items():
        section, field = key.split("__")
        sections.setdefault(section, {})[field] = value
    return write_recipe(tmp_path / f"{name}.toml", sections)


def chained(tmp_path: Path, method: str = "kd", **overrides) -> Path:
    """A student recipe whose teacher checkpoint is missing and is trained first by a one-epoch
    teacher recipe (teacher.recipe); returns the student's recipe."""
    teacher_recipe = tiny(tmp_path, "t", optim__epochs=1, **overrides)
    return tiny(
        tmp_path,
        "s",
        method=method,
        teacher=tmp_path / "missing.pt",
        optim__epochs=1,
        teacher__recipe=str(teacher_recipe),
        teacher__min_top1=0.0,
        **overrides,
    )


def synthetic_shards(tmp_path: Path, shard_size: int = 64, val_shard_size: int = 32) -> dict:
    """The synthetic task (256 train / 64 val, 16 px) as PNG class folders under tmp_path/folder
    and shards under tmp_path/wds; returns the data.train_shards / data.val_shards patterns."""
    from torchvision.io import encode_png

    from quest import data, shards

    for split, size, seed in (("train", 256, 1234), ("val", 64, 1235)):
        images = data.synthetic(size, 4, 3, 16, seed=seed)
        for i, (img, label) in enumerate(zip(images.images, images.labels)):
            folder = tmp_path / "folder" / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"img{i}.png").write_bytes(encode_png(img).numpy().tobytes())
    index = shards.convert(
        tmp_path / "folder",
        tmp_path / "wds",
        shard_size=shard_size,
        val_shard_size=val_shard_size,
        workers=1,
        progress=False,
    )
    assert index["splits"]["train"]["total"] == 256 and index["splits"]["val"]["total"] == 64
    return {
        "train_shards": str(tmp_path / "wds" / index["splits"]["train"]["pattern"]),
        "val_shards": str(tmp_path / "wds" / index["splits"]["val"]["pattern"]),
    }


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory) -> Path:
    """A resnet8 teacher trained once on the synthetic task; returns its student.pt."""
    from quest import train

    root = tmp_path_factory.mktemp("teacher")
    recipe = tiny(root, "teacher", optim__epochs=4)
    train.main([str(recipe)])
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return root / "teacher" / "student.pt"
