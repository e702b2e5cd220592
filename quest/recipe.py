"""Recipes: a TOML file loaded into typed dataclasses, one per table, checked at load time.

Every field carries its documentation in `metadata["help"]` and, where the set is closed, its valid
values in `metadata["choices"]`. Unknown keys, wrong types and bad choices raise `RecipeError` with the
file, the key, what was expected and a close-match suggestion. Overrides are `section.key=value` pairs
whose value is parsed as a TOML literal (a bare word is taken as a string).

Each component receives only its own section (`build_optimizer(params, recipe.optim)`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .recipe_checks import validate


def _f(default: Any, help: str, choices: tuple | None = None, factory: Any = None):
    meta = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Run:
    """Where and how the run executes."""

    dir: str = _f(
        "runs/default", "run directory: checkpoints, metrics.jsonl, summary.json, student.pt"
    )
    precision: str = _f(
        "no",
        "autocast precision of teacher and student; 'auto' = bf16 where the device runs it "
        "natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX), else fp32 ('no')",
        ("auto", "no", "bf16", "fp16"),
    )
    cpu: bool = _f(False, "force CPU even when CUDA is present (CPU multi-process runs use gloo)")
    channels_last: bool = _f(True, "channels_last memory format for conv nets (faster with bf16)")
    compile: bool = _f(False, "torch.compile teacher and student")
    log_every: int = _f(50, "optimizer steps between log lines")
    save_every: int = _f(0, "optimizer steps between checkpoints; 0 = at the end of every epoch")
    save_minutes: float = _f(0.0, "also checkpoint after this many wall-clock minutes; 0 = off")
    keep_checkpoints: int = _f(2, "complete checkpoints kept in run.dir/checkpoints")
    eval_every: int = _f(1, "epochs between evaluations (the last epoch is always evaluated)")
    grad_accum: int = _f(1, "micro-batches per optimizer step (batch_size is per optimizer step)")
    wandb: bool = _f(False, "log to Weights & Biases (WANDB_MODE=offline works without network)")
    wandb_project: str = _f("quest", "W&B project name")
    max_steps: int = _f(
        0, "stop after this many optimizer steps (0 = the full schedule); for smoke runs"
    )
    timeout_minutes: float = _f(
        5.0,
        "a collective that does not complete in this time (a stuck or dead rank) ends the job; "
        "the wait for k-means on rank 0 has its own, longer limit",
    )


@dataclass(frozen=True)
class Data:
    """What the student learns from and is evaluated on."""

    dataset: str = _f(
        "synthetic",
        "dataset kind",
        ("fashion_mnist", "cifar100", "imagenet", "mit67", "folder", "wds", "synthetic"),
    )
    root: str = _f("", "dataset directory (files are never downloaded)")
    batch_size: int = _f(64, "global batch size per optimizer step, summed over processes")
    eval_batch_size: int = _f(0, "global evaluation batch size; 0 = 2 × batch_size")
    num_workers: int = _f(2, "DataLoader workers per process")
    image_size: int = _f(0, "training resolution; 0 = the dataset's default (32, 28 or 224)")
    num_classes: int = _f(0, "classes; 0 = the dataset's own count")
    train_shards: str = _f(
        "", "WebDataset train shards (brace pattern or list file), dataset='wds'"
    )
    val_shards: str = _f("", "WebDataset validation shards, dataset='wds'")
    shard_index: str = _f(
        "", "the shards' sizes.json, path or URL; '' = next to the shards (set it for pipe: URLs)"
    )
    transforms: str = _f(
        "",
        "transform family; '' = the dataset's own, and for folder/wds data the family chosen from "
        "the images' size and channels (printed at start)",
        ("", "cifar", "imagenet", "mnist"),
    )
    flip: bool | str = _f(
        "",
        "random horizontal flip of training images: true, false, or '' = the transform family's "
        "default (flip for cifar and imagenet, no flip for mnist: digits and text must not be "
        "mirrored)",
        ("", True, False),
    )
    val_fraction: float = _f(
        0.0,
        "hold out this fraction of the training set as the evaluation set (tuning without the test set)",
    )
    per_class: int = _f(0, "keep only the first N training images of each class (0 = all)")
    keep_fraction: float = _f(1.0, "then keep the first fraction of those (MIT-67 rule: 0.8)")
    epoch_size: int = _f(
        0, "repeat the training subset to about this many samples per epoch (0 = off)"
    )
    synthetic_size: int = _f(512, "synthetic dataset: training images")
    synthetic_classes: int = _f(4, "synthetic dataset: classes")


@dataclass(frozen=True)
class Teacher:
    """The frozen network whose feature map is quantised."""

    arch: str = _f("", "teacher architecture (see quest.models.ARCHS)")
    checkpoint: str = _f(
        "", "state-dict file (RepDistiller dicts with 'model' work) or a torchvision weights name"
    )
    layer: str = _f("", "module path of the feature map; '' = the architecture's default")
    pool: int = _f(
        1, "average-pool the teacher map with this kernel and stride (2 for MobileNet/ShuffleNet)"
    )
    recipe: str = _f(
        "",
        "recipe that trains this teacher first when teacher.checkpoint is missing (its student.pt)",
    )
    min_top1: float = _f(
        -1.0,
        "refuse a teacher whose top-1 on 512 evaluation images is below this (%); -1 = 2 × chance",
    )


@dataclass(frozen=True)
class Student:
    """The network being trained."""

    arch: str = _f("", "student architecture (see quest.models.ARCHS)")
    layer: str = _f("", "module path of the student map; '' = the architecture's default")


@dataclass(frozen=True)
class Codebook:
    """The teacher's visual words: k-means centroids of its feature vectors."""

    path: str = _f("", "codebook artifact; built by quest.codebook when missing")
    size: int = _f(4096, "K, the number of visual words")
    beta: float = _f(5.0, "inverse temperature of the teacher's soft assignment")
    iterations: int = _f(20, "k-means iterations")
    max_vectors: int = _f(0, "feature vectors used for k-means, over all ranks; 0 = every vector")
    max_images: int = _f(0, "training images passed through the teacher; 0 = all")
    refine_iterations: int = _f(
        0, "distributed Lloyd iterations over every vector after faiss (ImageNet scale)"
    )
    seed: int = _f(-1, "k-means seed; -1 = the recipe seed")
    gpu: bool = _f(True, "use faiss on GPU when faiss-gpu and CUDA are both present")
    build: bool = _f(
        True, "build missing codebooks; false = they must exist (MIT-67 reuses the ImageNet ones)"
    )


