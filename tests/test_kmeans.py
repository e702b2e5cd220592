"""The codebook stage's pieces: faiss k-means, single-process Lloyd refinement, the codebook artifact
(save/load/validation) and the streaming VectorSample. (The two-rank Lloyd is tested elsewhere.)"""

import hashlib
import importlib.util
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny

from quest import build, codebook, kmeans
from quest import recipe as R
from quest.artifacts import atomic_write
from quest.codebook import (
    FORMAT,
    MATCH_FIELDS,
    Codebook,
    CodebookError,
    VectorSample,
    expected_meta,
    load_codebook,
    save_codebook,
)
from quest.kmeans import assign_chunked, fit_kmeans, lloyd_refine
from quest.models import build_model

needs_faiss = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss not installed (quest[cpu])"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    # fit_kmeans asks faiss for every core: keep it to one as well on this shared machine.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kmeans, "available_cpus", lambda: 1)
        yield


def blobs(n_blobs, per_blob, dim, spread=10.0, sigma=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_blobs, dim, generator=g) * spread
    x = centres.repeat_interleave(per_blob, 0) + sigma * torch.randn(
        n_blobs * per_blob, dim, generator=g
    )
    return centres, x


def brute_objective(x, c):
    """Σ_i min_k ||x_i - c_k||² in float64 with NumPy broadcasting."""
    x, c = np.asarray(x, dtype=np.float64), np.asarray(c, dtype=np.float64)
    return float(((x[:, None, :] - c[None]) ** 2).sum(-1).min(1).sum())


def numpy_lloyd(x, c, iterations):
    """Plain Lloyd in float64: (centroids after `iterations` updates, objective before each update
    and after the last). Empty clusters keep their centroid."""
    x, c = np.asarray(x, dtype=np.float64), np.asarray(c, dtype=np.float64).copy()
    history = []
    for it in range(iterations + 1):
        d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        idx = d.argmin(1)
        history.append(float(d[np.arange(len(x)), idx].sum()))
        if it == iterations:
            break
        for k in range(len(c)):
            members = x[idx == k]
            if len(members):
                c[k] = members.mean(0)
    return c, history


# ------------------------------------------------------------------------------------ fit_kmeans


@needs_faiss
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_kmeans_two_blobs_exact(seed):
    # With two well-separated blobs Lloyd escapes any random initialisation: both centres recovered.
    centres, x = blobs(2, 150, 16, seed=seed)
    r = fit_kmeans(x, 2, iterations=10, seed=seed, gpu=False)
    assert r.centroids.shape == (2, 16) and r.centroids.dtype == torch.float32
    assert r.backend == "faiss-cpu"
    d = torch.cdist(centres, r.centroids)
    assert d.min(1).values.max() < 0.1
    assert sorted(d.argmin(1).tolist()) == [0, 1]  # one found centroid per true centre
    assert sorted(r.cluster_sizes.tolist()) == [150, 150]


@needs_faiss
def test_fit_kmeans_recovers_eight_blobs_in_16d():
    # faiss initialises from random data points (k! / k^k chance to hit every blob with K = 8), so an
    # over-complete codebook is what reliably covers every blob: each true centre has a found
    # centroid close to it, and no centroid is stranded between blobs.
    centres, x = blobs(8, 100, 16)
    assert torch.pdist(centres).min() > 20
    r = fit_kmeans(x, 64, iterations=20, seed=0, gpu=False)
    assert torch.cdist(centres, r.centroids).min(1).values.max() < 0.3
    assert torch.cdist(r.centroids, centres).min(1).values.max() < 1.0


