"""Benchmark quest's distillation step against the same math written by hand, side by side.

    python tools/bench_step.py RECIPE [--batch N] [--size PX] [--repeats R] [section.key=value ...]

Times `quest.train.train_step` (the function the training loop calls, built by the trainer's own
builders) and a reference step written inline with plain PyTorch (teacher forward under no_grad, soft
assignment, student forward/backward, cosine head, KL + CE, SGD step) on the same synthetic batch, same
precision and memory format, interleaved round by round so drift hits both alike. Configurations:
  original: fp32, contiguous memory, no compile (the paper code's settings)
  quest:    the recipe's precision, channels_last, teacher BatchNorms folded into its convs (quest's
            default fast path; the reference gets the same model preparation, its step stays its own:
            PyTorch's default SGD, where quest's build_optimizer uses the fused kernel)
Also reports the share of quest's step spent in the QuEST part (soft assignment + head + loss) and the
k-means rate of `fit_kmeans` next to a plain float32 matmul of the same shapes.
Also times the Hinton KD step on the same pair and path (QuEST step / KD step).
The last line is `quest/reference = X.XX` for the quest configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quest import build, train
from quest import recipe as recipes
from quest.build import InputShape
from quest.codebook import Codebook
from quest.data import DEFAULT_SIZE, family
from quest.distiller import Distiller
from quest.kmeans import available_cpus, fit_kmeans
from quest.losses import CosineHead, flatten_locations, quest_loss, soft_assign
from quest.models import build_model
from quest.student import FrozenTeacher, fold_batchnorm, map_shapes, probe_input

CLASSES = {"fashion_mnist": 10, "cifar100": 100, "imagenet": 1000, "mit67": 67}


def dataset_shape(r: recipes.Recipe, size: int) -> InputShape:
    fam = family(r.data)
    classes = r.data.num_classes or CLASSES.get(r.data.dataset, r.data.synthetic_classes)
    return InputShape(
        num_classes=classes,
        in_channels=1 if fam == "mnist" else 3,
        image_size=size or r.data.image_size or DEFAULT_SIZE[fam],
    )


def timing_optim(r: recipes.Recipe) -> recipes.Optim:
    """The recipe's optimizer for every timed step (QuEST, KD, reference), at a small LR so that
    repeated steps on one random batch do not diverge."""
    return dataclasses.replace(r.optim, lr=1e-3)


def build_models(
    r: recipes.Recipe, info, accelerator, channels_last: bool, compile: bool, fold: bool
):
    """Teacher, random codebooks and student exactly as quest.train builds them."""
    torch.manual_seed(0)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    layers, pools = build.teacher_layers(build.quest_levels(r))
    teacher = FrozenTeacher(
        build_model(r.teacher.arch, info.num_classes, info.in_channels),
        layers,
        pools,
        probe_input(info.in_channels, info.image_size) if fold else None,
    )
    teacher.model.to(accelerator.device, memory_format=memory)
    shapes = teacher.map_shapes(info.in_channels, info.image_size)
    books = [
        Codebook(torch.randn(r.codebook.size, s[0]) * 0.5, {}).to(accelerator.device)
        for s in shapes
    ]
    student = build.build_student(
        r.student, r.distill, build.quest_levels(r), info, books, shapes
    ).to(accelerator.device, memory_format=memory)
    optimizer = build.build_optimizer(student.parameters(), timing_optim(r))
    if compile:
        student = torch.compile(student)
        teacher.model = torch.compile(teacher.model)
    student, optimizer = accelerator.prepare(student, optimizer)
    return teacher, books, student, optimizer


def reference_step(
    teacher_net,
    t_maps,
    student_net,
    s_maps,
    head_w,
    gamma,
    centroids,
    beta,
    pool,
    opt,
    x,
    y,
    autocast,
):
    """The same math by hand: plain PyTorch, one level, no quest code."""
    with torch.no_grad(), autocast():
        teacher_net(x)
    f = t_maps["map"]
    if pool > 1:
        f = F.avg_pool2d(f, pool)
    f = f.float().permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    with torch.no_grad():
        d = (f * f).sum(1, keepdim=True) - 2 * f @ centroids.T + (centroids * centroids).sum(1)
        p = torch.softmax(-beta * d, dim=1)
    with autocast():
        logits = student_net(x)
        fs = F.normalize(s_maps["map"], dim=1)
        w = F.normalize(head_w, dim=1).to(fs.dtype)
        scores = F.conv2d(fs, w[:, :, None, None]) * gamma.to(fs.dtype)
    log_q = scores.float().permute(0, 2, 3, 1).reshape(-1, scores.shape[1]).log_softmax(1)
    loss = F.cross_entropy(logits.float(), y) + F.kl_div(log_q, p, reduction="batchmean")
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def build_reference(r, info, device, channels_last: bool, fold: bool):
    torch.manual_seed(0)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    layers, pools = build.teacher_layers(build.quest_levels(r))
    t_net = build_model(r.teacher.arch, info.num_classes, info.in_channels)
    t_net.eval().requires_grad_(False)
    if fold:
        fold_batchnorm(t_net, probe_input(info.in_channels, info.image_size), keep=layers)
    t_net.to(device, memory_format=memory)
    s_net = build_model(r.student.arch, info.num_classes, info.in_channels).to(
        device, memory_format=memory
    )
    t_maps, s_maps = {}, {}
    t_net.get_submodule(layers[0]).register_forward_hook(
        lambda m, i, o: t_maps.__setitem__("map", o)
    )
    s_layer = build.student_layers(build.quest_levels(r))[0]
    s_net.get_submodule(s_layer).register_forward_hook(lambda m, i, o: s_maps.__setitem__("map", o))
    t_shape = map_shapes(t_net, layers[:1], info.in_channels, info.image_size)[0]
    s_shape = map_shapes(s_net, [s_layer], info.in_channels, info.image_size)[0]
    centroids = torch.randn(r.codebook.size, t_shape[0], device=device) * 0.5
    head_w = torch.nn.Parameter(
        torch.randn(r.codebook.size, s_shape[0], device=device) * (2 / s_shape[0]) ** 0.5
    )
    gamma = torch.nn.Parameter(torch.tensor(3.0, device=device))
    o = timing_optim(r)
    opt = torch.optim.SGD(
        [*s_net.parameters(), head_w, gamma],
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
    )
    beta = build.quest_levels(r)[0].beta
    return lambda x, y, autocast: reference_step(
        t_net, t_maps, s_net, s_maps, head_w, gamma, centroids, beta, pools[0], opt, x, y, autocast
    )


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_config(r, info, batch, precision, channels_last, compile, fold, warmup, repeats):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    teacher, books, student, optimizer = build_models(
        r, info, accelerator, channels_last, compile, fold
    )
    reference = build_reference(r, info, device, channels_last, fold)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, info.in_channels, info.image_size, info.image_size, generator=g).to(
        device, memory_format=memory
    )
    y = torch.randint(0, info.num_classes, (batch,), generator=g).to(device)
    levels = build.quest_levels(r)

    distiller = Distiller(teacher, books, levels, r.distill, accelerator.autocast)

    def ours():
        train.train_step(student, distiller, optimizer, accelerator, (x, y), train.Step())

    def ref():
        reference(x, y, accelerator.autocast)

    # Hinton KD on the same pair, same teacher and fast path: the step QuEST is compared with.
    torch.manual_seed(0)
    kd_recipe = dataclasses.replace(r, distill=dataclasses.replace(r.distill, method="kd"))
    kd_student = build.build_student(kd_recipe.student, kd_recipe.distill, [], info, [], []).to(
        device, memory_format=memory
    )
    kd_optimizer = build.build_optimizer(kd_student.parameters(), timing_optim(r))
    kd_student, kd_optimizer = accelerator.prepare(kd_student, kd_optimizer)
    kd_distiller = Distiller(teacher, [], [], kd_recipe.distill, accelerator.autocast)

    def kd():
        train.train_step(kd_student, kd_distiller, kd_optimizer, accelerator, (x, y), train.Step())

    for _ in range(warmup):
        ours()
        ref()
        kd()
    t_ours, t_ref, t_kd = [], [], []
    for _ in range(repeats):  # interleaved: machine drift affects all alike
        t_ours.append(timed(ours, device))
        t_ref.append(timed(ref, device))
        t_kd.append(timed(kd, device))
    return (
        statistics.median(t_ours),
        statistics.median(t_ref),
        (teacher, books, student, accelerator, x, statistics.median(t_kd)),
    )


def quest_part_seconds(r, info, books, accelerator, batch, repeats, student):
    """Soft assignment + cosine head + QuEST loss (forward and backward) at the recipe's shapes."""
    level = build.quest_levels(r)[0]
    student_shape = map_shapes(
        accelerator.unwrap_model(student).backbone,
        [level.student_layer],
        info.in_channels,
        info.image_size,
    )[0]
    device = accelerator.device
    c_t = books[0].centroids.shape[1]
    h, w = student_shape[1], student_shape[2]
    f_t = torch.randn(batch, c_t, h, w, device=device)
    f_s = torch.randn(batch, student_shape[0], h, w, device=device, requires_grad=True)
    head = CosineHead(student_shape[0], r.codebook.size).to(device)

    def part():
        targets = soft_assign(
            flatten_locations(f_t), books[0].centroids, level.beta, books[0].sq_norms
        )
        with accelerator.autocast():
            scores = head(f_s)
        quest_loss(scores, targets).backward()

    part()
    return statistics.median(timed(part, device) for _ in range(repeats)), (
        batch * h * w,
        r.codebook.size,
        c_t,
    )


