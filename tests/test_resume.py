"""Resumed and restarted runs: the same run or a clear refusal, no record lost or doubled, no pickle."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest
import torch
from conftest import tiny

from quest import build, checkpoint, train
from quest.codebook import load_codebook, save_codebook
from quest.metrics import read_metrics
from quest.recipe import RecipeError
from quest.student import ModelError

pytestmark = pytest.mark.slow


def steps_of(run_dir) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in read_metrics(run_dir)]


def rewrite_manifest(path) -> None:
    """Make COMPLETE match the folder's files again (a checkpoint that verifies but may not load)."""
    info = json.loads((path / checkpoint.MARKER).read_text())
    info["files"] = checkpoint._manifest(path)
    (path / checkpoint.MARKER).write_text(json.dumps(info))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=16", "data.batch_size = 32 there, 16 now"),
        ("optim.lr=0.1", "optim.lr = 0.05 there, 0.1 now"),
        ("student.arch=resnet14", "student.arch = 'resnet8' there, 'resnet14' now"),
        ("distill.method=kd", "distill.method = 'none' there, 'kd' now"),
    ],
)
def test_resume_with_other_math_is_refused_and_writes_nothing(tmp_path, override, message):
    recipe = tiny(tmp_path, "run", optim__epochs=2, run__max_steps=8)
    train.main([str(recipe)])
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    extra = [f"teacher.checkpoint={json.dumps(str(run / 'student.pt'))}", "teacher.arch=resnet8"]
    with pytest.raises(checkpoint.CheckpointError) as err:
        train.main([str(recipe), override, "run.max_steps=0", *extra])
    assert message in str(err.value) and "new run.dir" in str(err.value)
    assert "\n" not in str(err.value)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before  # recipe.toml, metrics.jsonl, summary.json: untouched


def test_resume_may_change_logistics(tmp_path):
    recipe = tiny(tmp_path, "run", optim__epochs=2, run__max_steps=8)
    train.main([str(recipe)])
    summary = train.main(
        [
            str(recipe),
            "run.max_steps=0",
            "run.log_every=2",
            "run.eval_every=2",
            "data.num_workers=1",
        ]
    )
    assert summary["steps"] == 16
    assert "log_every = 2" in (tmp_path / "run" / "recipe.toml").read_text()


def test_swapped_codebook_is_refused_on_resume(tmp_path, trained_teacher):
    recipe = tiny(tmp_path, "q", method="quest", teacher=trained_teacher, run__max_steps=8)
    train.main([str(recipe)])
    path = tmp_path / "codebook.pt"
    book = load_codebook(path)
    # Same teacher, layer, K and seed in its metadata, other words: only the content tells.
    path.unlink()
    save_codebook(path, book.centroids.flip(0), {k: v for k, v in book.meta.items()})
    with pytest.raises(checkpoint.CheckpointError, match=r"level 0 sha256 = '\w+' there"):
        train.main([str(recipe), "run.max_steps=0"])


def test_killed_run_replays_without_duplicate_records(tmp_path):
    ref = tiny(tmp_path, "ref", optim__epochs=3, run__log_every=2)
    train.main([str(ref)])
    recipe = tiny(tmp_path, "run", optim__epochs=3, run__log_every=2, run__max_steps=14)
    train.main([str(recipe)])  # checkpoints at 8 (epoch end) and 14 (max_steps)
    # As if killed at step 14 before the checkpoint was written: records up to 14, checkpoint at 8.
    run = tmp_path / "run"
    for path in checkpoint.complete(run)[1:]:
        import shutil

        shutil.rmtree(path)
    assert [p.name for p in checkpoint.complete(run)] == ["step_00000008"]
    assert ("train", 14) in steps_of(run)
    summary = train.main([str(recipe), "run.max_steps=0"])
    assert summary["steps"] == 24
    got = steps_of(run)
    assert len(got) == len(set(got)), "a step was logged twice"
    assert got == steps_of(tmp_path / "ref")
    losses = {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}
    ref_losses = {
        r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref") if r["kind"] == "train"
    }
    assert losses == ref_losses


def test_summary_is_the_same_when_reentered_or_written_after_a_kill(tmp_path, trained_teacher):
    recipe = tiny(tmp_path, "q", method="quest", teacher=trained_teacher, optim__epochs=1)
    first = train.main([str(recipe)])
    run = tmp_path / "q"
    text = (run / "summary.json").read_text()
    assert "final_agreement" in first and first["teacher_top1"] is not None
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert train.main([str(recipe)]) == first  # re-entered when already finished
    assert (run / "summary.json").read_text() == text
    (run / "summary.json").unlink()  # killed after the last checkpoint, before summary.json
    (run / "student.pt").unlink()
    assert train.main([str(recipe)]) == first
    assert (run / "summary.json").read_text() == text