@needs_faiss
def test_fit_kmeans_leaves_the_thread_count_as_it_found_it():
    """faiss and torch may share one OpenMP runtime: k-means takes every core, then gives them
    back, or the training after an in-run codebook build oversubscribes the machine. A fresh
    process with OMP_NUM_THREADS=1, as a launcher starts each rank."""
    code = (
        "import torch; from quest.kmeans import fit_kmeans; "
        "fit_kmeans(torch.randn(2000, 16), 8, iterations=2, gpu=False); "
        "print(torch.get_num_threads())"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1"]


def test_fit_kmeans_deterministic_per_seed():
    _, x = blobs(8, 50, 16, sigma=2.0)
    a = fit_kmeans(x, 8, iterations=5, seed=3, gpu=False)
    b = fit_kmeans(x, 8, iterations=5, seed=3, gpu=False)
    c = fit_kmeans(x, 8, iterations=5, seed=4, gpu=False)
    assert torch.equal(a.centroids, b.centroids)
    assert a.objective == b.objective
    assert not torch.equal(a.centroids, c.centroids)


@needs_faiss
def test_fit_kmeans_k_larger_than_n():
    with pytest.raises(ValueError, match=r"codebook\.size") as info:
        fit_kmeans(torch.randn(10, 4), 16, gpu=False)
    assert "16" in str(info.value) and "10" in str(info.value)


@needs_faiss
def test_fit_kmeans_objective_sizes_and_raw_euclidean():
    _, x = blobs(4, 60, 8, spread=3.0, sigma=1.0, seed=5)
    r = fit_kmeans(x, 6, iterations=15, seed=1, gpu=False)
    obj = r.objective
    assert 1 <= len(obj) <= 15
    assert obj[-1] <= obj[0]
    assert all(b <= a * (1 + 1e-5) for a, b in itertools.pairwise(obj))
    assert r.vectors_used == 240
    # sizes: nearest-centroid counts over every vector, computed independently
    nearest = torch.cdist(x.double(), r.centroids.double()).argmin(1)
    assert r.cluster_sizes.tolist() == torch.bincount(nearest, minlength=6).tolist()
    assert int(r.cluster_sizes.sum()) == 240
    # the final objective is the objective of the final centroids (up to the last update)
    assert brute_objective(x, r.centroids) <= obj[-1] * (1 + 1e-4)
    # no normalisation, not spherical: scaling the data scales the centroids
    scaled = fit_kmeans(x * 100, 6, iterations=15, seed=1, gpu=False)
    torch.testing.assert_close(scaled.centroids, r.centroids * 100, rtol=1e-4, atol=1e-3)


@needs_faiss
def test_fit_kmeans_max_points_subsamples():
    _, x = blobs(2, 400, 16, seed=7)
    full = fit_kmeans(x, 2, iterations=10, seed=0, gpu=False)
    part = fit_kmeans(x, 2, iterations=10, seed=0, max_points=400, gpu=False)
    assert full.vectors_used == 800
    assert part.vectors_used == 400
    # faiss really clustered ~400 vectors: the objective is a sum over half as many points
    assert part.objective[-1] < 0.75 * full.objective[-1]
    assert int(part.cluster_sizes.sum()) == 800  # sizes are counted over every vector
    # a faithful default (max_points = 0) uses every vector even beyond faiss's 256 per centroid
    many = fit_kmeans(torch.randn(1200, 2), 2, iterations=2, seed=0, gpu=False)
    assert many.vectors_used == 1200


# ------------------------------------------------------------------------------------ Lloyd


def test_assign_chunked_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(50, 3, generator=g), torch.randn(7, 3, generator=g)
    idx, dmin = assign_chunked(x, c, chunk=8)
    d = ((x[:, None, :].double() - c[None].double()) ** 2).sum(-1)
    assert idx.tolist() == d.argmin(1).tolist()
    torch.testing.assert_close(dmin.double(), d.min(1).values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [65536, 64])
def test_lloyd_refine_equals_numpy_lloyd(chunk):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, generator=g)
    seed_centroids = x[:6] + 0.5
    got, history = lloyd_refine(x, seed_centroids, iterations=4, chunk=chunk)
    want, want_history = numpy_lloyd(x.numpy(), seed_centroids.numpy(), 4)
    assert len(history) == 5
    np.testing.assert_allclose(history, want_history, rtol=1e-5)
    assert all(b < a for a, b in itertools.pairwise(want_history))  # still moving: a real test
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    assert got.dtype == torch.float32
    assert torch.equal(seed_centroids, x[:6] + 0.5)  # the seed tensor is not modified


