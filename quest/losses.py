"""The QuEST math as pure functions, plus the cosine codeword head (docs/method.md §1).

Shapes: B batch, C channels, H×W spatial, K codewords, N = B·H·W locations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def flatten_locations(fmap: torch.Tensor) -> torch.Tensor:
    """B×C×H×W → (B·H·W)×C: every spatial location of every image is one vector."""
    return fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])


@torch.no_grad()
def soft_assign(
    features: torch.Tensor,
    centroids: torch.Tensor,
    beta: float,
    centroid_sq_norms: torch.Tensor | None = None,
    chunk: int = 8192,
) -> torch.Tensor:
    """Teacher targets p_T(k|u) = softmax_k(-beta · ||f(u) - c_k||²), in float32, never differentiable.

    features: N×C (any dtype), centroids: K×C. Returns N×K float32 rows summing to 1.
    ||f - c||² = ||f||² - 2 f·c + ||c||²: one matmul per chunk of `chunk` rows, so memory stays
    N_chunk×K and no N×K×C intermediate exists. ||f||² is constant along k and cancels in the
    softmax, so it is not computed.
    """
    centroids = centroids.float()
    if centroid_sq_norms is None:
        centroid_sq_norms = centroids.square().sum(1)
    out = torch.empty(features.shape[0], centroids.shape[0], device=features.device)
    for start in range(0, features.shape[0], chunk):
        f = features[start : start + chunk].float()
        logits = torch.addmm(centroid_sq_norms, f, centroids.T, beta=-beta, alpha=2.0 * beta)
        out[start : start + chunk] = logits.softmax(dim=1)
    return out


class _UnitRows(torch.autograd.Function):
    """F.normalize(x, dim=1, eps) with the same forward ops and a hand-written backward.

    d(x/||x||) = (g - <g, y> y) / ||x|| for y = x/||x|| (rows whose norm is clamped at eps are a
    plain x/eps: g/eps). Autograd's backward of F.normalize chains five ops, each with a fresh
    temporary the size of x; this one is a row-wise dot and one fused pass. For the 4096×512
    codeword matrix on CPU that was most of the head's time (docs/performance.md).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        denom = norms.clamp_min(eps)
        out = x / denom
        ctx.save_for_backward(out, denom, norms >= eps)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        out, denom, unclamped = ctx.saved_tensors
        dot = torch.linalg.vecdot(g, out, dim=1).unsqueeze(1) * unclamped
        return torch.addcmul(g, out, dot, value=-1).div_(denom).to(ctx.x_dtype), None


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of an N×C matrix scaled to unit L2 norm (norms clamped at eps): F.normalize(x, dim=1)
    in value and gradient, with a cheaper backward (_UnitRows)."""
    return _UnitRows.apply(x, eps)


class CosineHead(nn.Module):
    """1×1 cosine convolution: s_k(u) = gamma · <f(u)/||f(u)||, w_k/||w_k||> (+ b_k).

    w ~ N(0, sqrt(2 / C)), norms clamped at 1e-12, gamma a scalar (learnable or fixed).
    Input B×C×H×W, output B×K×H×W (the student's logits over visual words at every location).
    """

    def __init__(
        self,
        channels: int,
        words: int,
        gamma: float = 3.0,
        learn_gamma: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(words, channels) * math.sqrt(2.0 / channels))
        gamma_t = torch.tensor(float(gamma))
        if learn_gamma:
            self.gamma = nn.Parameter(gamma_t)
        else:
            self.register_buffer("gamma", gamma_t)
        self.bias = nn.Parameter(torch.zeros(words)) if bias else None

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        # One N×C @ C×K matmul on the flattened locations (a free view for channels_last maps); the
        # B×K×H×W result is a permuted view of the N×K scores, so flattening it again costs nothing.
        # gamma scales the N×C unit features rather than the N×K scores: same product, a K/C times
        # smaller pass forward and backward.
        b, _, h, w = fmap.shape
        f = unit_rows(flatten_locations(fmap))
        wk = unit_rows(self.weight).to(f.dtype)
        scores = (f * self.gamma.to(f.dtype)) @ wk.T
        if self.bias is not None:
            scores = scores + self.bias.to(f.dtype)
        return scores.view(b, h, w, -1).permute(0, 3, 1, 2)


def quest_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over locations of KL(p_T || softmax(scores)).

    scores: B×K×H×W student logits (any dtype; computed in float32), targets: (B·H·W)×K teacher
    probabilities in the flatten_locations order. Equals F.kl_div(log_softmax(s), p_T, "batchmean")
    on the N×K view: invariant to H·W (a mean, not a sum). No temperature, no T² factor.
    """
    # KL(p||q) = CE(p, q) - H(p): soft-target cross-entropy (fused log-softmax, backward q - p) plus
    # the targets' negative entropy, a constant without gradient; cheaper than kl_div's per-element log.
    ce = F.cross_entropy(flatten_locations(scores).float(), targets)
    with torch.no_grad():  # Σ p log p as one dot product (0·log(tiny) = 0, like xlogy's 0·log 0)
        logs = targets.clamp_min(torch.finfo(targets.dtype).tiny).log()
        neg_entropy = torch.dot(targets.reshape(-1), logs.reshape(-1)) / targets.shape[0]
    return ce + neg_entropy


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton KD: T² · KL(softmax(t/T) || softmax(s/T)), batchmean (B×classes inputs, float32)."""
    t = temperature
    log_q = (student_logits.float() / t).log_softmax(dim=1)
    p = (teacher_logits.float() / t).softmax(dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * (t * t)


def total_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ce_weight: float = 1.0,
    quest_parts: list[torch.Tensor] | None = None,
    level_weights: list[float] | None = None,
    quest_weight: float = 1.0,
    kd: torch.Tensor | None = None,
    kd_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = ce_weight·CE + quest_weight·Σ_l w_l·L_QuEST(l) + kd_weight·KD. Returns (loss, named parts)."""
    ce = F.cross_entropy(logits.float(), labels)
    loss = ce_weight * ce
    parts = {"ce": ce.detach()}
    if quest_parts:
        weights = level_weights or [1.0] * len(quest_parts)
        if len(weights) != len(quest_parts):
            raise ValueError(f"{len(weights)} level weights for {len(quest_parts)} QuEST levels")
        quest = sum(w * q for w, q in zip(weights, quest_parts))
        loss = loss + quest_weight * quest
        parts["quest"] = quest.detach()
        if len(quest_parts) > 1:
            for i, q in enumerate(quest_parts):
                parts[f"quest_{i}"] = q.detach()
    if kd is not None:
        loss = loss + kd_weight * kd
        parts["kd"] = kd.detach()
    parts["loss"] = loss.detach()
    return loss, parts


def perplexity(distribution: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a probability vector: the effective number of outcomes (words) in use."""
    entropy = -(distribution * distribution.clamp_min(1e-12).log()).sum()
    return entropy.exp()


@torch.no_grad()
def word_diagnostics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Codebook diagnostics (tensors, no host sync).

    agreement: fraction of locations where argmax of the student's words equals the teacher's;
    perplexity: exp(entropy) of the batch-mean target distribution (effective number of words used);
    max_prob: mean over locations of the largest target probability (target sharpness).
    """
    student_words = flatten_locations(scores).argmax(dim=1)
    teacher_words = targets.argmax(dim=1)
    return {
        "agreement": (student_words == teacher_words).float().mean(),
        "perplexity": perplexity(targets.mean(dim=0)),
        "max_prob": targets.max(dim=1).values.mean(),
    }
