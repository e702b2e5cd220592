"""Your own image folder: the README's commands run as written on a synthetic folder; the transform
family is chosen from the images (and said), never a silent fall back to 224-px ImageNet crops;
data.flip with a no-flip default for digits; a missing split names the expected layout."""

from __future__ import annotations

import json
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png
from torchvision.transforms import v2

from quest import data
from quest import recipe as R
from quest.recipe import Data

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def write_folder(root: Path, channels: int, size: int, train: int = 64, val: int = 16) -> Path:
    """root/{train,val}/class<k>/<i>.png: 4 balanced classes, each a 4×4 block pattern + noise."""
    g = torch.Generator().manual_seed(0)
    blocks = (torch.rand(4, channels, 4, 4, generator=g) > 0.5).float() * 0.6 + 0.2
    templates = torch.nn.functional.interpolate(blocks, size=size, mode="nearest")
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            label = i % 4
            noise = torch.randn(channels, size, size, generator=g) * 0.2
            img = ((templates[label] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.png").write_bytes(encode_png(img).numpy().tobytes())
    return root


@pytest.fixture(autouse=True)
def _fresh_choices():
    """The family choice is made once per process and folder: each test starts afresh."""
    data._RESOLVED.clear()
    yield
    data._RESOLVED.clear()


def section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def readme_commands() -> list[str]:
    """The `python -m quest.…` lines of the first ```bash block of README's "Your own data"."""
    body = section(README.read_text(), "Your own data")
    block = re.search(r"```bash\n(.*?)```", body, re.S)
    assert block, "the 'Your own data' section has no ```bash block"
    return [ln for ln in block.group(1).splitlines() if ln.startswith("python -m quest.")]


def run_as_python_m(command: str, extra: list[str]) -> None:
    """`python -m MODULE ARGS` + extra arguments, run as `python -m` runs it (the module as
    __main__, sys.argv set), in this process: a new interpreter per command would triple the time."""
    argv = shlex.split(command, comments=True)
    assert argv[:2] == ["python", "-m"], command
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'quest.* found in sys.modules", RuntimeWarning)
        mp.setattr(sys, "argv", [argv[2], *argv[3:], *extra])
        try:
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        except SystemExit as done:
            assert done.code in (None, 0), f"{command}: exit {done.code}"
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)  # one Accelerate state per command, as per process
    GradientState._reset_state()
    PartialState._reset_state()


def test_readme_own_data_commands_run_as_written(tmp_path, monkeypatch, capsys, one_thread):
    """Teacher (method none), codebook, QuEST student: the README's three commands, each run as
    written (plus a few overrides that make it tiny) in a folder where data/own is a synthetic
    4-class set of 28-px grey PNGs and recipes/ is the repository's."""
    commands = readme_commands()
    modules = [shlex.split(c, comments=True)[2] for c in commands]
    assert modules == ["quest.train", "quest.codebook", "quest.train"], commands
    teacher_recipe, student_recipe = (shlex.split(commands[i], comments=True)[3] for i in (0, 2))
    teacher, student = R.load(ROOT / teacher_recipe), R.load(ROOT / student_recipe)
    assert teacher.distill.method == "none" and student.uses_quest
    assert teacher.data.dataset == student.data.dataset == "folder"
    assert teacher.data.transforms == "" and teacher.data.flip == ""

    write_folder(tmp_path / teacher.data.root, channels=1, size=28, train=160, val=32)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # the commands' relative paths
    monkeypatch.chdir(tmp_path)
    tiny = ["data.num_classes=4", "data.num_workers=0", "data.batch_size=32", "run.log_every=5"]
    outputs, book = [], tmp_path / student.codebook.path
    for command, epochs in zip(commands, (4, 1, 1)):
        run_as_python_m(command, [*tiny, f"optim.epochs={epochs}"])
        outputs.append(capsys.readouterr().out)
        if len(outputs) == 2:
            built = book.stat().st_mtime_ns

    # the family was chosen from the images and said so: 28-px grey digits-like images
    said = 'transforms "mnist" at 28 px, 1 channel, no flip: chosen from 16 28×28 grey images'
    assert said in outputs[0], outputs[0]
    assert (tmp_path / teacher.run.dir / "student.pt").is_file()
    assert f"codebook {student.codebook.path} built" in outputs[1], outputs[1]
    assert book.stat().st_mtime_ns == built  # the student run used step 2's codebook
    summary = json.loads((tmp_path / student.run.dir / "summary.json").read_text())
    assert summary["top1"] >= 0 and (tmp_path / student.run.dir / "student.pt").is_file()


def test_readme_documents_the_keys_and_the_index_command():
    body = section(README.read_text(), "Your own data")
    for key in (
        "data.dataset",
        "data.root",
        "data.image_size",
        "data.transforms",
        "data.flip",
        "data.num_classes",
        "python -m quest.shards index",
        "train/<class>/",
        "val/<class>/",
    ):
        assert key in body, key


@pytest.mark.parametrize(
    ("channels", "size", "family", "image_size", "in_channels", "flip"),
    [
        (1, 28, "mnist", 28, 1, False),  # grey digits: one channel, never mirrored
        (1, 16, "mnist", 16, 1, False),
        (3, 16, "cifar", 16, 3, True),
        (3, 32, "cifar", 32, 3, True),
        (3, 48, "imagenet", 224, 3, True),  # larger photos: RandomResizedCrop at 224, said so
    ],
)
def test_folder_family_is_chosen_from_the_images_and_said(
    tmp_path, capsys, channels, size, family, image_size, in_channels, flip
):
    """Before, a folder without data.transforms always got the ImageNet transforms: 28-px digits
    trained at 224 px (RandomResizedCrop), ~200× the pixels, three channels, mirrored, silently."""
    write_folder(tmp_path, channels, size, train=16, val=8)
    cfg = Data(dataset="folder", root=str(tmp_path), batch_size=8, num_workers=0)
    loaders = data.build_loaders(cfg, seed=0, rank=0, world=1)
    assert (loaders.in_channels, loaders.image_size) == (in_channels, image_size)
    said = capsys.readouterr().out
    assert f'transforms "{family}" at {image_size} px' in said and str(tmp_path) in said
    assert said.count("data: transforms") == 1  # once per process, not per loader
    assert (data.family(cfg), data.image_size(cfg), data.channels(cfg)) == (
        family,
        image_size,
        in_channels,
    )
    x, _ = next(iter(loaders.train))
    assert x.shape[1:] == (in_channels, image_size, image_size)
    steps = data.transforms(cfg, train=True).transforms
    assert any(isinstance(t, v2.RandomHorizontalFlip) for t in steps) == flip
    # a family given in the recipe is used as given, without a word
    given = Data(dataset="folder", root=str(tmp_path), transforms="imagenet", image_size=8)
    assert data.family(given) == "imagenet" and capsys.readouterr().out == ""


def test_mixed_sizes_get_the_imagenet_transforms_and_the_reason(tmp_path, capsys):
    write_folder(tmp_path, 3, 16, train=8, val=4)
    odd = next((tmp_path / "train" / "class1").iterdir())
    odd.write_bytes(encode_png(torch.zeros(3, 20, 24, dtype=torch.uint8)).numpy().tobytes())
    cfg = Data(dataset="folder", root=str(tmp_path))
    assert data.family(cfg) == "imagenet" and data.image_size(cfg) == 224
    assert "several sizes" in capsys.readouterr().out
    assert data.choose_family([(28, 28, True)], image_size=32)[0] == "imagenet"


@pytest.mark.parametrize(
    ("cfg", "flip"),
    [
        (Data(dataset="fashion_mnist"), False),  # the mnist family flipped before
        (Data(dataset="fashion_mnist", flip=True), True),
        (Data(dataset="cifar100"), True),
        (Data(dataset="cifar100", flip=False), False),
        (Data(dataset="synthetic", transforms="imagenet", image_size=16), True),
        (Data(dataset="synthetic", transforms="imagenet", image_size=16, flip=False), False),
        (Data(dataset="synthetic", transforms="mnist"), False),
    ],
)
def test_flip_is_a_recipe_key_with_a_family_default(cfg, flip):
    for train in (True, False):
        steps = data.transforms(cfg, train=train).transforms
        assert any(isinstance(t, v2.RandomHorizontalFlip) for t in steps) == (flip and train)
    assert data.flips(cfg) == flip


def test_flip_false_never_mirrors():
    """An image that is asymmetric left to right: with flip = false no training view is mirrored."""
    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    img[:, :, :10] = 255
    for flip, mirrored in ((False, False), (True, True)):
        cfg = Data(dataset="synthetic", transforms="mnist", flip=flip)
        t = data.transforms(cfg, train=True)
        torch.manual_seed(0)
        left = [float(t(img)[0, :, :14].mean() > t(img)[0, :, 14:].mean()) for _ in range(40)]
        assert (min(left) == 0.0) == mirrored


@pytest.mark.parametrize("missing", ["train", "val"])
def test_a_missing_split_names_the_expected_layout(tmp_path, missing):
    """Before: 'image folder not found: .../val' without the layout quest expects."""
    write_folder(tmp_path, 3, 16, train=8, val=4)
    for f in sorted((tmp_path / missing).rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    (tmp_path / missing).rmdir()
    for transforms in ("", "cifar"):
        cfg = Data(dataset="folder", root=str(tmp_path), transforms=transforms, batch_size=4)
        with pytest.raises(data.DataError) as info:
            data.build_loaders(cfg, seed=0, rank=0, world=1)
        message = str(info.value)
        assert str(tmp_path / missing) in message and "\n" not in message
        assert "data.root/train/<class>/<image>" in message
        assert "data.root/val/<class>/<image>" in message
    held_out = Data(dataset="folder", root=str(tmp_path), val_fraction=0.25, batch_size=4)
    if missing == "val":  # val_fraction holds out part of train/ instead
        assert data.build_loaders(held_out, seed=0, rank=0, world=1).eval_size == 2
