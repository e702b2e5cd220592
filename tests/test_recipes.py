"""The shipped recipes (docs/method.md §3): each loads, builds its networks and runs them at its resolution, its
QuEST maps line up level by level, recipes sharing a codebook agree on what it is, and the CIFAR pairs
carry the paper's hyper-parameters. Also: CRD's checkpoint format loads strictly, and
tools/prepare_mit67.py gives the folder reader the official image order."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from quest import recipe as R
from quest.build import InputShape, build_teacher, quest_levels, student_layers, teacher_layers
from quest.codebook import kmeans_seed, teacher_weights_id
from quest.data import TrainBatches, family, image_size, load_split, mit67, per_class_subset
from quest.models import PRE_RELU_LAYER, build_model, canonical_arch, feature_layer
from quest.student import ModelError, load_state, load_strict, map_shapes

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("**/*.toml"))
IDS = [p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES]
DATASET_CLASSES = {"cifar100": 100, "fashion_mnist": 10, "mit67": 67}


def _load(path: Path) -> R.Recipe | None:
    try:
        return R.load(path)
    except R.RecipeError:
        return None  # reported by the test of that recipe


LOADED = {p: _load(p) for p in RECIPES}


def num_classes(r: R.Recipe) -> int:
    n = r.data.num_classes or DATASET_CLASSES.get(r.data.dataset)
    if r.data.dataset == "synthetic":
        n = r.data.num_classes or r.data.synthetic_classes
    assert n, f"data.dataset = {r.data.dataset!r} does not tell its classes: set data.num_classes"
    return n


def in_channels(r: R.Recipe) -> int:
    return 1 if family(r.data) == "mnist" else 3


def is_weights_name(checkpoint: str) -> bool:
    """A torchvision weights enum name rather than a file (the rule of quest.build.build_teacher)."""
    return not ("/" in checkpoint or checkpoint.endswith((".pt", ".pth", ".bin")))


def teacher_key(r: R.Recipe) -> tuple[str, int, int]:
    """(arch, classes, in_channels) the trainer builds the teacher with."""
    if is_weights_name(r.teacher.checkpoint):
        return canonical_arch(r.teacher.arch), 1000, 3
    return canonical_arch(r.teacher.arch), num_classes(r), in_channels(r)


# Every layer any recipe taps, per architecture: one forward per (arch, classes, channels, size).
NEEDED: dict[str, set[str]] = {}
for _r in filter(None, LOADED.values()):
    if _r.uses_teacher:  # without a teacher only the student's own map is looked at
        _levels = quest_levels(_r)
        NEEDED.setdefault(canonical_arch(_r.student.arch), set()).update(student_layers(_levels))
        NEEDED.setdefault(canonical_arch(_r.teacher.arch), set()).update(teacher_layers(_levels)[0])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One-image forwards gain nothing from threads, and on a shared CPU OpenMP's waiting makes
    them up to 20× slower: one thread for this module, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def model(arch: str, classes: int, channels: int) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, classes, channels).eval()


@functools.cache
def shapes(arch: str, classes: int, channels: int, size: int) -> dict[str, torch.Size]:
    """C×H×W of every needed layer of `arch`, from one forward of a size×size image."""
    layers = sorted(NEEDED.get(arch, set()) | {feature_layer(arch)})
    with torch.inference_mode():
        found = map_shapes(model(arch, classes, channels), layers, channels, size)
    return dict(zip(layers, found))


def classifier_outputs(net: nn.Module) -> int:
    return [m for m in net.modules() if isinstance(m, nn.Linear)][-1].out_features


def header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def codebook_identity(r: R.Recipe, level: R.Level, layer: str) -> tuple:
    """What quest.codebook checks before reusing an artifact (MATCH_FIELDS but the precision, as a
    codebook from fp32 features serves every precision), plus the word dimension."""
    arch, classes, channels = teacher_key(r)
    dims = shapes(arch, classes, channels, image_size(r.data))[layer][0]
    weights = teacher_weights_id(r.teacher.checkpoint)
    return arch, weights, layer, level.pool, r.codebook.size, kmeans_seed(r.codebook, r.seed), dims


CODEBOOK_USERS: dict[str, list[tuple[str, R.Recipe, R.Level, str]]] = {}
for _p, _r in LOADED.items():
    if _r is not None and _r.uses_quest:
        for _lv in quest_levels(_r):
            _layer = _lv.teacher_layer
            CODEBOOK_USERS.setdefault(_lv.codebook, []).append((_p.name, _r, _lv, _layer))


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_builds_and_its_maps_line_up(path: Path):
    r = R.load(path)  # raises RecipeError with the key to fix
    rel = path.relative_to(ROOT).as_posix()
    assert re.search(
        rf"(python|accelerate launch)[^\n]* -m quest\.(train|codebook) {re.escape(rel)}",
        header(path),
    ), f"{rel}: the header comment must give the command that runs it"

    classes, channels, size = num_classes(r), in_channels(r), image_size(r.data)
    s_arch = canonical_arch(r.student.arch)
    student = model(s_arch, classes, channels)
    assert classifier_outputs(student) == classes
    s_maps = shapes(s_arch, classes, channels, size)

    if not r.uses_teacher:
        return
    t_arch, t_classes, t_channels = teacher_key(r)
    t_maps = shapes(t_arch, t_classes, t_channels, size)
    if r.teacher.recipe:  # trains this teacher when the checkpoint is missing
        t = R.load(ROOT / r.teacher.recipe)
        assert t.distill.method == "none"
        assert canonical_arch(t.student.arch) == t_arch
        assert (t.data.dataset, t.data.root, num_classes(t)) == (
            r.data.dataset,
            r.data.root,
            classes,
        )
    if not r.uses_quest:
        return
    levels = quest_levels(r)
    t_layers, pools = teacher_layers(levels)
    for i, (level, t_layer, pool, s_layer) in enumerate(
        zip(levels, t_layers, pools, student_layers(levels))
    ):
        c, h, w = t_maps[t_layer]
        assert h % pool == 0 and w % pool == 0, f"level {i}: {h}×{w} map, pool {pool}"
        assert (h // pool, w // pool) == tuple(s_maps[s_layer][1:]), (
            f"level {i}: teacher {t_layer} {c}×{h}×{w} pooled {pool} vs student {s_layer} "
            f"{tuple(s_maps[s_layer])}"
        )
        mine = codebook_identity(r, level, t_layer)
        for other_name, other, other_level, other_layer in CODEBOOK_USERS[level.codebook]:
            theirs = codebook_identity(other, other_level, other_layer)
            assert theirs == mine, (
                f"{level.codebook} is shared with {other_name}, which builds it for {theirs} "
                f"(arch, weights, layer, pool, K, seed, dims), not {mine}"
            )


# --------------------------------------------------------------------- the paper's CIFAR-100 table

# stem: (teacher, student, lambda, LR, pool), docs/method.md §3
CIFAR_PAIRS = {
    "wrn40_2_wrn16_2": ("wrn_40_2", "wrn_16_2", 1, 0.05, 1),
    "wrn40_2_wrn40_1": ("wrn_40_2", "wrn_40_1", 1, 0.05, 1),
    "resnet56_resnet20": ("resnet56", "resnet20", 1, 0.05, 1),
    "resnet110_resnet20": ("resnet110", "resnet20", 1, 0.05, 1),
    "resnet110_resnet32": ("resnet110", "resnet32", 1, 0.05, 1),
    "resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4", 1, 0.05, 1),
    "vgg13_vgg8": ("vgg13", "vgg8", 2, 0.05, 1),
    "resnet50_vgg8": ("resnet50", "vgg8", 1, 0.05, 1),
    "vgg13_mobilenetv2": ("vgg13", "mobilenetv2", 1, 0.01, 2),
    "resnet50_mobilenetv2": ("resnet50", "mobilenetv2", 1, 0.01, 2),
    "resnet32x4_shufflenetv1": ("resnet32x4", "shufflenetv1", 1, 0.01, 2),
    "resnet32x4_shufflenetv2": ("resnet32x4", "shufflenetv2", 1, 0.01, 2),
    "wrn40_2_shufflenetv1": ("wrn_40_2", "shufflenetv1", 1, 0.01, 2),
}


def test_quest_recipes_pin_the_kmeans_seed():
    """Runs over seeds (seed=1, 2, ...) share a recipe's codebook, and an artifact built with another
    k-means seed is refused: every QuEST recipe names its seed instead of following the run's (-1)."""
    loose = [
        p.name for p, r in LOADED.items() if r is not None and r.uses_quest and r.codebook.seed < 0
    ]
    assert not loose, f"set codebook.seed in {loose}"


