"""The trainer end to end on tiny synthetic data: artifacts, accuracy, resume, STOP, bad inputs."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import chained, synthetic_shards, tiny

from quest import checkpoint, train
from quest import recipe as recipes
from quest.codebook import CodebookError, load_codebook
from quest.data import DataError
from quest.student import ModelError, load_state

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# `python -m quest.train` with gc after every allocation, inherited by forked workers: garbage left
# before a fork is collected in the worker at once instead of whenever its allocation counts say so
GC_EAGER_TRAIN = (
    "import gc, sys; gc.set_threshold(1); from quest import train; train.main(sys.argv[1:])"
)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "student.pt", weights_only=True)["model"]


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_teacher_codebook_student_evaluate(tmp_path, trained_teacher):
    teacher_summary = json.loads((trained_teacher.parent / "summary.json").read_text())
    assert teacher_summary["top1"] > 70  # 4 classes: chance is 25 %
    recipe = tiny(tmp_path, "quest", method="quest", teacher=trained_teacher, codebook__size=24)
    summary = train.main([str(recipe)])
    run = tmp_path / "quest"
    for name in (
        "recipe.toml",
        "recipe.json",
        "env.json",
        "metrics.jsonl",
        "summary.json",
        "student.pt",
        "curves.png",
    ):
        assert (run / name).is_file(), name
    assert summary["top1"] > 60 and summary["teacher_top1"] > 70
    assert summary["steps"] == 3 * (256 // 32) and summary["epochs"] == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if r["kind"] == "train"]
    for key in (
        "step",
        "epoch",
        "lr",
        "loss",
        "ce",
        "quest",
        "grad_norm",
        "img_per_s",
        "agreement",
        "perplexity",
        "max_prob",
        "gamma",
    ):
        assert key in train_rec[-1], key
    assert train_rec[-1]["loss"] == pytest.approx(
        train_rec[-1]["ce"] + train_rec[-1]["quest"], rel=1e-4
    )
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2, 3]
    # The codebook artifact was built from the teacher's layer3 map (64 channels) with K = 24.
    book = load_codebook(tmp_path / "codebook.pt")
    assert book.centroids.shape == (24, 64) and book.meta["layer"] == "layer3"
    assert book.meta["teacher_weights"].startswith("sha256:")
    # Checkpoints are complete and verifiable; the exported student evaluates to the logged number.
    assert [p.name for p in checkpoint.complete(run)] == ["step_00000016", "step_00000024"]
    assert checkpoint.verify(checkpoint.complete(run)[-1]) is None
    from quest import evaluate

    result = evaluate.main([str(recipe)])
    assert result["top1"] == pytest.approx(summary["top1"]) and result["count"] == 64
    # The exported student loads strictly as a teacher of another run.
    assert set(load_state(run / "student.pt")) == set(weights(run))


def test_kd_and_quest_kd_log_their_parts(tmp_path, trained_teacher):
    recipe = tiny(tmp_path, "qkd", method="quest+kd", teacher=trained_teacher, optim__epochs=1)
    train.main([str(recipe)])
    last = [json.loads(x) for x in (tmp_path / "qkd" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in last if r["kind"] == "train"][-1]
    assert last["loss"] == pytest.approx(last["ce"] + last["quest"] + last["kd"], rel=1e-4)


def test_codebook_is_reused_when_matching_and_refused_when_not(tmp_path, trained_teacher):
    recipe = tiny(tmp_path, "a", method="quest", teacher=trained_teacher, optim__epochs=1)
    train.main([str(recipe)])
    stamp = (tmp_path / "codebook.pt").stat().st_mtime_ns
    train.main([str(tiny(tmp_path, "b", method="quest", teacher=trained_teacher, optim__epochs=1))])
    assert (tmp_path / "codebook.pt").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = tiny(
        tmp_path, "c", method="quest", teacher=trained_teacher, optim__epochs=1, codebook__size=8
    )
    with pytest.raises(CodebookError, match="size"):
        train.main([str(other)])


def test_stop_file_saves_exits_and_resume_is_exact(tmp_path, trained_teacher):
    common = {
        "teacher": trained_teacher,
        "method": "quest",
        "optim__epochs": 3,
        "run__save_every": 6,
    }
    full = tiny(tmp_path, "full", **common)
    train.main([str(full)])
    stopped = tiny(tmp_path, "stopped", **common)
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "STOP").touch()
    assert train.main([str(stopped)]) == {}  # saved and returned without finishing
    assert [p.name for p in checkpoint.complete(tmp_path / "stopped")][-1] == "step_00000010"
    assert (
        not (tmp_path / "stopped" / "STOP").exists()
        and not (tmp_path / "stopped" / "student.pt").exists()
    )
    summary = train.main([str(stopped)])  # resumes mid-epoch at step 10
    assert summary["steps"] == 24
    assert_identical(weights(tmp_path / "full"), weights(tmp_path / "stopped"))


def test_sigkill_after_checkpoint_then_restart_is_bit_identical(tmp_path, trained_teacher):
    common = {
        "teacher": trained_teacher,
        "method": "quest",
        "optim__epochs": 12,
        "run__save_every": 3,
    }
    train.main([str(tiny(tmp_path, "ref", **common))])
    recipe = tiny(tmp_path, "killed", **common)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, "-c", GC_EAGER_TRAIN, str(recipe)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while (
        not checkpoint.complete(tmp_path / "killed")
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "student.pt").exists()
    done = subprocess.run(
        [sys.executable, "-c", GC_EAGER_TRAIN, str(recipe)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    assert_identical(weights(tmp_path / "ref"), weights(tmp_path / "killed"))


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    recipe = tiny(tmp_path, "run", optim__epochs=3, run__max_steps=16)
    train.main([str(recipe)])
    newest = checkpoint.complete(tmp_path / "run")[-1]
    model_file = newest / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    assert "model.safetensors" in checkpoint.verify(newest)
    summary = train.main([str(recipe), "run.max_steps=0"])
    out = capsys.readouterr().out
    assert f"checkpoint {newest} refused" in out and "step_00000008" in out
    assert summary["steps"] == 24


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    recipe = tiny(
        tmp_path, "nan", optim__lr=1e30, run__save_every=1, run__log_every=1, optim__nesterov=False
    )
    with pytest.raises(train.TrainingError, match=r"NaN/inf at optimizer step \d+"):
        train.main([str(recipe)])
    good = checkpoint.complete(tmp_path / "nan")
    assert not (tmp_path / "nan" / "student.pt").exists()
    for path in good:  # no checkpoint holds non-finite weights
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        (
            {"teacher__checkpoint": "/nonexistent/teacher.pt"},
            ModelError,
            "teacher checkpoint not found: /nonexistent",
        ),
        ({"teacher__arch": "resnet14"}, ModelError, "missing keys .*layer1.1"),
        ({"arch": "vgg8"}, ModelError, r"\(512, 2, 2\).*\(64, 4, 4\).*teacher.pool"),
        ({"codebook__size": 100000}, CodebookError, "K=100000 is larger than the"),
        (
            {"data__dataset": "cifar100", "data__root": "/nonexistent"},
            DataError,
            "not found: /nonexistent",
        ),
    ],
)
def test_bad_inputs_fail_early_and_clearly(tmp_path, trained_teacher, overrides, error, pattern):
    arch = overrides.pop("arch", "resnet8")
    recipe = tiny(tmp_path, "bad", method="quest", arch=arch, teacher=trained_teacher, **overrides)
    with pytest.raises(error, match=pattern):
        train.main([str(recipe)])
    assert not (tmp_path / "codebook.pt").exists()  # every check runs before k-means
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize(
    "override",
    # Recipe-level mistakes (seed=-3, data.num_classes=1, ...) are tested in test_recipe.py.
    [
        "student.arch=resnet9",
        "teacher.checkpoint=IMAGENET1K_V1",
        "student.layer=layer9",
        "run.dir=FILE",
    ],
)
def test_bad_input_is_one_clear_line_before_any_teacher_is_trained(tmp_path, override):
    (tmp_path / "file").write_text("")
    override = override.replace("FILE", str(tmp_path / "file"))
    teacher_recipe = tiny(tmp_path, "t", optim__epochs=1)
    recipe = tiny(
        tmp_path,
        "s",
        method="quest",
        teacher=tmp_path / "missing.pt",
        teacher__recipe=str(teacher_recipe),
    )
    out = subprocess.run(
        [sys.executable, "-m", "quest.train", str(recipe), override],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    assert not (tmp_path / "t").exists() and not (tmp_path / "s").exists()


def test_random_teacher_is_refused(tmp_path):
    random_teacher = tmp_path / "random.pt"
    from quest.models import build_model

    torch.manual_seed(3)
    torch.save({"model": build_model("resnet8", 4).state_dict()}, random_teacher)
    recipe = tiny(tmp_path, "r", method="kd", teacher=random_teacher)
    with pytest.raises(train.TrainingError, match="reaches only"):
        train.main([str(recipe)])


def test_cli_prints_one_clear_line_for_user_errors(tmp_path):
    recipe = tiny(tmp_path, "x")
    out = subprocess.run(
        [sys.executable, "-m", "quest.train", str(recipe), "optim.lrr=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "did you mean 'optim.lr'" in out.stderr and "Traceback" not in out.stderr


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    """Every record is on disk when train.main returns, also when W&B's service process (wandb-core)
    gets no CPU for a while at the end, as on a loaded machine: the service writes a run's last
    records and closes its file when it handles the finish request, which the SDK sends without
    waiting. On Linux the test stops the service for 2 s from just before that request."""
    import threading

    from wandb.sdk.lib.service.service_connection import ServiceConnection

    monkeypatch.setenv("WANDB_MODE", "offline")
    inform_finish, stalled, timers = ServiceConnection.inform_finish, [], []
    linux = Path("/proc/self/fd").is_dir()

    def stalled_inform_finish(self, *args, **kwargs):
        for proc in Path("/proc").iterdir():
            try:  # /proc/PID/stat: "PID (comm) state ppid ..."
                comm, stat = (proc / "comm").read_text().strip(), (proc / "stat").read_text()
            except OSError:  # not a process, or it has exited meanwhile
                continue
            if comm == "wandb-core" and stat.rsplit(")", 1)[1].split()[1] == str(os.getpid()):
                stalled.append(int(proc.name))
        assert stalled, "no wandb-core child process to stall"
        for pid in stalled:
            os.kill(pid, signal.SIGSTOP)
        timer = threading.Timer(2.0, lambda: [os.kill(pid, signal.SIGCONT) for pid in stalled])
        timers.append(timer)
        timer.start()
        return inform_finish(self, *args, **kwargs)

    def still_open(path: Path) -> list[int]:
        """The stalled service processes that still hold `path` open."""
        holders = []
        for pid in stalled:
            try:
                links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            except OSError:  # the process has exited (or closed a descriptor meanwhile)
                continue
            if str(path.resolve()) in links:
                holders.append(pid)
        return holders

    if linux:
        monkeypatch.setattr(ServiceConnection, "inform_finish", stalled_inform_finish)
    recipe = tiny(tmp_path, "wb", optim__epochs=1, run__wandb=True)
    try:
        train.main([str(recipe)])
        runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
        run_id = (tmp_path / "wb" / "wandb_id.txt").read_text().strip()
        run_file = runs[0] / f"run-{run_id}.wandb" if len(runs) == 1 else None
        # At once, while a service that is still stopped could not write anything more.
        writers = still_open(run_file) if run_file else []
        data = run_file.read_bytes() if run_file else b""
    finally:
        for timer in timers:
            timer.join()
    assert len(timers) == (1 if linux else 0)  # the run was finished once, the service stalled then
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert not writers, "wandb-core still had the run's records to write when train.main returned"
    # The offline run's records (protobuf) carry every logged key: 2 train log steps, 1 evaluation.
    assert data.count(b"train/loss") >= 2 and b"eval/top1" in data, f"{len(data)} bytes"


def test_two_level_quest_trains_with_two_codebooks_and_sums_level_losses(tmp_path, trained_teacher):
    recipe = tiny(tmp_path, "ml", method="quest", teacher=trained_teacher, optim__epochs=2)
    text = recipe.read_text()
    text += (
        '[[levels]]\nteacher_layer = "layer2"\nstudent_layer = "layer2"\n'
        f'codebook = "{tmp_path / "cb_layer2.pt"}"\nbeta = 50.0\n'
        '[[levels]]\nteacher_layer = "layer3"\nstudent_layer = "layer3"\n'
        f'codebook = "{tmp_path / "cb_layer3.pt"}"\nbeta = 5.0\n'
    )
    recipe.write_text(text)
    summary = train.main([str(recipe)])
    assert summary["top1"] > 50
    assert load_codebook(tmp_path / "cb_layer2.pt").centroids.shape == (
        16,
        32,
    )  # layer2: 32 channels
    assert load_codebook(tmp_path / "cb_layer3.pt").centroids.shape == (16, 64)
    records = [json.loads(x) for x in (tmp_path / "ml" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["quest"] == pytest.approx(last["quest_0"] + last["quest_1"], rel=1e-4)
    assert last["loss"] == pytest.approx(last["ce"] + last["quest"], rel=1e-4)
    heads = torch.load(tmp_path / "ml" / "student.pt", weights_only=True)["heads"]
    assert heads["0.weight"].shape == (16, 32) and heads["1.weight"].shape == (16, 64)


def test_missing_teacher_is_trained_by_its_recipe(tmp_path):
    teacher_recipe = tiny(tmp_path, "t", optim__epochs=3)
    recipe = tiny(
        tmp_path,
        "s",
        method="kd",
        teacher=tmp_path / "crd" / "ckpt_epoch_240.pth",
        optim__epochs=1,
        teacher__recipe=str(teacher_recipe),
    )
    summary = train.main([str(recipe)])
    assert (tmp_path / "t" / "student.pt").is_file()  # the teacher run happened first
    used = (tmp_path / "s" / "recipe.toml").read_text()
    assert f'checkpoint = "{tmp_path / "t" / "student.pt"}"' in used
    assert summary["teacher_top1"] > 50


def test_teacher_recipe_gets_the_students_device_and_precision_not_its_model(tmp_path):
    recipe = chained(tmp_path)
    summary = train.main([str(recipe), "run.precision=bf16", "optim.lr=0.01", "run.max_steps=3"])
    assert summary["steps"] == 3
    used = recipes.load(tmp_path / "t" / "recipe.toml")
    assert used.run.precision == "bf16"  # one Accelerate state: the student's precision
    assert used.optim.lr == 0.05 and used.run.max_steps == 0  # the student's own keys stay its own
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["steps"] == 8


def test_teacher_trained_first_leaves_no_stray_loader_workers(tmp_path):
    """The quickstart's path (teacher trained in-process, codebook, student, workers everywhere)
    prints no stray errors: loader iterators left as garbage before the training loader forked its
    workers used to be collected in a worker ('can only test a child process'). An eager gc makes
    that deterministic (this test fails without the trainer's gc.collect())."""
    recipe = chained(tmp_path, "quest", data__num_workers=1)
    out = subprocess.run(
        [sys.executable, "-c", GC_EAGER_TRAIN, str(recipe)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "s" / "summary.json").is_file()
    assert "Exception ignored" not in out.stderr, out.stderr[-2000:]


def test_codebook_build_false_requires_an_existing_codebook(tmp_path, trained_teacher):
    recipe = tiny(tmp_path, "nb", method="quest", teacher=trained_teacher, codebook__build=False)
    with pytest.raises(CodebookError, match=r"codebook\.build = false"):
        train.main([str(recipe)])
    assert not (tmp_path / "codebook.pt").exists()


def test_training_from_shards_matches_training_from_the_folder(tmp_path):
    from conftest import write_recipe

    patterns = synthetic_shards(tmp_path)
    results = {}
    for kind in ("folder", "wds"):
        d = {
            "dataset": kind,
            "batch_size": 32,
            "num_workers": 0,
            "image_size": 16,
            "transforms": "cifar",
        }
        if kind == "folder":
            d["root"] = str(tmp_path / "folder")
        else:
            d.update(patterns)
        recipe = write_recipe(
            tmp_path / f"{kind}.toml",
            {
                "name": kind,
                "seed": 0,
                "run": {"dir": str(tmp_path / kind), "channels_last": False},
                "data": d,
                "student": {"arch": "resnet8"},
                "distill": {"method": "none"},
                "optim": {"epochs": 4, "lr": 0.05},
            },
        )
        results[kind] = train.main([str(recipe)])
    assert results["wds"]["eval_count"] == results["folder"]["eval_count"] == 64
    assert results["wds"]["steps"] == results["folder"]["steps"] == 4 * 8
    assert results["folder"]["top1"] > 60 and results["wds"]["top1"] > 60
    assert abs(results["folder"]["top1"] - results["wds"]["top1"]) < 15
    for kind in ("folder", "wds"):  # the class numbering is recorded with the run
        classes = json.loads((tmp_path / kind / "classes.json").read_text())
        assert classes == ["class0", "class1", "class2", "class3"]
        assert torch.load(tmp_path / kind / "student.pt")["meta"]["classes"] == classes


def test_unreadable_training_samples_are_counted_in_the_run(tmp_path):
    patterns = synthetic_shards(tmp_path)
    shard = tmp_path / "wds" / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:  # the same shard with two images that do not decode
        for i, (member, blob) in enumerate(members):
            blob = b"\x89PNG\r\n\x1a\n cut" if i in (0, 10) else blob
            member.size = len(blob)
            tar.addfile(member, io.BytesIO(blob))
    recipe = tiny(
        tmp_path,
        "bad",
        data__dataset="wds",
        optim__epochs=1,
        **{f"data__{k}": v for k, v in patterns.items()},
    )
    with pytest.warns(UserWarning, match=r"skipping training sample .*train-000000\.tar key"):
        summary = train.main([str(recipe)])
    assert summary["steps"] == 256 // 32 and summary["eval_count"] == 64
    assert summary["skipped_train_samples"] > 0
    records = (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, records) if r["kind"] == "eval"]
    assert evals[-1]["skipped_train_samples"] == summary["skipped_train_samples"]
