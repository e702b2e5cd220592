"""quest.models: docs/method.md §2 feature-map shapes, hook safety, RepDistiller state-dict names, errors."""

import pytest
import torch
from torch import nn

from quest.models import (
    ALIASES,
    ARCHS,
    DEFAULT_LAYER,
    PRE_RELU_LAYER,
    VGG9_POOL4_LAYER,
    VGG9_POOL5_LAYER,
    build_model,
    feature_layer,
    torchvision_models,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one intra-op thread (see conftest)."""


# arch -> (input side in px, {module path: map shape C×H×W}). The DEFAULT_LAYER shapes are the
# docs/method.md §2 table; the others are the extra taps (vgg pre-ReLU, MIT-67 levels). torchvision and
# VGG-9 run at the paper's 224 px with batch 1 to keep the file fast.
MAPS: dict[str, tuple[int, dict[str, tuple[int, int, int]]]] = {
    "wrn_16_1": (32, {"relu": (64, 8, 8)}),
    "wrn_16_2": (32, {"relu": (128, 8, 8)}),
    "wrn_40_1": (32, {"relu": (64, 8, 8)}),
    "wrn_40_2": (32, {"relu": (128, 8, 8)}),
    "resnet8": (32, {"layer3": (64, 8, 8)}),
    "resnet14": (32, {"layer3": (64, 8, 8)}),
    "resnet20": (32, {"layer3": (64, 8, 8)}),
    "resnet32": (32, {"layer3": (64, 8, 8)}),
    "resnet44": (32, {"layer3": (64, 8, 8)}),
    "resnet56": (32, {"layer3": (64, 8, 8)}),
    "resnet110": (32, {"layer3": (64, 8, 8)}),
    "resnet8x4": (32, {"layer3": (256, 8, 8)}),
    "resnet32x4": (32, {"layer3": (256, 8, 8)}),
    "resnet50": (32, {"layer4": (2048, 4, 4)}),
    "vgg8": (32, {"relu4": (512, 4, 4), "block4": (512, 4, 4)}),
    "vgg11": (32, {"relu4": (512, 4, 4), "block4": (512, 4, 4)}),
    "vgg13": (32, {"relu4": (512, 4, 4), "block4": (512, 4, 4)}),
    "vgg16": (32, {"relu4": (512, 4, 4), "block4": (512, 4, 4)}),
    "vgg19": (32, {"relu4": (512, 4, 4), "block4": (512, 4, 4)}),
    "mobilenetv2": (32, {"conv2": (1280, 2, 2)}),
    "shufflenetv1": (32, {"layer3": (960, 4, 4)}),
    "shufflenetv2": (32, {"relu2": (1024, 4, 4)}),
    "vgg9_bn": (224, {"features.28": (512, 7, 7), "features.21": (512, 14, 14)}),
    "tv_resnet18": (224, {"layer4": (512, 7, 7), "layer3": (256, 14, 14)}),
    "tv_resnet34": (224, {"layer4": (512, 7, 7), "layer3": (256, 14, 14)}),
    "tv_resnet50": (224, {"layer4": (2048, 7, 7), "layer3": (1024, 14, 14)}),
}


def run_with_taps(model: nn.Module, x: torch.Tensor, layers: list[str]):
    """Forward `x`; return logits, {layer: [outputs seen by the hook]} and clones taken at hook time."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    at_hook: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_module, _inputs, output):
            seen[name].append(output)
            at_hook[name] = output.detach().clone()

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in layers]
    with torch.no_grad():
        logits = model(x)
    for h in handles:
        h.remove()
    return logits, seen, at_hook


def test_tables_cover_every_arch():
    assert set(MAPS) == set(ARCHS) == set(DEFAULT_LAYER)
    for arch, (_, maps) in MAPS.items():
        assert DEFAULT_LAYER[arch] in maps, arch
    assert all(target in ARCHS for target in ALIASES.values())


@pytest.mark.parametrize("arch", sorted(MAPS))
def test_feature_map_shapes(arch):
    size, maps = MAPS[arch]
    batch = 2 if size == 32 else 1
    torch.manual_seed(0)
    model = build_model(arch, num_classes=100).eval()
    logits, seen, at_hook = run_with_taps(model, torch.randn(batch, 3, size, size), list(maps))
    assert logits.shape == (batch, 100)
    assert feature_layer(arch) == DEFAULT_LAYER[arch]
    for layer, shape in maps.items():
        # One call per forward: a module reused twice would hand the trainer two maps.
        assert len(seen[layer]) == 1, (arch, layer)
        assert tuple(seen[layer][0].shape) == (batch, *shape), (arch, layer)
        # Nothing after the tap modified it in place.
        assert torch.equal(seen[layer][0], at_hook[layer]), (arch, layer)


