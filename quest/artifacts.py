"""Artifacts on disk: atomic writes and the provenance every artifact carries."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | Path, write, overwrite: bool = True) -> Path:
    """Call write(tmp_path), fsync, then rename onto `path`: a killed process never leaves a
    half-written file under the final name. overwrite=False never replaces an existing `path`, not
    even one another process creates meanwhile: FileExistsError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); give it the mode open() would, so teammates on a
    # shared cluster file system can read checkpoints and codebooks.
    os.chmod(tmp, 0o666 & ~umask())
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            publish_new(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def publish_new(tmp: str, path: Path) -> None:
    """Give the finished file `tmp` the name `path` only if no file has it. A hard link is atomic and
    fails on an existing name, where a rename would replace it. File systems without hard links fall
    back to check-then-rename, which leaves a short window for a race."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # hard links not supported here
        if path.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def umask() -> int:
    """The process's file-creation mask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj: Any, path: str | Path, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite)


def save_text(text: str, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_json(obj: Any, path: str | Path) -> Path:
    return save_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:limit] if limit else h.hexdigest()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict[str, str]:
    """Versions and commit recorded with every artifact."""
    import accelerate
    import torchvision

    return {
        "torch": str(torch.__version__),
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }
