"""Image folders and split files: one class numbering for both splits, checked; clear one-line errors
for empty class folders, images of the wrong size and undecodable images (also through workers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png

from quest import data
from quest.recipe import Data

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def png(path: Path, size: int = 8, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = torch.full((3, size, size), value, dtype=torch.uint8)
    path.write_bytes(encode_png(image).numpy().tobytes())
    return path


def folder(root: Path, split: str, counts: dict[str, int], size: int = 8) -> None:
    """root/split/<class>/<i>.png, each class a different grey level."""
    for c, (name, n) in enumerate(counts.items()):
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            png(root / split / name / f"{i}.png", size, value=40 * c)


def cfg(root: Path, **kw) -> Data:
    base = {"dataset": "folder", "root": str(root), "transforms": "imagenet", "image_size": 8}
    return Data(**{**base, "batch_size": 2, "num_workers": 0, **kw})


def one_line_error(call, *patterns: str) -> str:
    with pytest.raises(data.DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert pattern in message, message
    return message


def test_classes_come_from_the_training_split_and_are_recorded(tmp_path):
    folder(tmp_path, "train", {"bar": 2, "kitchen": 2})
    folder(tmp_path, "val", {"bar": 1, "kitchen": 1})
    loaders = data.build_loaders(cfg(tmp_path), seed=0, rank=0, world=1)
    assert loaders.classes == ["bar", "kitchen"] and loaders.num_classes == 2
    labels = torch.cat([y for _, y in loaders.eval]).tolist()
    assert labels == [0, 1]


@pytest.mark.parametrize(
    "train, val, named",
    [
        ({"bar": 1, "kitchen": 1, "zoo": 1}, {"bar": 1, "kitchen": 1}, "zoo"),  # extra in train
        ({"bar": 1, "kitchen": 1}, {"attic": 1, "bar": 1, "kitchen": 1}, "attic"),  # extra in val
        ({"bar": 1, "kitchen": 1}, {"bar": 1, "kitchen": 0}, "kitchen"),  # empty in val
    ],
)
def test_splits_with_other_classes_are_an_error(tmp_path, train, val, named):
    """Numbering each split on its own shifted every label (0 % top-1, exit 0)."""
    folder(tmp_path, "train", train)
    folder(tmp_path, "val", val)
    one_line_error(lambda: data.splits(cfg(tmp_path), seed=0), named)


def test_empty_class_folder_in_train_is_an_error(tmp_path):
    folder(tmp_path, "train", {"attic": 0, "bar": 1, "kitchen": 1})
    (tmp_path / "train" / "attic" / "notes.txt").write_text("not an image")
    folder(tmp_path, "val", {"bar": 1, "kitchen": 1})
    one_line_error(lambda: data.splits(cfg(tmp_path), seed=0), "attic", "no image")


def write_mit67(root: Path, train: list[str], test: list[str]) -> None:
    for entry in train + test:
        png(root / "Images" / entry)
    (root / "TrainImages.txt").write_text("\n".join(train) + "\n")
    (root / "TestImages.txt").write_text("\n".join(test) + "\n")


def test_mit67_test_split_uses_the_training_numbering(tmp_path):
    write_mit67(
        tmp_path, ["bar/a.jpg", "kitchen/b.jpg", "zoo/c.jpg"], ["kitchen/t.jpg", "zoo/u.jpg"]
    )
    one_line_error(lambda: data.splits(Data(dataset="mit67", root=str(tmp_path)), 0), "bar")
    (tmp_path / "TestImages.txt").write_text("kitchen/t.jpg\nzoo/u.jpg\nbar/a.jpg\n")
    train, test = data.splits(Data(dataset="mit67", root=str(tmp_path)), seed=0)
    assert train.classes == test.classes == ["bar", "kitchen", "zoo"]
    assert sorted(zip(test.labels, (Path(f).name for f in test.images))) == [
        (0, "a.jpg"),
        (1, "t.jpg"),
        (2, "u.jpg"),
    ]


def test_negative_per_class_is_refused(tmp_path):
    ds = data.ImageList(
        torch.zeros(20, 1, 2, 2, dtype=torch.uint8), [i % 2 for i in range(20)], ["a", "b"], 1
    )
    one_line_error(lambda: data.per_class_subset(ds, per_class=-5, keep_fraction=1.0), "per_class")


@pytest.mark.parametrize(
    "override, named",
    [
        ({"num_workers": -1}, "data.num_workers"),
        ({"num_classes": 1}, "data.num_classes"),
        ({"num_classes": 5}, "data.num_classes"),  # the data has 4
        ({"synthetic_classes": 1}, "class"),
    ],
)
def test_loader_settings_are_checked(override, named):
    c = Data(dataset="synthetic", synthetic_size=32, image_size=8, batch_size=4, **override)
    one_line_error(lambda: data.build_loaders(c, seed=0, rank=0, world=1), named)


def test_wrong_image_size_under_cifar_transforms_is_named(tmp_path):
    """RandomCrop(32, padding=4) failed deep in a worker on a smaller image."""
    folder(tmp_path, "train", {"bar": 3, "kitchen": 3}, size=32)
    folder(tmp_path, "val", {"bar": 1, "kitchen": 1}, size=32)
    odd = png(tmp_path / "train" / "kitchen" / "odd.png", size=20)
    c = cfg(tmp_path, transforms="cifar", image_size=0)
    one_line_error(
        lambda: data.build_loaders(c, seed=0, rank=0, world=1), str(odd), "20×20", "32×32"
    )
    # also when the image is not among those checked up front
    train = data.load_split(c, train=True)
    one_line_error(lambda: train[train.images.index(odd)], str(odd), "20×20")


def test_undecodable_image_is_one_line_through_workers(tmp_path):
    folder(tmp_path, "train", {"bar": 4, "kitchen": 4})
    folder(tmp_path, "val", {"bar": 1, "kitchen": 1})
    bad = tmp_path / "train" / "bar" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    loaders = data.build_loaders(cfg(tmp_path, num_workers=2), seed=0, rank=0, world=1)

    def epoch():
        for _ in loaders.train:
            pass

    message = one_line_error(epoch, str(bad), "delete")
    assert "worker" not in message and "Traceback" not in message


def test_formats_only_pil_reads_are_decoded(tmp_path):
    """ImageFolder (the original's reader) reads BMP and TIFF with PIL; torchvision's decoder does not."""
    from PIL import Image

    path = tmp_path / "x.bmp"
    Image.new("RGB", (5, 4), (10, 20, 30)).save(path)
    img = data.decode_file(path, 3)
    assert img.shape == (3, 4, 5) and img[:, 0, 0].tolist() == [10, 20, 30]