@dataclass(frozen=True)
class Level:
    """One teacher/student layer pair of multi-level QuEST (the [[levels]] array of tables)."""

    teacher_layer: str = _f("", "teacher module path")
    student_layer: str = _f("", "student module path")
    pool: int = _f(1, "teacher map average-pool kernel")
    codebook: str = _f("", "codebook artifact path")
    beta: float = _f(5.0, "inverse temperature")
    weight: float = _f(1.0, "multiplies this level's loss (quest_weight multiplies the sum)")


@dataclass(frozen=True)
class Distill:
    """The training objective."""

    method: str = _f("quest", "objective", ("none", "kd", "quest", "quest+kd"))
    ce_weight: float = _f(1.0, "weight of the cross-entropy on the labels")
    quest_weight: float = _f(1.0, "lambda, weight of the QuEST loss")
    kd_weight: float = _f(1.0, "weight of the Hinton KD loss (methods kd, quest+kd)")
    kd_temperature: float = _f(4.0, "Hinton KD temperature (the loss is scaled by T²)")
    gamma: float = _f(3.0, "initial scale of the cosine codeword head")
    learn_gamma: bool = _f(True, "learn the head scale (MIT-67 ResNet-18: fixed)")
    bias: bool = _f(False, "zero-initialised bias in the codeword head")


@dataclass(frozen=True)
class Optim:
    """SGD and the learning-rate schedule (a pure function of the step)."""

    epochs: int = _f(1, "training epochs")
    lr: float = _f(0.05, "peak learning rate at the reference batch size")
    lr_batch: int = _f(
        0, "reference batch for linear LR scaling (lr × batch_size / lr_batch); 0 = off"
    )
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "weight decay on every parameter")
    schedule: str = _f("step", "LR schedule", ("step", "cosine", "constant"))
    milestones: list[int] = _f(
        None, "epochs where the step schedule multiplies the LR by decay", factory=list
    )
    decay: float = _f(0.1, "step schedule factor")
    warmup: float = _f(0.0, "linear warm-up length in epochs")
    clip_grad: float = _f(0.0, "clip the gradient norm to this value; 0 = off (the norm is logged)")


