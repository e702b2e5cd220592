"""Training checkpoints: run_dir/checkpoints/step_XXXXXXXX/, complete only with a COMPLETE manifest.

Saving (every rank calls `save`): Accelerate writes model, optimizer and RNG states into `step_N.tmp`,
everyone waits, rank 0 adds the loop state and the run's identity as JSON (never a pickle: a
checkpoint directory must not be able to run code when it is loaded), records each file's size and
SHA-256 in COMPLETE (written atomically) and renames the folder. A killed run leaves at most a `.tmp`
folder, which is ignored and later removed.

Resuming (`resume`): the newest checkpoint whose manifest matches its files and which every rank can
load; a checkpoint that is corrupt or does not load is reported and the previous one is used. A run
directory whose checkpoints are all unusable is refused rather than silently restarted from step 0.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import artifacts
from .errors import QuestError
from .recipe_checks import flat

MARKER = "COMPLETE"
LOOP_STATE = "loop_state.json"
IDENTITY = "run.json"


class CheckpointError(QuestError, RuntimeError):
    """No usable checkpoint, or a checkpoint of another run."""


@dataclass
class LoopState:
    """Where the loop is, and what a finished run reports: saved as JSON in every checkpoint, so a
    run resumed or re-entered after its last checkpoint writes the same summary."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_top1: float = 0.0
    train_s: float = 0.0  # wall time of the training loop, summed over restarts
    last_eval: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    teacher_top1: float | None = None
    skipped_train_samples: int = 0  # unreadable training samples, all ranks and restarts

    @classmethod
    def from_json(cls, text: str) -> LoopState:
        table = json.loads(text)
        names = {f.name for f in fields(cls)}
        if not isinstance(table, dict) or not set(table) <= names:
            raise ValueError(f"{LOOP_STATE} holds unexpected keys {sorted(set(table) - names)}")
        return cls(**table)


def plain_json(obj) -> str:
    """Strict JSON: non-finite floats become null."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=1, sort_keys=True, allow_nan=False)


# Keys a resumed run may change: where and how it runs, not what it computes. Every other key must
# equal the checkpoint's; the teacher and codebook files are compared by content, not by path.
LOGISTICS = frozenset(
    {
        "name",
        "run.dir",
        "run.cpu",
        "run.compile",
        "run.channels_last",
        "run.log_every",
        "run.save_every",
        "run.save_minutes",
        "run.keep_checkpoints",
        "run.eval_every",
        "run.wandb",
        "run.wandb_project",
        "run.max_steps",
        "run.timeout_minutes",
        "data.root",
        "data.num_workers",
        "data.eval_batch_size",
        "data.train_shards",
        "data.val_shards",
        "data.shard_index",
        "teacher.checkpoint",
        "teacher.recipe",
        "teacher.min_top1",
        "codebook.path",
        "codebook.build",
        "codebook.gpu",
        "levels.codebook",
    }
)


def math_fields(recipe) -> dict[str, Any]:
    """The recipe's keys that change what a run computes, flat ('optim.lr', 'levels[0].beta')."""
    return {k: v for k, v in flat(recipe).items() if re.sub(r"\[\d+\]", "", k) not in LOGISTICS}


def folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def _manifest(path: Path) -> dict:
    return {
        str(f.relative_to(path)): {"bytes": f.stat().st_size, "sha256": artifacts.file_sha256(f)}
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != MARKER
    }


def _open_mode(path: Path) -> None:
    """Give every file the mode open() would (some writers make them 0600): teammates on a shared
    file system can read the checkpoint."""
    mode = 0o666 & ~artifacts.umask()
    for f in path.rglob("*"):
        if f.is_file():
            os.chmod(f, mode)


def save(accelerator, run_dir: Path, state: LoopState, identity: dict, keep: int) -> Path:
    final = folder(run_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / LOOP_STATE).write_text(plain_json(asdict(state)))
        (tmp / IDENTITY).write_text(plain_json(identity))
        _open_mode(tmp)
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
    for name in (LOOP_STATE, IDENTITY):
        if name not in files:
            return f"no {name} (written by an older quest?)"
    return None


def read_identity(path: Path) -> dict:
    return json.loads((Path(path) / IDENTITY).read_text())