def kmeans_rate(n: int, k: int, d: int, iterations: int) -> tuple[float, float]:
    """GFLOP/s of fit_kmeans (iterations + its final assignment pass, 2·n·k·d each) and of a float32
    matmul of the same shapes, both with the threads fit_kmeans uses (every available core)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    flops = 2 * n * k * d * (iterations + 1)
    t0 = time.perf_counter()
    fit_kmeans(x, k, iterations=iterations, seed=0, gpu=True)
    km = flops / (time.perf_counter() - t0) / 1e9
    threads = torch.get_num_threads()
    torch.set_num_threads(available_cpus())
    c = torch.randn(k, d, generator=g)
    x @ c.T
    t0 = time.perf_counter()
    for _ in range(iterations + 1):
        x @ c.T
    mm = flops / (time.perf_counter() - t0) / 1e9
    torch.set_num_threads(threads)
    return km, mm


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument(
        "--batch", type=int, default=0, help="default: the recipe's global batch size"
    )
    parser.add_argument(
        "--size", type=int, default=0, help="input resolution (default: the recipe's)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time run.compile = true")
    parser.add_argument(
        "--kmeans", default="200000,256,64", help="n,k,d for the k-means rate ('' to skip)"
    )
    args = parser.parse_intermixed_args(argv)
    r = recipes.load(args.recipe, args.overrides)
    if not r.uses_quest:
        sys.exit("bench_step needs a QuEST recipe (distill.method quest or quest+kd)")
    info = dataset_shape(r, args.size)
    batch = args.batch or r.data.batch_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"recipe {args.recipe}: {r.teacher.arch} -> {r.student.arch}, {info.image_size} px, batch {batch}, "
        f"K {r.codebook.size}, device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    # (name, precision, channels_last, compile, fold teacher BNs)
    configs = [
        ("original", "no", False, False, False),
        ("quest", r.run.precision, True, False, True),
    ]
    if args.compile:
        configs.append(("quest+compile", r.run.precision, True, True, True))
    rates = {}
    print(
        f"{'config':<15}{'precision':<10}{'memory':<15}{'quest img/s':>12}{'reference img/s':>17}{'quest/ref':>10}"
    )
    for name, precision, cl, comp, fold in configs:
        t_ours, t_ref, built = bench_config(
            r, info, batch, precision, cl, comp, fold, args.warmup, args.repeats
        )
        rates[name] = (batch / t_ours, batch / t_ref, t_ours, built)
        mem = "channels_last" if cl else "contiguous"
        print(
            f"{name:<15}{precision:<10}{mem:<15}{batch / t_ours:>12.1f}{batch / t_ref:>17.1f}{t_ref / t_ours:>10.2f}"
        )
    speedup = rates["quest"][0] / rates["original"][0]
    print(f"quest default path vs original settings: {speedup:.2f}x")
    _, books, student, accelerator, _, t_kd = rates["quest"][3]
    print(
        f"KD step on the same pair (quest path): {batch / t_kd:.1f} img/s; "
        f"QuEST step / KD step time = {rates['quest'][2] / t_kd:.2f} (target <= 1.10)"
    )
    part, shape = quest_part_seconds(r, info, books, accelerator, batch, args.repeats, student)
    print(
        f"QuEST part (soft assignment + head + loss, {shape[0]} locations x {shape[1]} words x {shape[2]} dims): "
        f"{1000 * part:.1f} ms = {100 * part / rates['quest'][2]:.1f} % of the quest step"
    )
    if args.kmeans:
        n, k, d = (int(v) for v in args.kmeans.split(","))
        km, mm = kmeans_rate(n, k, d, iterations=5)
        print(
            f"k-means (n={n}, k={k}, d={d}): fit_kmeans {km:.1f} GFLOP/s, float32 matmul {mm:.1f} GFLOP/s, "
            f"ratio {km / mm:.2f}"
        )
    print(f"quest/reference = {rates['quest'][1] and rates['quest'][0] / rates['quest'][1]:.2f}")


if __name__ == "__main__":
    main()