@needs_faiss
def test_lloyd_refine_never_worse_than_seed():
    _, x = blobs(3, 40, 4, spread=2.0, sigma=1.0, seed=2)
    seed_centroids = fit_kmeans(x, 5, iterations=3, seed=0, gpu=False).centroids
    got, history = lloyd_refine(x, seed_centroids, iterations=6)
    assert history[0] == pytest.approx(brute_objective(x, seed_centroids), rel=1e-5)
    assert brute_objective(x, got) <= history[0] * (1 + 1e-6)
    assert brute_objective(x, got) == pytest.approx(min(history), rel=1e-5)
    # zero iterations: the seed itself
    same, hist0 = lloyd_refine(x, seed_centroids, iterations=0)
    assert torch.equal(same, seed_centroids) and len(hist0) == 1


def test_lloyd_refine_returns_best_not_last(monkeypatch):
    # Lloyd never increases the objective in exact arithmetic; fake a worse objective after the
    # first update to check that the lowest-objective centroids are returned, not the last ones.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 4, generator=g)
    seed_centroids = x[:5] + 0.3
    calls = []

    def inflated(x_, c_, chunk=65536):
        idx, dmin = assign_chunked(x_, c_, chunk)
        calls.append(len(calls))
        return idx, dmin * (10.0 if len(calls) > 2 else 1.0)

    monkeypatch.setattr(kmeans, "assign_chunked", inflated)
    got, history = lloyd_refine(x, seed_centroids, iterations=3)
    assert len(calls) == 4 and history[2] > history[1]
    after_one, _ = numpy_lloyd(x.numpy(), seed_centroids.numpy(), 1)
    np.testing.assert_allclose(got.numpy(), after_one, rtol=1e-5, atol=1e-5)


def test_lloyd_refine_empty_cluster_keeps_position():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100, 3, generator=g)
    far = torch.tensor([1000.0, -1000.0, 500.0])
    seed_centroids = torch.cat([x[:3].clone(), far[None]])
    got, history = lloyd_refine(x, seed_centroids, iterations=3)
    assert torch.equal(got[3], far)
    want, _ = numpy_lloyd(x.numpy(), seed_centroids.numpy(), 3)
    np.testing.assert_allclose(got[:3].numpy(), want[:3], rtol=1e-5, atol=1e-5)
    assert all(math.isfinite(h) for h in history)


# ------------------------------------------------------------------------------------ artifact


META = {
    "teacher_arch": "resnet32x4",
    "teacher_weights": "sha256:0123456789abcdef",
    "layer": "layer3",
    "pool": 1,
    "size": 8,
    "beta": 5.0,
    "seed": 11,
    "objective": [3.0, 2.0, 1.5],
}


@pytest.fixture
def artifact(tmp_path):
    centroids = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    path = save_codebook(tmp_path / "cb" / "codebook.pt", centroids, dict(META))
    return path, centroids


def test_codebook_round_trip(artifact):
    path, centroids = artifact
    book = load_codebook(path)
    assert book.centroids.dtype == torch.float32
    assert torch.equal(book.centroids, centroids.float())
    assert book.meta["format"] == FORMAT
    for key, value in META.items():
        assert book.meta[key] == value
    for key in ("torch", "python", "git_commit"):  # provenance
        assert isinstance(book.meta[key], str) and book.meta[key]
    assert book.meta["torch"] == str(torch.__version__)
    torch.testing.assert_close(book.sq_norms, (centroids.float() ** 2).sum(1))
    assert load_codebook(path, expect={k: META[k] for k in ("layer", "pool", "size")}, channels=4)