def test_all_checkpoints_unusable_is_refused(tmp_path):
    recipe = tiny(tmp_path, "run", optim__epochs=2)
    train.main([str(recipe)])
    paths = checkpoint.complete(tmp_path / "run")
    assert len(paths) == 2
    for path in paths:
        (path / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(checkpoint.CheckpointError) as err:
        train.main([str(recipe), "run.max_steps=0"])
    assert all(p.name in str(err.value) for p in paths)


def test_checkpoint_that_verifies_but_does_not_load_falls_back(tmp_path, capsys):
    recipe = tiny(tmp_path, "run", optim__epochs=3, run__max_steps=16)
    train.main([str(recipe)])
    newest = checkpoint.complete(tmp_path / "run")[-1]
    (newest / "model.safetensors").write_bytes(b"not a safetensors file")
    rewrite_manifest(newest)
    assert checkpoint.verify(newest) is None
    summary = train.main([str(recipe), "run.max_steps=0"])
    out = capsys.readouterr().out
    assert f"checkpoint {newest} does not load" in out and "resumed from" in out
    assert "step_00000008" in out.split("resumed from")[1].splitlines()[0]
    assert summary["steps"] == 24


def test_checkpoints_hold_no_pickle_and_a_planted_one_never_runs(tmp_path):
    recipe = tiny(tmp_path, "run", optim__epochs=1)
    train.main([str(recipe)])
    path = checkpoint.complete(tmp_path / "run")[-1]
    assert not list(path.glob("custom_checkpoint*"))
    state = json.loads((path / checkpoint.LOOP_STATE).read_text())
    assert state["step"] == 8
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (path / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload()))
    rewrite_manifest(path)
    with pytest.raises(checkpoint.CheckpointError, match=r"custom_checkpoint_0\.pkl"):
        train.main([str(recipe), "run.max_steps=0"])  # refused before Accelerate loads anything
    assert not marker.exists()


def test_checkpoint_files_get_the_mode_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        recipe = tiny(tmp_path, "run", optim__epochs=1)
        train.main([str(recipe)])
    finally:
        os.umask(old)
    path = checkpoint.complete(tmp_path / "run")[-1]
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes


def test_loop_state_round_trip_and_strict_json():
    state = checkpoint.LoopState(step=3, last_eval={"top1": 50.0}, teacher_top1=float("nan"))
    text = checkpoint.plain_json(vars(state))
    assert "NaN" not in text
    back = checkpoint.LoopState.from_json(text)
    assert back.step == 3 and back.last_eval == {"top1": 50.0} and back.teacher_top1 is None
    with pytest.raises(ValueError, match="unexpected keys"):
        checkpoint.LoopState.from_json('{"step": 1, "evil": 2}')


def test_identity_mismatch_names_each_field():
    saved = {"recipe": {"optim.lr": 0.1, "seed": 0}, "codebooks": {"level 0 sha256": "aa"}}
    assert checkpoint.identity_mismatch(saved, {"recipe": {"optim.lr": 0.1, "seed": 0}}) is None
    problem = checkpoint.identity_mismatch(saved, {"recipe": {"optim.lr": 0.2, "seed": 0}})
    assert problem == "optim.lr = 0.1 there, 0.2 now"
    problem = checkpoint.identity_mismatch(saved, {"codebooks": {"level 0 sha256": "bb"}})
    assert problem == "level 0 sha256 = 'aa' there, 'bb' now"


def test_grad_accum_must_split_the_per_process_batch():
    build.check_batch_split(16, 2, 2)
    with pytest.raises(RecipeError) as err:
        build.check_batch_split(12, 4, 2)
    for part in ("data.batch_size = 12", "run.grad_accum = 4", "2 processes", "multiple of 8"):
        assert part in str(err.value)


def test_train_step_refuses_an_uneven_split():
    batch = (torch.zeros(6, 1), torch.zeros(6))
    with pytest.raises(train.TrainingError, match="does not split into 4"):
        train.train_step(None, None, None, None, batch, train.Step(micro_batches=4))


def test_evaluate_takes_a_mid_training_checkpoint(tmp_path, trained_teacher):
    from quest import evaluate

    recipe = tiny(tmp_path, "q", method="quest", teacher=trained_teacher, optim__epochs=2)
    train.main([str(recipe)])
    first, last = checkpoint.complete(tmp_path / "q")
    final = evaluate.main([str(recipe)])  # the exported student.pt
    assert evaluate.main([str(recipe), "--checkpoint", str(last)]) == final
    assert evaluate.main([str(recipe), "--checkpoint", str(last / "model.safetensors")]) == final
    mid = evaluate.main([str(recipe), "--checkpoint", str(first)])
    assert mid["count"] == 64 and mid != final
    (first / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(ModelError, match="does not match its recorded size"):
        evaluate.main([str(recipe), "--checkpoint", str(first)])
