"""quest.recipe: TOML → typed dataclasses, errors that say what to change, overrides, round trips."""

import dataclasses
from pathlib import Path

import pytest

from quest import recipe as R
from quest.recipe import Level, Recipe, RecipeError

MINIMAL = """
name = "tiny"
seed = 3

[student]
arch = "resnet8"

[distill]
method = "none"
"""

QUEST = """
name = "q"

[teacher]
arch = "resnet32x4"
layer = "layer3"
pool = 2

[student]
arch = "resnet8x4"
layer = "layer3"

[codebook]
path = "runs/cb.pt"
size = 64
beta = 7.5
"""

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("**/*.toml"))


def write(tmp_path, text, name="recipe.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path, text, overrides=(), name="recipe.toml"):
    path = write(tmp_path, text, name)
    with pytest.raises(RecipeError) as info:
        R.load(path, overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------ loading


def test_minimal_recipe_loads_with_defaults(tmp_path):
    r = R.load(write(tmp_path, MINIMAL))
    assert isinstance(r, Recipe)
    assert r.name == "tiny" and r.seed == 3
    assert r.student.arch == "resnet8" and r.distill.method == "none"
    assert r.optim == R.Optim() and r.data == R.Data() and r.codebook == R.Codebook()
    assert not r.uses_teacher and not r.uses_quest
    assert issubclass(RecipeError, ValueError)


def test_quest_recipe_loads(tmp_path):
    r = R.load(write(tmp_path, QUEST))
    assert r.uses_quest and r.uses_teacher
    assert r.codebook.size == 64 and r.codebook.beta == 7.5 and r.teacher.pool == 2


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    msg = error_of(tmp_path, MINIMAL + "\n[optim]\nlrr = 0.1\n", name="my_recipe.toml")
    assert "my_recipe.toml" in msg
    assert "lrr" in msg
    assert "did you mean 'optim.lr'" in msg
    assert "momentum" in msg  # the valid keys are listed


def test_unknown_section(tmp_path):
    msg = error_of(tmp_path, MINIMAL + "\n[optimm]\nlr = 0.1\n")
    assert "optimm" in msg and "did you mean 'optim'" in msg


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    msg = error_of(tmp_path, MINIMAL + "\n[codebook]\nzzzzzz = 1\n")
    assert "codebook.zzzzzz" in msg and "did you mean" not in msg and "beta" in msg


def test_section_that_is_not_a_table(tmp_path):
    msg = error_of(tmp_path, "optim = 3\n" + MINIMAL)
    assert "optim" in msg and "table" in msg


def test_wrong_type_names_key_and_expected_type(tmp_path):
    msg = error_of(tmp_path, MINIMAL + '\n[data]\nbatch_size = "64"\n')
    assert "data.batch_size" in msg and "expected int" in msg and "'64'" in msg


def test_bool_is_not_an_int_and_float_is_not_an_int(tmp_path):
    assert "expected int" in error_of(tmp_path, MINIMAL + "\n[data]\nbatch_size = true\n")
    assert "expected int" in error_of(tmp_path, MINIMAL + "\n[data]\nbatch_size = 64.0\n")


def test_int_accepted_for_float(tmp_path):
    r = R.load(write(tmp_path, MINIMAL + "\n[optim]\nlr = 1\nwarmup = 2\n"))
    assert r.optim.lr == 1.0 and isinstance(r.optim.lr, float)
    assert isinstance(r.optim.warmup, float)


def test_list_item_type_checked(tmp_path):
    msg = error_of(tmp_path, MINIMAL + '\n[optim]\nmilestones = [1, "2"]\n')
    assert "optim.milestones" in msg and "[1]" in msg
    assert "expected a list" in error_of(tmp_path, MINIMAL + "\n[optim]\nmilestones = 5\n")


def test_bad_choice_lists_choices_and_suggests(tmp_path):
    msg = error_of(tmp_path, MINIMAL.replace('method = "none"', 'method = "qest"'))
    assert "distill.method" in msg and "'qest'" in msg
    for choice in ("none", "kd", "quest", "quest+kd"):
        assert f"'{choice}'" in msg
    assert "did you mean 'quest'" in msg


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not found") as info:
        R.load(tmp_path / "nope.toml")
    assert "nope.toml" in str(info.value)


def test_invalid_toml(tmp_path):
    msg = error_of(tmp_path, "[student\narch = 1\n", name="broken.toml")
    assert "broken.toml" in msg and "TOML" in msg


# ------------------------------------------------------------------------------------ overrides


def test_overrides_parse_toml_literals_and_bare_strings(tmp_path):
    path = write(tmp_path, MINIMAL)
    r = R.load(
        path,
        [
            "optim.lr=0.1",
            "run.dir=/x/y",
            "optim.milestones=[1,2]",
            "data.batch_size=32",
            "distill.learn_gamma=false",
            "name=hello",
            'teacher.arch="resnet32x4"',
            "seed=7",
        ],
    )
    assert r.optim.lr == 0.1
    assert r.run.dir == "/x/y"
    assert r.optim.milestones == [1, 2]
    assert r.data.batch_size == 32
    assert r.distill.learn_gamma is False
    assert r.name == "hello" and r.teacher.arch == "resnet32x4" and r.seed == 7


def test_parse_override():
    assert R.parse_override("optim.lr=0.1") == (["optim", "lr"], 0.1)
    assert R.parse_override("run.dir=a=b") == (["run", "dir"], "a=b")
    with pytest.raises(RecipeError, match=r"section\.key=value"):
        R.parse_override("optim.lr")


def test_override_errors(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(RecipeError, match=r"optim\.foo"):
        R.load(path, ["optim.foo.bar=1"])
    with pytest.raises(RecipeError, match=r"did you mean 'optim\.lr'") as info:
        R.load(path, ["optim.lrr=0.1"])
    assert str(path) in str(info.value)
    with pytest.raises(RecipeError, match="not a table"):
        R.load(path, ["optim.lr=0.1", "optim.lr.x=1"])
    with pytest.raises(RecipeError, match="expected int"):
        R.load(path, ["data.batch_size=big"])  # a bare word is a string, then type-checked


# ------------------------------------------------------------------------------------ levels


LEVELS = """
[teacher]
arch = "tv_resnet18"

[student]
arch = "tv_resnet18"

[[levels]]
teacher_layer = "layer3"
student_layer = "layer3"
codebook = "cb3.pt"
beta = 500.0
weight = 0.5

[[levels]]
teacher_layer = "layer4"
student_layer = "layer4"
pool = 2
codebook = "cb4.pt"
"""

TEXTS = {"MINIMAL": MINIMAL, "QUEST": QUEST, "LEVELS": LEVELS}


def test_levels_array_of_tables(tmp_path):
    r = R.load(write(tmp_path, LEVELS))
    assert r.levels == [
        Level("layer3", "layer3", 1, "cb3.pt", 500.0, 0.5),
        Level("layer4", "layer4", 2, "cb4.pt", 5.0, 1.0),
    ]
    assert all(isinstance(lv, Level) for lv in r.levels)
    assert r.quest_levels() == r.levels


def test_single_level_from_teacher_student_codebook_keys(tmp_path):
    r = R.load(write(tmp_path, QUEST))
    assert r.levels == []
    assert r.quest_levels() == [
        Level(
            teacher_layer="layer3",
            student_layer="layer3",
            pool=2,
            codebook="runs/cb.pt",
            beta=7.5,
            weight=1.0,
        )
    ]


def test_level_unknown_key_and_type(tmp_path):
    msg = error_of(tmp_path, LEVELS + "betta = 3.0\n")
    assert "levels[1].betta" in msg and "did you mean 'levels[1].beta'" in msg
    msg = error_of(tmp_path, LEVELS + 'weight = "2"\n')
    assert "levels[1].weight" in msg and "expected float" in msg
    msg = error_of(tmp_path, "levels = 3\n" + MINIMAL)
    assert "[[levels]]" in msg


# ------------------------------------------------------------------------------------ round trip


def test_to_toml_round_trip(tmp_path):
    text = LEVELS.replace(
        "[teacher]",
        'name = "ünïcode 😀 \\"quoted\\" back\\\\slash\\ttab"\nseed = 11\n\n'
        '[optim]\nmilestones = [30, 60, 90]\nlr = 5e-5\nschedule = "cosine"\n\n'
        '[run]\ndir = "/tmp/some dir"\nprecision = "bf16"\nsave_minutes = 12.5\n\n[teacher]',
    )
    original = R.load(write(tmp_path, text))
    assert original.name == 'ünïcode 😀 "quoted" back\\slash\ttab'
    again = R.load(write(tmp_path, R.to_toml(original), "resolved.toml"))
    assert again == original
    assert dataclasses.asdict(again) == dataclasses.asdict(original)
    # a default recipe with every section, and a single-level QuEST recipe, round-trip too
    single = R.load(write(tmp_path, QUEST, "q.toml"))
    assert R.load(write(tmp_path, R.to_toml(single), "q2.toml")) == single


def test_to_toml_writes_every_section(tmp_path):
    text = R.to_toml(R.load(write(tmp_path, LEVELS)))
    for name in R.SECTIONS:
        assert f"\n[{name}]\n" in text
    assert text.count("[[levels]]") == 2


# ------------------------------------------------------------------------------------ cross-field


@pytest.mark.parametrize(
    ("text", "overrides", "needle"),
    [
        ("QUEST", ["codebook.path="], "codebook.path"),
        ("LEVELS", ['levels=[{teacher_layer="a", codebook=""}]'], "levels[0].codebook"),
        ("MINIMAL", ["distill.method=kd"], "teacher.arch"),
        ("MINIMAL", ["distill.method=quest+kd"], "teacher.arch"),
        ("MINIMAL", ["data.dataset=wds"], "data.train_shards"),
        ("MINIMAL", ["data.dataset=wds", "data.train_shards=a.tar"], "data.val_shards"),
        ("MINIMAL", ["optim.milestones=[30, 10]"], "optim.milestones"),
        ("MINIMAL", ["optim.milestones=[30, 30]"], "optim.milestones"),
        ("MINIMAL", ["student.arch="], "student.arch"),
        ("MINIMAL", ["data.batch_size=0"], "data.batch_size"),
        ("MINIMAL", ["optim.lr=0"], "optim.lr"),
        ("MINIMAL", ["codebook.size=-1"], "codebook.size"),
        ("MINIMAL", ["data.val_fraction=1.0"], "data.val_fraction"),
        ("QUEST", ["codebook.beta=0"], "beta"),
        ("MINIMAL", ["data.per_class=-5"], "'data.per_class' must not be negative, got -5"),
        ("MINIMAL", ["run.save_every=-1"], "'run.save_every' must not be negative"),
        ("MINIMAL", ["optim.lr=nan"], "'optim.lr' must be a finite number, got nan"),
        ("MINIMAL", ["optim.lr=inf"], "'optim.lr' must be a finite number, got inf"),
        ("MINIMAL", ["seed=-3"], "'seed' must not be negative, got -3"),
        ("MINIMAL", ["data.num_workers=-1"], "'data.num_workers' must not be negative"),
        ("MINIMAL", ["data.num_classes=1"], "'data.num_classes' = 1"),
        ("MINIMAL", ["optim.milestones=[-1]"], "'optim.milestones[0]' must not be negative"),
        ("MINIMAL", ["run.timeout_minutes=0"], "run.timeout_minutes"),
        ("MINIMAL", ["student.arch=resnet9"], "Did you mean 'resnet8'"),
        ("QUEST", ["teacher.arch=resnet15", "distill.method=kd"], "'teacher.arch': unknown arch"),
        (
            "QUEST",
            ["teacher.checkpoint=IMAGENET1K_V1"],
            "a torchvision weights name only exists for the torchvision archs",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(v),
)
def test_cross_field_checks(tmp_path, text, overrides, needle):
    msg = error_of(tmp_path, TEXTS[text], overrides)
    assert needle in msg
    assert "recipe.toml" in msg


def test_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    msg = error_of(tmp_path, MINIMAL, [f"run.dir={tmp_path / 'taken'}"])
    assert "is an existing file, not a directory" in msg


def test_cross_field_checks_pass_for_valid_variants(tmp_path):
    path = write(tmp_path, MINIMAL)
    r = R.load(
        path,
        [
            "data.dataset=wds",
            "data.train_shards=train-{0..3}.tar",
            "data.val_shards=val-0.tar",
            "optim.milestones=[10, 20, 30]",
            "distill.method=kd",
            "teacher.arch=resnet32x4",
        ],
    )
    assert r.data.dataset == "wds" and r.uses_teacher and not r.uses_quest


def test_from_dict_names_its_source():
    with pytest.raises(RecipeError, match=r"^somewhere: "):
        R.from_dict(
            {"student": {"arch": "x"}, "distill": {"method": "none"}, "bogus": 1}, "somewhere"
        )


# ------------------------------------------------------------------------------------ describe


def test_describe_mentions_every_section_and_key():
    text = R.describe()
    for name, cls in R.SECTIONS.items():
        assert f"[{name}]" in text
        for f in dataclasses.fields(cls):
            assert f"  {f.name} (" in text, f"{name}.{f.name}"
            assert f.metadata["help"] in text
    assert "levels" in text
    for f in dataclasses.fields(Level):
        assert f"  {f.name} (" in text
    assert "one of ['none', 'kd', 'quest', 'quest+kd']" in text


# ------------------------------------------------------------------------------------ shipped


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipes_load_and_round_trip(tmp_path, path):
    r = R.load(path)
    assert R.load(write(tmp_path, R.to_toml(r))) == r