def test_codebook_save_is_atomic(artifact):
    path, centroids = artifact
    assert os.listdir(path.parent) == ["codebook.pt"]  # no temp file left after success
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        save_codebook(path, centroids, {**META, "bad": lambda: None})
    assert os.listdir(path.parent) == ["codebook.pt"]  # failed save: no temp file either
    assert path.read_bytes() == before  # and the previous artifact is intact


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    from quest.artifacts import save_text

    old = os.umask(0o022)
    try:
        path = save_text("x", tmp_path / "a.txt")
        (tmp_path / "b.txt").write_text("x")
        assert path.stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("field", "value"),
    [("layer", "layer4"), ("pool", 2), ("size", 16), ("teacher_arch", "wrn_40_2")],
)
def test_codebook_expect_mismatch_names_field_and_values(artifact, field, value):
    path, _ = artifact
    with pytest.raises(CodebookError) as info:
        load_codebook(path, expect={field: value})
    msg = str(info.value)
    assert field in msg and repr(META[field]) in msg and repr(value) in msg and str(path) in msg


def meta_for(recipe: R.Recipe, level: R.Level, mixed_precision: str) -> dict:
    """expected_meta for a recipe's level, as the codebook stage calls it."""
    return expected_meta(
        recipe.teacher, level, recipe.codebook, seed=recipe.seed, mixed_precision=mixed_precision
    )


def test_codebook_expected_meta_from_recipe(tmp_path):
    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(b"weights v1")
    recipe = R.from_dict(
        {
            "teacher": {"arch": "resnet32x4", "checkpoint": str(ckpt), "layer": "layer3"},
            "student": {"arch": "resnet8x4"},
            "codebook": {"path": str(tmp_path / "cb.pt"), "size": 8},
        }
    )
    (level,) = recipe.quest_levels()
    expect = meta_for(recipe, level, "no")
    assert expect["teacher_weights"].startswith("sha256:") and expect["size"] == 8
    save_codebook(level.codebook, torch.randn(8, 4), expect)
    assert load_codebook(level.codebook, expect=expect).meta["layer"] == "layer3"
    ckpt.write_bytes(b"weights v2")  # another teacher: the artifact must be refused
    with pytest.raises(CodebookError, match="teacher_weights"):
        load_codebook(level.codebook, expect=meta_for(recipe, level, "no"))


def test_codebook_channels_mismatch(artifact):
    path, _ = artifact
    with pytest.raises(CodebookError, match="4 dims") as info:
        load_codebook(path, channels=5)
    assert "5 channels" in str(info.value)


def test_codebook_corrupt_files(tmp_path, artifact):
    path, _ = artifact
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    other = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    for bad in (truncated, garbage, other):
        with pytest.raises(CodebookError, match="not a readable quest codebook"):
            load_codebook(bad)
    with pytest.raises(CodebookError, match="not found"):
        load_codebook(tmp_path / "missing.pt")


def test_codebook_malformed_contents(tmp_path):
    wrong_size = save_codebook(tmp_path / "a.pt", torch.randn(8, 4), {**META, "size": 9})
    with pytest.raises(CodebookError, match="malformed"):
        load_codebook(wrong_size)
    nan = torch.randn(8, 4)
    nan[2, 1] = float("nan")
    with pytest.raises(CodebookError, match="not finite"):
        load_codebook(save_codebook(tmp_path / "b.pt", nan, dict(META)))
    other_format = tmp_path / "c.pt"
    torch.save(
        {"centroids": torch.randn(8, 4), "meta": {**META, "format": "other/9"}}, other_format
    )
    with pytest.raises(CodebookError, match="format"):
        load_codebook(other_format)


def test_codebook_carries_the_content_hash_of_its_centroids(artifact):
    path, centroids = artifact
    want = hashlib.sha256(centroids.float().numpy().astype("<f4").tobytes()).hexdigest()
    book = load_codebook(path)
    assert book.meta["centroids_sha256"] == book.digest == want
    assert Codebook(centroids.float(), {}).digest == want  # computed for a codebook built in memory
    assert book.to("cpu").digest == want


def test_codebook_with_a_flipped_byte_is_refused(artifact):
    path, centroids = artifact
    data = bytearray(path.read_bytes())
    at = data.find(centroids.float().numpy().tobytes())
    assert at >= 0  # torch.save stores the tensor's bytes as they are
    data[at + 4] ^= 0x01  # the lowest mantissa bit of one word: still a finite number
    path.write_bytes(bytes(data))
    with pytest.raises(CodebookError, match="corrupt or altered") as info:
        load_codebook(path)
    assert str(path) in str(info.value) and "rebuild" in str(info.value)


