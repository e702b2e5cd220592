"""Training checkpoints: run_dir/checkpoints/step_XXXXXXXX/, complete only with a COMPLETE manifest.

Saving (every rank calls `save`): Accelerate writes model, optimizer, RNG states and the loop state into
`step_N.tmp`, everyone waits, rank 0 records each file's size and SHA-256 in COMPLETE (written
atomically) and renames the folder. A killed run leaves at most a `.tmp` folder, which is ignored and
later removed. Resuming picks the newest folder whose manifest still matches its files, so a corrupt
checkpoint is refused and the previous complete one is used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import artifacts

MARKER = "COMPLETE"


class LoopState:
    """Where the loop is: registered with Accelerate so it travels inside every checkpoint."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_top1 = 0.0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def _manifest(path: Path) -> dict:
    return {
        str(f.relative_to(path)): {"bytes": f.stat().st_size, "sha256": artifacts.file_sha256(f)}
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != MARKER
    }


def save(accelerator, run_dir: Path, state: LoopState, keep: int) -> Path:
    final = folder(run_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {"step": state.step, "epoch": state.epoch, "files": _manifest(tmp)}
        artifacts.save_text(json.dumps(info, indent=1), tmp / MARKER)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete(run_dir: Path) -> list[Path]:
    """Folders with a COMPLETE marker, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.glob("step_*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / MARKER).is_file()
    )


def verify(path: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    try:
        files = json.loads((path / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"unreadable {MARKER}: {err}"
    if not files:
        return "empty manifest"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != want["bytes"] or artifacts.file_sha256(f) != want["sha256"]:
            return f"{name} does not match its recorded size/SHA-256"
    return None


def newest_valid(run_dir: Path, log=print) -> Path | None:
    """The newest complete checkpoint whose files are intact; corrupt ones are reported and skipped."""
    for path in reversed(complete(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log(f"checkpoint {path} refused ({problem}); trying the previous one")
    return None


def resume_point(accelerator, run_dir: Path) -> str | None:
    """Rank 0 picks the checkpoint, every rank gets the same answer."""
    from accelerate.utils import broadcast_object_list

    choice = [None]
    if accelerator.is_main_process:
        path = newest_valid(run_dir)
        choice = [str(path) if path else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    return choice[0]


def export_student(
    path: Path, backbone: torch.nn.Module, heads: torch.nn.Module, meta: dict
) -> None:
    """student.pt: {'model': backbone state dict (loads as a teacher, RepDistiller-style), 'heads', meta}."""
    artifacts.save_torch(
        {"model": backbone.state_dict(), "heads": heads.state_dict(), "meta": meta}, path
    )