def test_cifar_pairs_follow_the_paper():
    for stem, (teacher, student, lam, lr, pool) in CIFAR_PAIRS.items():
        r = R.load(ROOT / "recipes" / "cifar100" / f"{stem}.toml")
        o, d, cb = r.optim, r.distill, r.codebook
        assert (r.teacher.arch, r.student.arch, r.teacher.pool) == (teacher, student, pool), stem
        head = (d.method, d.quest_weight, d.ce_weight, d.gamma, d.learn_gamma, d.bias)
        assert head == ("quest", lam, 1.0, 3.0, True, False), stem
        assert (cb.size, cb.beta, cb.iterations, cb.max_vectors) == (4096, 5.0, 20, 0), stem
        assert (r.data.dataset, r.data.batch_size, r.data.val_fraction) == ("cifar100", 64, 0.0)
        sgd = (o.epochs, o.lr, o.lr_batch, o.momentum, o.nesterov, o.weight_decay)
        assert sgd == (240, lr, 0, 0.9, True, 5e-4), stem
        assert (o.schedule, o.milestones, o.decay, o.warmup) == ("step", [150, 180, 210], 0.1, 0)
        if teacher == "vgg13":  # the teacher map is taken before the ReLU, the student's after it
            assert r.teacher.layer == PRE_RELU_LAYER["vgg13"]
        if student == "vgg8":
            assert r.student.layer == feature_layer("vgg8") != PRE_RELU_LAYER["vgg8"]
        assert r.teacher.checkpoint.endswith("_vanilla/ckpt_epoch_240.pth")