@pytest.mark.parametrize(
    ("arch", "shape"),
    [
        ("resnet20", (64, 7, 7)),
        ("resnet50", (2048, 4, 4)),
        ("wrn_16_2", (128, 7, 7)),
        ("vgg8", (512, 3, 3)),
        ("mobilenetv2", (1280, 2, 2)),
        ("shufflenetv1", (960, 4, 4)),
        ("shufflenetv2", (1024, 4, 4)),
    ],
)
def test_fashion_mnist_input(arch, shape):
    """1×28×28 inputs: the stem takes one channel and adaptive pooling takes any map size."""
    model = build_model(arch, num_classes=10, in_channels=1).eval()
    logits, seen, _ = run_with_taps(model, torch.randn(2, 1, 28, 28), [feature_layer(arch)])
    assert logits.shape == (2, 10)
    assert tuple(seen[feature_layer(arch)][0].shape) == (2, *shape)


@pytest.mark.parametrize("arch", ["vgg8", "vgg13"])
@pytest.mark.parametrize("train", [False, True])
def test_vgg_pre_relu_tap_is_not_rectified(arch, train):
    """block4 (BN output) keeps its negatives; relu4 is exactly its positive part."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=100).train(train)
    pre, post = PRE_RELU_LAYER[arch], feature_layer(arch)
    assert (pre, post) == ("block4", "relu4")
    _, seen, _ = run_with_taps(model, torch.randn(4, 3, 32, 32), [pre, post])
    pre_map, post_map = seen[pre][0], seen[post][0]
    assert isinstance(model.get_submodule(pre)[-1], nn.BatchNorm2d)
    assert (pre_map < 0).float().mean() > 0.2
    assert post_map.min() >= 0
    assert torch.equal(post_map, pre_map.clamp(min=0))


def test_vgg9_taps_are_the_4th_and_5th_max_pool():
    features = build_model("vgg9_bn", num_classes=67).features
    pools = [f"features.{i}" for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    assert pools[3:] == [VGG9_POOL4_LAYER, VGG9_POOL5_LAYER] == ["features.21", "features.28"]
    assert feature_layer("vgg9_bn") == VGG9_POOL5_LAYER


@pytest.mark.parametrize("arch", sorted(a for a in ARCHS if not a.startswith("tv_")))
def test_every_module_is_a_safe_tap(arch):
    """Our own models: any module path can be hooked. Each module runs at most once per forward
    and no later op (in-place ReLU, `+=`) modifies the tensor it returned."""
    model = build_model(arch, num_classes=10).eval()
    assert [n for n, m in model.named_modules() if getattr(m, "inplace", False)] == []
    names = [n for n, _ in model.named_modules() if n]
    size = 224 if arch == "vgg9_bn" else 32
    _, seen, at_hook = run_with_taps(model, torch.randn(1, 3, size, size), names)
    assert max(len(outputs) for outputs in seen.values()) == 1
    changed = [n for n in names if seen[n] and not torch.equal(seen[n][0], at_hook[n])]
    assert changed == []


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def repdistiller_wrn_keys(depth: int, k: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """State dict of RepDistiller's `wrn.py` WideResNet, from its naming scheme."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    sd: dict[str, tuple[int, ...]] = {"conv1.weight": (16, 3, 3, 3)}
    for b in (1, 2, 3):
        for i in range(n):
            c_in = widths[b - 1] if i == 0 else widths[b]
            c_out = widths[b]
            p = f"block{b}.layer.{i}"
            sd |= _bn(f"{p}.bn1", c_in)
            sd[f"{p}.conv1.weight"] = (c_out, c_in, 3, 3)
            sd |= _bn(f"{p}.bn2", c_out)
            sd[f"{p}.conv2.weight"] = (c_out, c_out, 3, 3)
            if c_in != c_out:
                sd[f"{p}.convShortcut.weight"] = (c_out, c_in, 1, 1)
    sd |= _bn("bn1", widths[3])
    sd["fc.weight"] = (num_classes, widths[3])
    sd["fc.bias"] = (num_classes,)
    return sd


