"""Teacher and student networks as the trainer sees them: feature taps by layer name, the frozen
teacher, and the student as one module (backbone + classifier + codeword heads)."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import QuestError
from .losses import CosineHead
from .models.torchvision_models import _set_submodule


class ModelError(QuestError, ValueError):
    """A model, layer or checkpoint that cannot be used as asked."""


def tap(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Register forward hooks storing the outputs of the named submodules in the returned dict
    (overwritten at every forward)."""
    maps: dict[str, torch.Tensor] = {}
    for name in names:

        def hook(_module, _inputs, output, name=name):
            maps[name] = output

        submodule(model, name).register_forward_hook(hook)
    return maps


def submodule(model: nn.Module, name: str) -> nn.Module:
    """The module at `name`, or a ModelError naming the close matches."""
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
        raise ModelError(
            f"{type(model).__name__} has no layer '{name}' (close: {close}); set the recipe's layer "
            "key to a module path of the model"
        )
    return modules[name]


def pool_map(fmap: torch.Tensor, pool: int) -> torch.Tensor:
    """Teacher map average-pooled pool×pool with stride pool (the MobileNet/ShuffleNet 'downscale')."""
    return F.avg_pool2d(fmap, pool) if pool > 1 else fmap


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: a plain state dict, or a dict holding one under 'model'
    (RepDistiller's ckpt_epoch_240.pth, quest's student.pt) or 'state_dict'. DDP 'module.' prefixes
    are stripped."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own text advises weights_only=False: never repeat it
        raise ModelError(
            f"cannot read checkpoint {path} ({type(err).__name__}): not a plain tensor state dict, "
            "or a damaged file; quest loads weights only and never unpickles arbitrary objects"
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ModelError(f"{path} holds no state dict (expected tensors, or a dict with 'model')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with an error that lists what differs (a silently random teacher
    is a defect of the original code)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{source} does not match {type(model).__name__}:"]
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        ):
            if items:
                more = f" … (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{label} ({len(items)}): {', '.join(items[:8])}{more}")
        parts.append("check teacher.arch / data.num_classes against the checkpoint")
        raise ModelError("\n  ".join(parts))
    model.load_state_dict(state, strict=True)


def probe_input(in_channels: int, size: int) -> torch.Tensor:
    """The fixed random batch `fold_batchnorm` traces and checks a model with."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, in_channels, size, size, generator=g)


def fold_batchnorm(model: nn.Module, example: torch.Tensor, keep: list[str] = ()) -> int:
    """Fold every eval-mode BatchNorm2d into the Conv2d that feeds it, in place, for a frozen model.

    Pairs come from the autograd graph of one forward of `example`, so no naming convention is
    assumed: a conv (called once) whose output is consumed by nothing but one BN (called once). A conv
    whose output also feeds a residual sum, or is named in `keep` (a tapped map), keeps its own
    output. The BN becomes nn.Identity at the same name, so a tap on it still sees the BN's output.
    The folded model is checked against the original on `example` and restored on disagreement.
    Returns the number of folded pairs. Saves one pass over every activation map it folds."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (frozen running statistics)")
    names = {m: n for n, m in model.named_modules()}
    nodes: dict[str, list] = {}  # module name -> grad_fn of its output, per call

    def on_module(module, _inputs, output):
        nodes.setdefault(names[module], []).append(output.grad_fn)

    handles = [
        m.register_forward_hook(on_module)
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
        or (isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.affine)
    ]
    try:
        with torch.enable_grad():
            out = model(example.detach().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor):
        return 0  # a model with several outputs: left as it is
    reference = out.detach()
    consumers: dict = {}  # autograd node -> the nodes that use its output
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for parent, _ in node.next_functions:
            if parent is not None:
                consumers.setdefault(parent, []).append(node)
                stack.append(parent)
    del out
    once = {n: fns[0] for n, fns in nodes.items() if len(fns) == 1 and fns[0] is not None}
    bn_of = {fn: n for n, fn in once.items() if isinstance(model.get_submodule(n), nn.BatchNorm2d)}
    pairs = []
    for name, fn in once.items():
        users = consumers.get(fn, [])
        conv = isinstance(model.get_submodule(name), nn.Conv2d)
        if conv and name not in keep and len(users) == 1 and users[0] in bn_of:
            pairs.append((name, bn_of[users[0]]))
    originals = []
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            originals.append((conv_name, conv, bn_name, bn))
            _set_submodule(model, conv_name, fuse_conv_bn_eval(conv, bn))
            _set_submodule(model, bn_name, nn.Identity())
        if pairs and not torch.allclose(model(example), reference, rtol=1e-3, atol=1e-4):
            for conv_name, conv, bn_name, bn in originals:  # never silently change the teacher
                _set_submodule(model, conv_name, conv)
                _set_submodule(model, bn_name, bn)
            return 0
    return len(pairs)


@torch.no_grad()
def map_shapes(
    model: nn.Module, layers: list[str], in_channels: int, size: int
) -> list[torch.Size]:
    """C×H×W of each named map for one input of size×size (eval mode, then the mode is restored)."""
    was_training = model.training
    model.eval()
    maps = {}
    handles = [
        submodule(model, n).register_forward_hook(lambda m, i, o, n=n: maps.__setitem__(n, o))
        for n in layers
    ]
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, in_channels, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [maps[n].shape[1:] for n in layers]


class FrozenTeacher:
    """The teacher: eval mode, no gradients, never prepared by Accelerate.
    Call under torch.no_grad(); returns (logits, [map per level, pooled as configured]).
    Given an `example` input, its BatchNorms are first folded into their convs (`fold_batchnorm`):
    the same maps and logits (checked on the example) for one pass less per BN."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[str],
        pools: list[int],
        example: torch.Tensor | None = None,
    ):
        self.model = model.eval().requires_grad_(False)
        self.layers, self.pools = layers, pools
        self.folded = 0 if example is None else fold_batchnorm(self.model, example, keep=layers)
        self._maps = tap(model, sorted(set(layers)))

    def to(self, *args, **kwargs) -> FrozenTeacher:
        self.model.to(*args, **kwargs)
        return self

    def map_shapes(self, in_channels: int, size: int) -> list[torch.Size]:
        """C×H×W of each level's map after pooling, for one size×size input."""
        shapes = map_shapes(self.model, self.layers, in_channels, size)
        return [torch.Size([c, h // p, w // p]) for (c, h, w), p in zip(shapes, self.pools)]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = self.model(x)
        return logits, [pool_map(self._maps[n], p) for n, p in zip(self.layers, self.pools)]


class Student(nn.Module):
    """Backbone (with its own pooled classifier) plus one cosine codeword head per QuEST level, so a
    single `accelerator.prepare(student, optimizer)` covers DDP, the optimizer and checkpoints.
    forward(x) → (logits, [B×K×H×W word scores per level])."""

    def __init__(self, backbone: nn.Module, layers: list[str], heads: list[CosineHead]):
        super().__init__()
        self.backbone = backbone
        self.layers = layers
        self.heads = nn.ModuleList(heads)
        self._maps = tap(backbone, sorted(set(layers))) if heads else {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = self.backbone(x)
        return logits, [head(self._maps[n]) for n, head in zip(self.layers, self.heads)]