def test_codebook_of_the_previous_format_asks_for_a_rebuild(tmp_path):
    old = tmp_path / "old.pt"
    torch.save(
        {"centroids": torch.randn(8, 4), "meta": {**META, "format": "quest-codebook/1"}}, old
    )
    with pytest.raises(CodebookError, match="quest-codebook/1") as info:
        load_codebook(old)
    assert "content hash" in str(info.value) and "python -m quest.codebook" in str(info.value)


def quest_recipe(tmp_path, **codebook_keys):
    ckpt = tmp_path / "teacher.pt"
    if not ckpt.exists():
        ckpt.write_bytes(b"weights")
    return R.from_dict(
        {
            "seed": 0,
            "teacher": {"arch": "resnet32x4", "checkpoint": str(ckpt), "layer": "layer3"},
            "student": {"arch": "resnet8x4"},
            "codebook": {"path": str(tmp_path / "cb.pt"), "size": 8, **codebook_keys},
        }
    )


def test_codebook_built_with_another_seed_is_refused(tmp_path):
    built_by = quest_recipe(tmp_path, seed=1)
    (level,) = built_by.quest_levels()
    save_codebook(level.codebook, torch.randn(8, 4), meta_for(built_by, level, "no"))
    recipe = quest_recipe(tmp_path)  # codebook.seed = -1: the recipe's seed, 0
    assert tuple(meta_for(recipe, level, "no")) == MATCH_FIELDS
    assert meta_for(recipe, level, "no")["seed"] == 0
    with pytest.raises(CodebookError) as info:
        load_codebook(level.codebook, expect=meta_for(recipe, level, "no"))
    msg = str(info.value)
    assert "seed = 1" in msg and "has 0" in msg and "codebook.seed" in msg
    # the same seed, given either way, is accepted
    for same in (quest_recipe(tmp_path, seed=1), R.from_dict({**R.to_dict(recipe), "seed": 1})):
        assert load_codebook(level.codebook, expect=meta_for(same, level, "no"))


def test_codebook_feature_precision_is_recorded_and_checked(tmp_path):
    recipe = quest_recipe(tmp_path)
    (level,) = recipe.quest_levels()
    assert meta_for(recipe, level, "no")["feature_precision"] == "fp32"
    assert meta_for(recipe, level, "fp16")["feature_precision"] == "fp16"
    save_codebook(level.codebook, torch.randn(8, 4), meta_for(recipe, level, "bf16"))
    assert load_codebook(level.codebook, expect=meta_for(recipe, level, "bf16"))
    with pytest.raises(CodebookError, match="bf16") as info:
        load_codebook(level.codebook, expect=meta_for(recipe, level, "no"))
    assert "run.precision = 'bf16'" in str(info.value)
    # words from fp32 features serve a run at any precision
    Path(level.codebook).unlink()
    save_codebook(level.codebook, torch.randn(8, 4), meta_for(recipe, level, "no"))
    assert load_codebook(level.codebook, expect=meta_for(recipe, level, "bf16"))


def test_save_codebook_never_replaces_an_existing_artifact(artifact):
    path, centroids = artifact
    before = path.read_bytes()
    with pytest.raises(CodebookError, match="exists") as info:
        save_codebook(path, centroids * 2, dict(META))
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["codebook.pt"]


def test_atomic_write_without_overwrite_loses_a_race_cleanly(tmp_path):
    target = tmp_path / "a.txt"

    def write(tmp):
        Path(tmp).write_text("mine")
        target.write_text("theirs")  # another process publishes the same file meanwhile

    with pytest.raises(FileExistsError):
        atomic_write(target, write, overwrite=False)
    assert target.read_text() == "theirs" and os.listdir(tmp_path) == ["a.txt"]
    assert atomic_write(tmp_path / "b.txt", lambda t: Path(t).write_text("b"), overwrite=False)
    assert (tmp_path / "b.txt").read_text() == "b" and sorted(os.listdir(tmp_path)) == [
        "a.txt",
        "b.txt",
    ]