@dataclass(frozen=True)
class Recipe:
    name: str = _f("run", "run name")
    seed: int = _f(0, "seed of everything: model init, data order, augmentation, k-means")
    run: Run = _f(None, "execution", factory=Run)
    data: Data = _f(None, "data", factory=Data)
    teacher: Teacher = _f(None, "teacher", factory=Teacher)
    student: Student = _f(None, "student", factory=Student)
    codebook: Codebook = _f(None, "codebook", factory=Codebook)
    distill: Distill = _f(None, "objective", factory=Distill)
    optim: Optim = _f(None, "optimizer", factory=Optim)
    levels: list[Level] = _f(
        None, "multi-level QuEST; empty = one level from teacher/student/codebook", factory=list
    )

    def quest_levels(self) -> list[Level]:
        """The QuEST levels to train: [[levels]] when given, else one built from the single-level keys."""
        if self.levels:
            return self.levels
        return [
            Level(
                teacher_layer=self.teacher.layer,
                student_layer=self.student.layer,
                pool=self.teacher.pool,
                codebook=self.codebook.path,
                beta=self.codebook.beta,
            )
        ]

    @property
    def uses_quest(self) -> bool:
        return self.distill.method in ("quest", "quest+kd")

    @property
    def uses_teacher(self) -> bool:
        return self.distill.method != "none"


SECTIONS = {
    name: tp
    for name, tp in typing.get_type_hints(Recipe).items()
    if name not in ("name", "seed", "levels")
}


# --------------------------------------------------------------------------------------- parsing


def _type_of(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to `tp` (int → float allowed) or raise RecipeError."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_value(value, arg, where)
            except RecipeError:
                continue
        raise RecipeError(f"{where}: expected {tp}, got {type(value).__name__} {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is type(None) and value is None:
        return None
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise RecipeError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _unknown(key: str, valid: list[str], where: str) -> RecipeError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" — did you mean '{where}{close[0]}'?" if close else ""
    return RecipeError(f"unknown key '{where}{key}'{hint} (valid keys: {', '.join(valid)})")


def _build(cls: type, table: dict, where: str) -> Any:
    if not isinstance(table, dict):
        raise RecipeError(f"'{where.rstrip('.')}' must be a table, got {type(table).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key not in fields:
            raise _unknown(key, list(fields), where)
        tp = _type_of(cls, key)
        if tp in SECTIONS.values():
            kwargs[key] = _build(tp, value, f"{key}.")
        elif key == "levels":
            if not isinstance(value, list):
                raise RecipeError("'levels' must be an array of tables: [[levels]]")
            kwargs[key] = [_build(Level, v, f"levels[{i}].") for i, v in enumerate(value)]
        else:
            kwargs[key] = _check_value(value, tp, f"'{where}{key}'")
            choices = fields[key].metadata.get("choices")
            if choices and kwargs[key] not in choices:
                close = difflib.get_close_matches(str(kwargs[key]), [str(c) for c in choices], n=1)
                hint = f" — did you mean '{close[0]}'?" if close else ""
                raise RecipeError(
                    f"'{where}{key}' = {kwargs[key]!r} is not one of {list(choices)}{hint}"
                )
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=0.1' → (['optim', 'lr'], 0.1). The value is a TOML literal; a bare word is a string."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like section.key=value (e.g. optim.lr=0.1)")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(table: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = table
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {text!r}: '{part}' is not a table")
        node[path[-1]] = value
    return table


def from_dict(table: dict, source: str = "<recipe>") -> Recipe:
    try:
        recipe = _build(Recipe, table, "")
        validate(recipe)
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
    return recipe


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a TOML recipe, apply `section.key=value` overrides, and check everything."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: not valid TOML: {err}") from None
    try:
        table = apply_overrides(table, list(overrides))
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
    return from_dict(table, str(path))


# --------------------------------------------------------------------------------------- writing


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # A JSON string is a TOML basic string, except that JSON writes characters outside the BMP as
        # surrogate-pair escapes (invalid in TOML) and leaves DEL raw (TOML wants it escaped).
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML; `load` of the result gives an equal Recipe."""
    table = to_dict(recipe)
    lines = [f"name = {_toml_value(table.pop('name'))}", f"seed = {table.pop('seed')}"]
    levels = table.pop("levels")
    for section, values in table.items():
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    for level in levels:
        lines += ["", "[[levels]]"] + [f"{k} = {_toml_value(v)}" for k, v in level.items()]
    return "\n".join(lines) + "\n"


def describe() -> str:
    """Every section and key with its type, default and documentation (`python -m quest.recipe`)."""
    out = []
    for cls, name in (
        [(Recipe, "")] + [(tp, n) for n, tp in SECTIONS.items()] + [(Level, "[levels]")]
    ):
        out.append(f"[{name}]" if name and not name.startswith("[") else name or "(top level)")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if cls is Recipe and (f.name in SECTIONS or f.name == "levels"):
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            choices = f.metadata.get("choices")
            extra = f" one of {list(choices)}" if choices else ""
            tname = getattr(hints[f.name], "__name__", str(hints[f.name]))
            out.append(f"  {f.name} ({tname}, default {default!r}){extra}: {f.metadata['help']}")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(describe())
