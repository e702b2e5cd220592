"""Prepare MIT-67 (Indoor Scene Recognition, Quattoni & Torralba, CVPR 2009) for the quest recipes.

    python tools/prepare_mit67.py SRC OUT [--copy] [--allow-missing] [--shards DIR]

SRC is the official layout: `SRC/Images/<class>/<file>` (the indoorCVPR_09 archive) with
`SRC/TrainImages.txt` and `SRC/TestImages.txt`, one `<class>/<file>` per line (80 training and 20 test
images per class). OUT receives the folder layout that `data.dataset = "folder"` reads, the layout the
original QuEST code made (each listed file under its own name):

    OUT/train/<class>/<file>    from TrainImages.txt
    OUT/val/<class>/<file>      from TestImages.txt

The original read this copy with torchvision's ImageFolder, so within a class the images are sorted by
file name, and `data.per_class = k` (the IMG-k variants) keeps the first k by file name, the same
images as `data.dataset = "mit67"` reading SRC directly.

- Files are hard links when SRC and OUT share a file system, else copies (`--copy` always copies).
- Atomic and resumable: each file is written as `<name>.tmp` and renamed, a rerun skips finished
  files, and `OUT/prepared.json` (counts, missing files) is written last, so its presence marks a
  complete preparation.
- Files named by a split file but absent from SRC/Images are reported and listed in prepared.json;
  the exit status is then 1 unless `--allow-missing`.
- A file under OUT/train or OUT/val that the split files do not name (left by an older version, which
  prefixed names with a rank, or by hand) is an error before anything is written: the folder reader
  would count it as a training or test image.
- `--shards DIR` also writes WebDataset shards of OUT with `quest.shards` (full-set runs only: the
  IMG-k options per_class / keep_fraction do not apply to dataset = "wds", so the MIT-67 recipes read
  the folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quest.datasets import DataError, read_split_file

SPLITS = {"train": "TrainImages.txt", "val": "TestImages.txt"}
MANIFEST = "prepared.json"


class PrepareError(ValueError):
    """A source that does not look like MIT-67's official layout."""


def read_split(path: Path) -> list[tuple[str, str]]:
    """(class, file name) per line of a split file, as the trainer reads it (quest.datasets)."""
    if not path.is_file():
        raise PrepareError(f"split file not found: {path} (expected the official MIT-67 layout)")
    try:
        return read_split_file(path)
    except DataError as err:
        raise PrepareError(str(err)) from None


def plan(src: Path, split: str) -> list[tuple[Path, Path]]:
    """(source file, destination relative to OUT) for one split: the file keeps its name."""
    return [
        (src / "Images" / cls / name, Path(split) / cls / name)
        for cls, name in read_split(src / SPLITS[split])
    ]


def check_no_strangers(out: Path, planned: set[Path]) -> None:
    """Every file already under OUT/<split>/ must be one the split files name (.tmp files are
    leftovers of an interrupted run, removed later)."""
    for split in SPLITS:
        for path in sorted((out / split).rglob("*")) if (out / split).is_dir() else []:
            rel = path.relative_to(out)
            if path.is_file() and path.suffix != ".tmp" and rel not in planned:
                raise PrepareError(
                    f"{path} is not named by the split files (left by an older prepare_mit67, which "
                    f"prefixed names with a rank?): delete {out / 'train'} and {out / 'val'} and rerun"
                )


def place(source: Path, dest: Path, copy: bool) -> str:
    """Link or copy `source` to `dest` atomically; returns 'kept', 'linked' or 'copied'."""
    if dest.exists() and dest.stat().st_size == source.stat().st_size:
        return "kept"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    how = "copied"
    if not copy:
        try:
            os.link(source, tmp)
            how = "linked"
        except OSError:  # another file system, or links not allowed: copy instead
            pass
    if how == "copied":
        shutil.copyfile(source, tmp)
    os.replace(tmp, dest)
    return how


def prepare(src: Path, out: Path, copy: bool = False) -> dict:
    """Build OUT/train and OUT/val from the official layout; returns the manifest."""
    if not (src / "Images").is_dir():
        raise PrepareError(f"{src / 'Images'} not found (expected SRC/Images/<class>/<file>)")
    plans = {split: plan(src, split) for split in SPLITS}
    check_no_strangers(out, {rel for pairs in plans.values() for _, rel in pairs})
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # present ⇔ complete
    manifest: dict = {"source": str(src.resolve()), "splits": {}, "missing": []}
    counts = {"kept": 0, "linked": 0, "copied": 0}
    names = {}
    for split, pairs in plans.items():
        names[split] = {p[0] for p in pairs}
        classes: dict[str, int] = {}
        for source, rel in pairs:
            if not source.is_file():
                manifest["missing"].append(str(source.relative_to(src)))
                continue
            counts[place(source, out / rel, copy)] += 1
            classes[rel.parent.name] = classes.get(rel.parent.name, 0) + 1
        manifest["splits"][split] = {
            "images": sum(classes.values()),
            "classes": len(classes),
            "per_class": classes,
        }
    for stale in out.glob("*/*/*.tmp"):  # left by an interrupted run
        stale.unlink()
    manifest["files"] = counts
    manifest["train_test_overlap"] = len(names["train"] & names["val"])
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def report(manifest: dict, out: Path) -> None:
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['images']} images in {info['classes']} classes → {out / split}")
        if info["classes"] != 67:
            print(f"  warning: MIT-67 has 67 classes, {split} has {info['classes']}")
    f = manifest["files"]
    print(f"{f['linked']} linked, {f['copied']} copied, {f['kept']} already in place")
    if manifest["train_test_overlap"]:
        print(f"warning: {manifest['train_test_overlap']} images are in both split files")
    missing = manifest["missing"]
    if missing:
        print(f"{len(missing)} listed images are missing from Images/ (all in {out / MANIFEST}):")
        for name in missing[:20]:
            print(f"  {name}")


def write_shards(out: Path, shards_dir: Path) -> None:
    """Call quest.shards' converter on the folder layout, or print the command to run."""
    command = f"python -m quest.shards {out} {shards_dir} --kind folder"
    try:
        from quest import shards
    except ImportError:
        shards = None
    convert = getattr(shards, "convert", None)
    if convert is None:
        print(f"quest.shards has no converter here: run\n  {command}")
        return
    print(f"writing shards: {command}")
    convert(out, shards_dir, kind="folder")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python tools/prepare_mit67.py",
        description="MIT-67 official layout → OUT/train/<class>/, OUT/val/<class>/ (folder layout).",
    )
    p.add_argument("src", type=Path, help="folder with Images/, TrainImages.txt, TestImages.txt")
    p.add_argument("out", type=Path, help="output folder (e.g. data/mit67)")
    p.add_argument("--copy", action="store_true", help="copy files instead of hard-linking them")
    p.add_argument(
        "--allow-missing", action="store_true", help="exit 0 even if listed images are missing"
    )
    p.add_argument("--shards", type=Path, default=None, help="also write WebDataset shards here")
    args = p.parse_args(argv)
    try:
        manifest = prepare(args.src, args.out, args.copy)
    except (PrepareError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report(manifest, args.out)
    if args.shards is not None:
        write_shards(args.out, args.shards)
    if manifest["missing"] and not args.allow_missing:
        print("error: missing images (pass --allow-missing to accept)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