def test_atomic_write_without_hard_links_still_never_overwrites(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = atomic_write(tmp_path / "a.txt", lambda t: Path(t).write_text("a"), overwrite=False)
    assert path.read_text() == "a"
    with pytest.raises(FileExistsError):
        atomic_write(path, lambda t: Path(t).write_text("b"), overwrite=False)
    assert path.read_text() == "a" and os.listdir(tmp_path) == ["a.txt"]


def untrained_teacher(tmp_path) -> Path:
    """A resnet8 state dict for the synthetic task: features to cluster, no training needed."""
    path = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(build_model("resnet8", 4, 3).state_dict(), path)
    return path


@pytest.mark.slow
def test_ensure_codebooks_builds_only_the_missing_level(tmp_path):
    recipe = tiny(tmp_path, "ml", method="quest", teacher=untrained_teacher(tmp_path))
    recipe.write_text(
        recipe.read_text()
        + '[[levels]]\nteacher_layer = "layer2"\nstudent_layer = "layer2"\n'
        + f'codebook = "{tmp_path / "cb_layer2.pt"}"\n'
        + '[[levels]]\nteacher_layer = "layer3"\nstudent_layer = "layer3"\n'
        + f'codebook = "{tmp_path / "cb_layer3.pt"}"\n'
    )
    r, accelerator, loaders = build.setup(str(recipe), [])
    levels = build.quest_levels(r)
    teacher = build.build_teacher(r.teacher, levels, loaders, accelerator.device)
    features = build.lazy_feature_loader(
        r.data, accelerator, seed=r.seed, max_images=r.codebook.max_images
    )
    kw = {"teacher_cfg": r.teacher, "seed": r.seed, "features": features}
    first = codebook.ensure_codebooks(r.codebook, levels, teacher, accelerator, **kw)
    layer2, layer3 = tmp_path / "cb_layer2.pt", tmp_path / "cb_layer3.pt"
    kept = layer2.stat()
    layer3.unlink()
    second = codebook.ensure_codebooks(r.codebook, levels, teacher, accelerator, **kw)
    assert layer2.stat().st_ino == kept.st_ino and layer2.stat().st_mtime_ns == kept.st_mtime_ns
    assert second[0].digest == first[0].digest
    assert layer3.is_file() and second[1].centroids.shape == (16, 64)
    assert second[1].digest == load_codebook(layer3).digest


@pytest.mark.slow
def test_codebook_stage_reuses_a_matching_artifact_and_never_overwrites(tmp_path, capsys):
    recipe = tiny(tmp_path, "cb", method="quest", teacher=untrained_teacher(tmp_path))
    path = tmp_path / "codebook.pt"
    codebook.main([str(recipe)])
    built = capsys.readouterr().out
    before, data = path.stat(), path.read_bytes()
    codebook.main([str(recipe)])
    assert path.stat().st_ino == before.st_ino and path.read_bytes() == data
    assert "built" in built and "reused" in capsys.readouterr().out
    with pytest.raises(CodebookError, match="seed") as info:
        codebook.main([str(recipe), "codebook.seed=1"])
    assert str(path) in str(info.value)
    assert path.read_bytes() == data
    # codebook.build = false (codebooks learned elsewhere): the stage does not build them either
    other = tmp_path / "other.pt"
    with pytest.raises(CodebookError, match=r"codebook\.build = false"):
        codebook.main([str(recipe), "codebook.build=false", f"codebook.path={other}"])
    assert not other.exists()


# ------------------------------------------------------------------------------------ VectorSample


def stream(total, batch, g):
    """Rows [i, -i] for i in 0..total-1, in batches of random-ish size."""
    start = 0
    while start < total:
        n = min(total - start, batch + int(torch.randint(0, batch, (1,), generator=g)))
        idx = torch.arange(start, start + n, dtype=torch.float32)
        yield torch.stack([idx, -idx], 1)
        start += n


def test_vector_sample_capacity_seen_and_uniform():
    total, capacity = 20_000, 1000
    sample = VectorSample(capacity, torch.Generator().manual_seed(0))
    for rows in stream(total, 150, torch.Generator().manual_seed(1)):
        sample.add(rows)
        assert sample.rows.shape[0] <= capacity
    assert sample.seen == total
    assert sample.rows.shape == (capacity, 2) and sample.rows.dtype == torch.float32
    idx = sample.rows[:, 0].double()
    assert torch.equal(sample.rows[:, 1], -sample.rows[:, 0])  # whole rows, not mixed up
    assert len(set(idx.tolist())) == capacity
    # uniform over the whole stream: mean index ≈ the middle (sd of the mean ≈ 183), halves balanced
    assert abs(idx.mean().item() - (total - 1) / 2) < 750
    first_half = (idx < total / 2).double().mean().item()
    assert abs(first_half - 0.5) < 0.07
    quarter = torch.histc(idx.float(), bins=4, min=0, max=total).tolist()
    assert all(abs(q - capacity / 4) < 70 for q in quarter)  # sd ≈ 14


def test_vector_sample_without_replacement_and_take():
    sample = VectorSample(100, torch.Generator().manual_seed(2))
    for rows in stream(1000, 30, torch.Generator().manual_seed(3)):
        sample.add(rows)
    values = sample.rows[:, 0].tolist()
    assert len(set(values)) == 100  # no row twice
    assert all(v == int(v) and 0 <= v < 1000 for v in values)
    taken = sample.take(10)
    assert taken.shape == (10, 2)
    assert set(taken[:, 0].tolist()) <= set(values)
    assert len(set(taken[:, 0].tolist())) == 10
    assert sample.take(500).shape == (100, 2)  # asking for more gives the whole sample


@pytest.mark.parametrize("block_rows", [100_000, 64, 1])
def test_vector_sample_capacity_zero_keeps_everything(monkeypatch, block_rows):
    monkeypatch.setattr(VectorSample, "BLOCK_BYTES", block_rows * 2 * 4)  # rows of 2 float32
    sample = VectorSample(0, torch.Generator().manual_seed(4))
    batches = list(stream(777, 50, torch.Generator().manual_seed(5)))
    for rows in batches[:5]:
        sample.add(rows)
    assert sample.rows.shape[0] == sum(len(b) for b in batches[:5])  # read midway: joined once
    for rows in batches[5:]:
        sample.add(rows)
    assert sample.seen == 777
    assert sample.rows[:, 0].tolist() == list(range(777))  # every row, in stream order
    assert torch.equal(sample.rows[:, 1], -sample.rows[:, 0])
    assert sample.keys.shape == (777,) and len(set(sample.keys.tolist())) == 777
    assert sorted(sample.take(777)[:, 0].tolist()) == list(range(777))
    taken = sample.take(100)[:, 0]
    assert torch.equal(taken, sample.rows[sample.keys.argsort()[:100], 0])


def test_vector_sample_low_precision_rows_kept_as_float32():
    sample = VectorSample(3, torch.Generator().manual_seed(6))
    sample.add(torch.tensor([[0.5, 1.5], [2.0, -3.0]], dtype=torch.bfloat16, requires_grad=True))
    sample.add(torch.tensor([[4.0, 8.0], [16.0, 32.0]], dtype=torch.float16))
    assert sample.rows.dtype == torch.float32 and not sample.rows.requires_grad
    assert sample.seen == 4 and sample.rows.shape == (3, 2)
    all_rows = {(0.5, 1.5), (2.0, -3.0), (4.0, 8.0), (16.0, 32.0)}
    assert {tuple(r) for r in sample.rows.tolist()} < all_rows


def test_vector_sample_same_generator_same_sample():
    def run():
        s = VectorSample(50, torch.Generator().manual_seed(9))
        for rows in stream(600, 40, torch.Generator().manual_seed(1)):
            s.add(rows)
        return s.rows

    assert torch.equal(run(), run())