def r_path(stem: str, k: int) -> Path:
    return ROOT / "recipes" / "mit67" / f"{stem}_img{k}.toml"


def original_epoch(k: int) -> int:
    """Samples per epoch of the original's IMG-k: it kept int(0.8 k) images per class and repeated
    them rep_num = int(5360 / kept) times (5,360 = all 80 × 67 training images), so IMG10, 25 and 50
    see 5,360 samples an epoch and IMG80 its 4,288 images once."""
    kept = int(0.8 * k) * 67
    return max(1, 5360 // kept) * kept


def test_mit67_recipes_follow_the_paper():
    for arch, lr, batch, gamma, learn, bias, lam in (
        ("tv_resnet18", 0.05, 128, 10.0, False, True, 10.0),
        ("vgg9_bn", 0.01, 32, 3.0, True, False, 20.0),
    ):
        stem = "resnet18" if arch == "tv_resnet18" else "vgg9"
        for k in (10, 25, 50, 80):
            r = R.load(r_path(stem, k))
            d, o = r.distill, r.optim
            assert r.student.arch == arch and r.data.num_classes == 67
            assert (r.data.per_class, r.data.keep_fraction) == (k, 0.8)
            kept = int(0.8 * k) * 67
            epoch = TrainBatches(kept, batch, 0, 1, seed=0, epoch_size=r.data.epoch_size)
            assert r.data.epoch_size == epoch.samples == original_epoch(k), (stem, k)
            assert "sorted by file name" in " ".join(
                header(r_path(stem, k)).replace("#", "").split()
            )
            assert (d.gamma, d.learn_gamma, d.bias, d.quest_weight) == (gamma, learn, bias, lam)
            sgd = (o.epochs, o.lr, o.milestones, o.nesterov, o.weight_decay)
            assert sgd == (200, lr, [150], False, 5e-4)
            assert r.data.batch_size == batch and r.teacher.min_top1 == 0
            levels = [(lv.teacher_layer, lv.beta) for lv in r.levels]
            assert levels == [("layer3", 500.0), ("layer4", 5.0)]


# --------------------------------------------------------------------- CRD's teacher checkpoints

CRD_TEACHERS = ["wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "resnet50"]


def save_repdistiller(net: nn.Module, path: Path, state: dict | None = None) -> Path:
    """The layout of RepDistiller's ckpt_epoch_240.pth (train_teacher.py)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    torch.save(
        {
            "epoch": 240,
            "model": state if state is not None else net.state_dict(),
            "accuracy": torch.tensor(75.61),
            "best_acc": torch.tensor(75.61),
            "optimizer": optimizer.state_dict(),
        },
        path,
    )
    return path


@pytest.mark.parametrize("arch", CRD_TEACHERS)
def test_repdistiller_checkpoint_loads_strictly(tmp_path, arch):
    source = model(arch, 100, 3)
    path = save_repdistiller(source, tmp_path / "ckpt_epoch_240.pth")
    torch.manual_seed(1)
    target = build_model(arch, 100, 3)
    load_strict(target, load_state(path), str(path))
    loaded = target.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key

    state = dict(source.state_dict())
    dropped = next(k for k in state if k.endswith("running_mean"))
    del state[dropped]
    broken = save_repdistiller(source, tmp_path / "broken.pth", state)
    with pytest.raises(ModelError, match=re.escape(dropped)):
        load_strict(build_model(arch, 100, 3), load_state(broken), str(broken))


def test_pair_recipe_takes_a_repdistiller_teacher(tmp_path):
    """The trainer's own path: recipe → CRD-format file → frozen teacher tapped at the recipe's layer."""
    path = save_repdistiller(model("vgg13", 100, 3), tmp_path / "ckpt_epoch_240.pth")
    r = R.load(
        ROOT / "recipes" / "cifar100" / "vgg13_mobilenetv2.toml", [f'teacher.checkpoint="{path}"']
    )
    shape = InputShape(num_classes=100, in_channels=3, image_size=32)
    teacher = build_teacher(r.teacher, quest_levels(r), shape)
    assert teacher.folded > 0  # BNs folded, and the pre-ReLU tap still sees the BN output
    assert teacher.layers == ["block4"] and teacher.pools == [2]
    with torch.no_grad():
        logits, (fmap,) = teacher(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100) and fmap.shape == (2, 512, 2, 2)
    assert (fmap < 0).any()  # taken before the ReLU


# --------------------------------------------------------------------- tools/prepare_mit67.py


def _prepare_module():
    spec = importlib.util.spec_from_file_location("prepare_mit67", ROOT / "tools/prepare_mit67.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_mit67_copies_the_split_and_img_k_picks_by_file_name(tmp_path, capsys):
    prepare = _prepare_module()
    src, out = tmp_path / "MIT67", tmp_path / "data" / "mit67"
    train = ["kitchen/z1.jpg", "kitchen/a2.jpg", "bar/m.jpg", "kitchen/b3.jpg", "bar/c.jpg"]
    test = ["kitchen/t1.jpg", "bar/t2.jpg"]
    for entry in train + test:
        (src / "Images" / entry).parent.mkdir(parents=True, exist_ok=True)
        (src / "Images" / entry).write_bytes(entry.encode())
    (src / "TrainImages.txt").write_text("\n".join(train) + "\n")
    (src / "TestImages.txt").write_text("\r\n".join([*test, "bar/gone.jpg"]) + "\r\n")

    assert prepare.main([str(src), str(out)]) == 1  # bar/gone.jpg is missing
    assert "bar/gone.jpg" in capsys.readouterr().out
    manifest = json.loads((out / "prepared.json").read_text())
    assert manifest["missing"] == ["Images/bar/gone.jpg"]
    assert manifest["splits"]["train"]["images"] == 5 and manifest["splits"]["val"]["images"] == 2
    linked = out / "train" / "kitchen" / "z1.jpg"  # the original's layout: the file's own name
    assert linked.read_bytes() == b"kitchen/z1.jpg"
    assert linked.stat().st_ino == (src / "Images" / "kitchen" / "z1.jpg").stat().st_ino

    # Rerun: nothing redone; --allow-missing accepts the gap; no temporary file left behind.
    assert prepare.main([str(src), str(out), "--allow-missing"]) == 0
    manifest = json.loads((out / "prepared.json").read_text())
    assert manifest["files"] == {"kept": 7, "linked": 0, "copied": 0}
    assert not list(out.rglob("*.tmp"))

    # IMG-k: the first k per class sorted by file name (the original read its copy of the split with
    # torchvision's ImageFolder), whichever reader: the prepared folder or the split file itself.
    cfg = R.Data(dataset="folder", root=str(out), transforms="imagenet")
    folder = per_class_subset(load_split(cfg, train=True), 2, 1.0)
    official = per_class_subset(mit67(str(src), train=True), 2, 1.0)
    assert folder.classes == official.classes == ["bar", "kitchen"]
    picked = [(y, Path(f).name) for f, y in zip(folder.images, folder.labels)]
    expected = [(y, Path(f).name) for f, y in zip(official.images, official.labels)]
    assert picked == expected == [(0, "c.jpg"), (0, "m.jpg"), (1, "a2.jpg"), (1, "b3.jpg")]
    # IMG10's rule on 10 images: the first 8 of the first 10 by file name, whatever the split order
    names = [f"img_{i:02d}.jpg" for i in (7, 3, 11, 0, 9, 1, 10, 5, 2, 8, 6, 4)]
    (src / "TrainImages.txt").write_text("".join(f"bar/{n}\n" for n in names))
    kept = per_class_subset(mit67(str(src), train=True), 10, 0.8)
    assert [Path(f).name for f in kept.images] == [f"img_{i:02d}.jpg" for i in range(8)]


def test_prepare_mit67_refuses_files_the_split_does_not_name(tmp_path, capsys):
    """A folder prepared by an older version (rank-prefixed names) would hold every image twice."""
    prepare = _prepare_module()
    src, out = tmp_path / "MIT67", tmp_path / "out"
    for entry in ("bar/a.jpg", "bar/b.jpg"):
        (src / "Images" / entry).parent.mkdir(parents=True, exist_ok=True)
        (src / "Images" / entry).write_bytes(b"x")
    (src / "TrainImages.txt").write_text("bar/a.jpg\n")
    (src / "TestImages.txt").write_text("bar/b.jpg\n")
    stale = out / "train" / "bar" / "0000_a.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")
    assert prepare.main([str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert "0000_a.jpg" in err and "\n" not in err.strip()
    assert not (out / "train" / "bar" / "a.jpg").exists()