def identity_mismatch(saved: dict, current: dict) -> str | None:
    """What differs between the run a checkpoint belongs to and the current one, or None.
    Only the sections present in `current` are compared (the recipe is checked before the
    codebooks are loaded)."""
    diffs = []
    for section, values in current.items():
        old = saved.get(section, {})
        for key in sorted(set(old) | set(values)):
            if old.get(key) != values.get(key):
                diffs.append(f"{key} = {old.get(key)!r} there, {values.get(key)!r} now")
    return "; ".join(diffs) or None


def broadcast(accelerator, obj):
    """Rank 0's `obj` on every rank (a picklable value)."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def candidates(accelerator, run_dir: Path, log=print) -> list[str]:
    """Rank 0 lists the intact complete checkpoints, newest first; every rank gets the same list.
    Raises CheckpointError when checkpoints exist but none is intact."""
    found, problems = [], []
    if accelerator.is_main_process:
        for path in reversed(complete(run_dir)):
            problem = verify(path)
            if problem is None:
                found.append(str(path))
            else:
                problems.append(f"{path.name}: {problem}")
                log(f"checkpoint {path} refused ({problem}); trying the previous one")
    found, problems = broadcast(accelerator, (found, problems))
    if problems and not found:
        raise CheckpointError(
            f"every checkpoint in {Path(run_dir) / 'checkpoints'} is unusable ({'; '.join(problems)}): "
            "restore one, or delete the folder to start this run again from step 0"
        )
    return found


def resume(accelerator, paths: list[str], log=print) -> tuple[LoopState, str] | None:
    """Load the newest of `paths` that every rank can load (model, optimizer, RNG, loop state);
    a checkpoint that fails to load on any rank is reported and the previous one is tried."""
    failures = []
    for path in paths:
        error = ""
        try:
            state = LoopState.from_json((Path(path) / LOOP_STATE).read_text())
            # Accelerate unpickles custom_checkpoint_*.pkl fully; quest writes none, so such a file
            # was planted: refuse the folder before anything of it is loaded.
            planted = sorted(p.name for p in Path(path).glob("custom_checkpoint_*"))
            if planted:
                raise ValueError(f"unexpected {planted} (quest never writes them)")
            accelerator.load_state(path)
        except Exception as err:  # any failure: the previous checkpoint may still be good
            error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        failed = torch.tensor(float(bool(error)), device=accelerator.device)
        if accelerator.num_processes > 1:
            failed = accelerator.reduce(failed, "max")
        if not bool(failed):
            return state, path
        failures.append(f"{Path(path).name}: {error or 'failed on another rank'}")
        if accelerator.is_main_process:
            log(f"checkpoint {path} does not load ({failures[-1]}); trying the previous one")
    if failures:
        raise CheckpointError(
            f"no checkpoint loads ({'; '.join(failures)}): restore one, or delete "
            "run.dir/checkpoints to start this run again from step 0"
        )
    return None


def check_same_run(accelerator, found: list[str], identity: dict, run_dir: Path) -> None:
    """Refuse to resume a checkpoint made by another run (its math fields or artifacts differ)."""
    if not found:
        return
    problem = None
    if accelerator.is_main_process:
        try:
            problem = identity_mismatch(read_identity(found[0]), identity)
        except (OSError, ValueError) as err:
            problem = f"its {IDENTITY} is unreadable ({err})"
    problem = broadcast(accelerator, problem)
    if problem:
        raise CheckpointError(
            f"run.dir {run_dir} holds a checkpoint of another run ({problem}): resuming would mix "
            "two runs; use a new run.dir (or put those values back to resume)"
        )


def backbone_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The student backbone's state dict from a training checkpoint folder (checked against its
    manifest), its model.safetensors, or an exported student.pt / any state-dict file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .student import ModelError, load_state

    path = Path(path)
    if path.is_dir():
        problem = verify(path) if (path / MARKER).is_file() else f"no {MARKER} manifest"
        if problem:
            raise ModelError(f"checkpoint {path} is not usable: {problem}")
        path = path / "model.safetensors"
    if path.suffix != ".safetensors":
        return load_state(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ModelError(f"cannot read {path}: {err}") from None
    # A checkpoint holds the whole student (backbone + codeword heads), maybe torch.compile'd.
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def export_student(
    path: Path, backbone: torch.nn.Module, heads: torch.nn.Module, meta: dict
) -> None:
    """student.pt: {'model': backbone state dict (loads as a teacher, RepDistiller-style), 'heads', meta}."""
    artifacts.save_torch(
        {"model": backbone.state_dict(), "heads": heads.state_dict(), "meta": meta}, path
    )