def repdistiller_resnet_keys(depth: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """State dict of RepDistiller's `resnet.py` ResNet (16/16/32/64 filters, basic blocks)."""
    n = (depth - 2) // 6
    sd: dict[str, tuple[int, ...]] = {"conv1.weight": (16, 3, 3, 3)} | _bn("bn1", 16)
    c_prev = 16
    for layer, c in ((1, 16), (2, 32), (3, 64)):
        for i in range(n):
            c_in = c_prev if i == 0 else c
            p = f"layer{layer}.{i}"
            sd[f"{p}.conv1.weight"] = (c, c_in, 3, 3)
            sd |= _bn(f"{p}.bn1", c)
            sd[f"{p}.conv2.weight"] = (c, c, 3, 3)
            sd |= _bn(f"{p}.bn2", c)
            if i == 0 and c_in != c:  # stride 2 or width change: 1×1 conv + BN
                sd[f"{p}.downsample.0.weight"] = (c, c_in, 1, 1)
                sd |= _bn(f"{p}.downsample.1", c)
        c_prev = c
    sd["fc.weight"] = (num_classes, 64)
    sd["fc.bias"] = (num_classes,)
    return sd


@pytest.mark.parametrize(
    ("arch", "expected", "count"),
    [
        ("wrn_40_2", repdistiller_wrn_keys(40, 2, 100), 227),
        ("wrn_40_1", repdistiller_wrn_keys(40, 1, 100), 226),
        ("wrn_16_2", repdistiller_wrn_keys(16, 2, 100), 83),
        ("resnet56", repdistiller_resnet_keys(56, 100), 344),
        ("resnet20", repdistiller_resnet_keys(20, 100), 128),
    ],
)
def test_state_dict_matches_repdistiller(arch, expected, count):
    got = {k: tuple(v.shape) for k, v in build_model(arch, num_classes=100).state_dict().items()}
    assert len(expected) == count
    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []
    assert got == expected
    # A checkpoint written with RepDistiller's names loads strictly.
    checkpoint = {"model": {k: torch.zeros(s) for k, s in expected.items()}}
    build_model(arch, num_classes=100).load_state_dict(checkpoint["model"], strict=True)


def test_repdistiller_key_spot_checks():
    """A few names and shapes per remaining family, as spelled in RepDistiller's checkpoints."""
    expected = {
        "resnet32x4": {"layer1.0.downsample.0.weight": (64, 32, 1, 1), "fc.weight": (100, 256)},
        "resnet50": {
            "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
            "layer4.2.bn3.weight": (2048,),
            "linear.weight": (100, 2048),
        },
        "vgg13": {
            "block0.0.bias": (64,),
            "block4.3.weight": (512, 512, 3, 3),
            "block4.4.running_var": (512,),
            "classifier.weight": (100, 512),
        },
        "vgg8": {"block4.0.weight": (512, 512, 3, 3), "block4.1.weight": (512,)},
        "mobilenetv2": {
            "conv1.0.weight": (16, 3, 3, 3),
            "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
            "blocks.6.0.conv.7.weight": (160,),
            "conv2.0.weight": (1280, 160, 1, 1),
            "classifier.0.weight": (100, 1280),
        },
        "shufflenetv1": {
            "layer1.0.conv1.weight": (54, 24, 1, 1),
            "layer2.1.conv3.weight": (480, 40, 1, 1),
            "linear.weight": (100, 960),
        },
        "shufflenetv2": {
            "layer1.0.conv5.weight": (58, 58, 1, 1),
            "layer3.3.conv2.weight": (232, 1, 3, 3),
            "conv2.weight": (1024, 464, 1, 1),
            "linear.weight": (100, 1024),
        },
        "vgg9_bn": {
            "features.0.bias": (64,),
            "features.25.weight": (512, 512, 3, 3),
            "features.26.running_mean": (512,),
            "classifier.2.weight": (100, 512),
        },
    }
    for arch, keys in expected.items():
        sd = build_model(arch, num_classes=100).state_dict()
        for key, shape in keys.items():
            assert tuple(sd[key].shape) == shape, (arch, key)


# Exact parameter counts at 100 classes, equal to those of RepDistiller's own models
# (e.g. WRN-40-2 2.26 M, resnet32x4 7.43 M, ResNet50 23.71 M in the CRD paper).
PARAMS = {
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "resnet20": 278_324,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "resnet50": 23_705_252,
    "vgg8": 3_965_028,
    "vgg13": 9_462_180,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
}


@pytest.mark.parametrize("arch", sorted(PARAMS))
def test_parameter_counts(arch):
    model = build_model(arch, num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[arch]


def test_aliases_build_the_same_network():
    assert feature_layer("vgg13_bn") == "relu4"
    assert feature_layer("ShuffleV2") == "relu2"
    assert feature_layer("mobile_half") == "conv2"
    assert feature_layer("ResNet50") == "layer4"
    assert feature_layer("tv:resnet34") == "layer4"
    a = build_model("vgg13_bn", num_classes=100).state_dict()
    b = build_model("vgg13", num_classes=100).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_unknown_arch_suggests_close_match():
    with pytest.raises(ValueError, match="unknown arch 'wrn_40_3'") as err:
        build_model("wrn_40_3", num_classes=100)
    assert "'wrn_40_2'" in str(err.value)
    assert "resnet56" in str(err.value)  # the valid list is given
    with pytest.raises(ValueError, match="'resnet32x4'"):
        feature_layer("resnet32x5")
    with pytest.raises(ValueError, match="'resnet18'"):
        build_model("tv:resnt18", num_classes=10)


def test_weights_rejected_for_cifar_archs():
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("resnet56", num_classes=100, weights="IMAGENET1K_V1")


def test_unknown_torchvision_weights_fail_before_download():
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        build_model("tv_resnet18", num_classes=67, weights="IMAGENET1K_V9")


def test_feature_layer_of_other_torchvision_model_must_be_explicit():
    with pytest.raises(ValueError, match="no default feature layer"):
        feature_layer("tv:mobilenet_v3_small")


def test_any_torchvision_model_by_name():
    model = build_model("tv:mobilenet_v3_small", num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1


def test_pretrained_torchvision_head_and_stem_are_replaced(monkeypatch):
    """The weights path, with get_model stubbed to skip the download: fc and conv1 are resized."""
    real_get_model = torchvision_models.tvm.get_model
    asked = []

    def fake_get_model(name, weights=None, **kwargs):
        asked.append((name, weights.name if weights is not None else None, kwargs))
        return real_get_model(name, weights=None, **kwargs)

    monkeypatch.setattr(torchvision_models.tvm, "get_model", fake_get_model)
    model = build_model("tv_resnet18", num_classes=67, in_channels=1, weights="IMAGENET1K_V1")
    assert asked == [("resnet18", "IMAGENET1K_V1", {})]
    assert (model.fc.in_features, model.fc.out_features) == (512, 67)
    assert tuple(model.conv1.weight.shape) == (64, 1, 7, 7)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 67)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, as in a trained network."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize(
    "arch, size",
    [
        ("resnet8", 32),
        ("wrn_16_1", 32),
        ("vgg8", 32),
        ("mobilenetv2", 32),
        ("shufflenetv1", 32),
        ("tv_resnet18", 64),
    ],
)
def test_fold_batchnorm_folds_every_conv_bn_pair_and_keeps_outputs(arch, size):
    from quest.student import fold_batchnorm

    model = _randomise_bn(build_model(arch, 10, 3))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        before = model(x)
    folded = fold_batchnorm(model, x[:2])
    left = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert folded > 0 and folded + left == n_bn
    if arch != "wrn_16_1":  # WRN is pre-activation: its first BN of a block follows an add
        assert left == 0
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_keeps_tapped_convs_and_taps_see_the_same_maps():
    from quest.student import fold_batchnorm, tap

    torch.manual_seed(0)
    model = _randomise_bn(build_model("vgg8", 10, 3))
    pre_relu = PRE_RELU_LAYER["vgg8"]  # conv + BN, the map before its ReLU
    assert isinstance(model.get_submodule(f"{pre_relu}.1"), nn.BatchNorm2d)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = tap(model, [pre_relu, "block0.0"])
    with torch.no_grad():
        model(x)
    expected = {k: v.clone() for k, v in ref.items()}

    torch.manual_seed(0)
    model = _randomise_bn(build_model("vgg8", 10, 3))
    fold_batchnorm(model, x, keep=["block0.0"])
    assert isinstance(model.get_submodule("block0.0"), nn.Conv2d)  # tapped conv: not folded
    assert isinstance(model.get_submodule("block0.1"), nn.BatchNorm2d)
    assert isinstance(model.get_submodule(f"{pre_relu}.1"), nn.Identity)
    maps = tap(model, [pre_relu, "block0.0"])
    with torch.no_grad():
        model(x)
    for name in expected:
        torch.testing.assert_close(maps[name], expected[name], rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_refuses_training_mode():
    from quest.student import fold_batchnorm

    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(build_model("resnet8", 10, 3).train(), torch.randn(1, 3, 32, 32))


def test_build_optimizer_is_fused_sgd_with_the_foreach_update():
    """build_optimizer: SGD from [optim] with the fused kernel on CPU; its steps equal the plain
    (foreach) SGD update with the same momentum, Nesterov and weight decay."""
    from quest.build import build_optimizer
    from quest.recipe import Optim

    cfg = Optim(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    results = []
    for make in (
        lambda ps: build_optimizer(ps, cfg),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    ):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results.append((opt, params))
    (fused, ours), (_, plain) = results
    assert fused.defaults["fused"] is True
    for a, b, s in zip(ours, plain, start):
        assert not torch.equal(a, s)  # the steps moved the parameters
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    meta = build_optimizer([torch.nn.Parameter(torch.empty(2, device="meta"))], cfg)
    assert not meta.defaults["fused"]  # no fused kernel there: the default implementation
