"""quest.losses: the QuEST math (docs/method.md §1) against values computed independently (loops, by hand)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quest.losses import (
    CosineHead,
    flatten_locations,
    kd_loss,
    quest_loss,
    soft_assign,
    total_loss,
    unit_rows,
    word_diagnostics,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one intra-op thread (see conftest)."""


def brute_soft_assign(features, centroids, beta):
    """softmax_k(-beta·||f - c_k||²) with explicit loops in float64 (python floats)."""
    f = features.double().tolist()
    c = centroids.double().tolist()
    out = []
    for fu in f:
        logits = [-beta * sum((a - b) ** 2 for a, b in zip(fu, ck)) for ck in c]
        top = max(logits)
        e = [math.exp(v - top) for v in logits]
        z = sum(e)
        out.append([v / z for v in e])
    return torch.tensor(out, dtype=torch.float64)


def brute_kl(p_rows, q_logit_rows):
    """mean over rows of Σ_k p log(p/q) with q = softmax(logits), 0·log 0 = 0, in float64."""
    total = 0.0
    for p, s in zip(p_rows, q_logit_rows):
        z = math.log(sum(math.exp(v) for v in s))
        for pk, sk in zip(p, s):
            if pk > 0:
                total += pk * (math.log(pk) - (sk - z))
    return total / len(p_rows)


# ------------------------------------------------------------------------------------ soft_assign


def test_flatten_locations_order_is_b_h_w():
    fmap = torch.arange(2 * 3 * 2 * 4).reshape(2, 3, 2, 4)
    flat = flatten_locations(fmap)
    assert flat.shape == (2 * 2 * 4, 3)
    for b in range(2):
        for h in range(2):
            for w in range(4):
                assert flat[b * 8 + h * 4 + w].tolist() == fmap[b, :, h, w].tolist()


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_soft_assign_equals_brute_force(beta):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(13, 6, generator=g)
    centroids = torch.randn(7, 6, generator=g)
    got = soft_assign(features, centroids, beta)
    want = brute_soft_assign(features, centroids, beta)
    assert got.shape == (13, 7)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(
        got.sum(1).double(), torch.ones(13, dtype=torch.float64), rtol=0, atol=1e-6
    )


def test_soft_assign_precomputed_norms_change_nothing():
    g = torch.Generator().manual_seed(1)
    features, centroids = torch.randn(9, 4, generator=g), torch.randn(5, 4, generator=g)
    norms = (centroids * centroids).sum(1)
    torch.testing.assert_close(
        soft_assign(features, centroids, 2.0, norms), soft_assign(features, centroids, 2.0)
    )


def test_soft_assign_large_beta_is_one_hot_nearest():
    g = torch.Generator().manual_seed(2)
    centroids = torch.randn(6, 5, generator=g) * 3
    pick = torch.tensor([4, 0, 0, 5, 2, 1, 3, 3])
    features = centroids[pick] + 0.05 * torch.randn(8, 5, generator=g)
    # nearest codeword by explicit loop (the picked one, as the noise is tiny)
    nearest = [
        min(
            range(6),
            key=lambda k, f=f: sum((a - b) ** 2 for a, b in zip(f.tolist(), centroids[k].tolist())),
        )
        for f in features
    ]
    assert nearest == pick.tolist()
    got = soft_assign(features, centroids, beta=1000.0)
    assert torch.equal(got, F.one_hot(pick, 6).float())


@pytest.mark.parametrize("chunk", [1, 3, 5, 100_000])
def test_soft_assign_chunking_changes_nothing(chunk):
    g = torch.Generator().manual_seed(3)
    features, centroids = torch.randn(11, 4, generator=g), torch.randn(6, 4, generator=g)
    ref = brute_soft_assign(features, centroids, 3.0)
    got = soft_assign(features, centroids, 3.0, chunk=chunk)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)
    # Other chunk sizes are other matmul shapes: BLAS may pick other kernels (AMX/AVX-512 CPUs do),
    # so agreement is to float32 rounding (a few ulps of a probability), not bit for bit.
    torch.testing.assert_close(
        got, soft_assign(features, centroids, 3.0, chunk=11), rtol=0, atol=1e-6
    )


def test_soft_assign_float32_without_grad_even_when_inputs_require_grad():
    features = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    centroids = torch.randn(4, 3, requires_grad=True)
    out = soft_assign(features, centroids, 5.0)
    assert out.dtype == torch.float32
    assert not out.requires_grad and out.grad_fn is None
    # still usable as a target inside a graph: backprop of something else never touches the inputs
    (features.sum() * 0 + out.sum()).backward()
    assert centroids.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_soft_assign_low_precision_features_give_float32_math(dtype):
    g = torch.Generator().manual_seed(4)
    features = torch.randn(32, 8, generator=g)
    centroids = torch.randn(16, 8, generator=g)
    low = features.to(dtype)
    got = soft_assign(low, centroids, 1.0)
    assert got.dtype == torch.float32
    # the math runs in float32 on the upcast features: equal to the fp32 path on the rounded values
    torch.testing.assert_close(got, soft_assign(low.float(), centroids, 1.0), rtol=0, atol=1e-6)
    # and close to the full-precision targets (only the input rounding differs)
    ref = brute_soft_assign(features, centroids, 1.0)
    assert (got.double() - ref).abs().max() < 0.03
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_soft_assign_bf16_centroids_and_features_on_typical_scale():
    # beta = 5 targets are nearly one-hot: bf16 inputs keep the same argmax and max-probability
    g = torch.Generator().manual_seed(5)
    centroids = torch.randn(32, 16, generator=g)
    features = centroids[torch.randint(0, 32, (64,), generator=g)] + 0.3 * torch.randn(
        64, 16, generator=g
    )
    ref = soft_assign(features, centroids, 5.0)
    got = soft_assign(features.bfloat16(), centroids, 5.0)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    assert (got.max(1).values - ref.max(1).values).abs().max() < 0.02


# ------------------------------------------------------------------------------------ quest_loss


def test_quest_loss_hand_computed():
    # B=1, K=3, H=1, W=2: two locations.
    scores = torch.tensor([[[[1.0, 0.0]], [[2.0, 0.0]], [[0.0, 0.0]]]])  # 1×3×1×2
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    # location 0: s = (1, 2, 0); location 1: s = (0, 0, 0) → q = 1/3 each
    z0 = math.log(math.e**1 + math.e**2 + 1.0)
    kl0 = 0.5 * (math.log(0.5) - (1 - z0)) + 0.5 * (math.log(0.5) - (2 - z0))  # p=0 term is 0
    kl1 = sum(p * math.log(p / (1 / 3)) for p in (0.2, 0.3, 0.5))
    want = (kl0 + kl1) / 2
    got = quest_loss(scores, targets)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert math.isclose(got.item(), want, rel_tol=1e-5)
    assert math.isclose(want, 0.5 * (0.2144587839 + 0.0689592746), rel_tol=1e-8)  # by hand


def test_quest_loss_equals_loop_over_locations_in_flatten_order():
    g = torch.Generator().manual_seed(6)
    B, K, H, W = 2, 4, 2, 3
    scores = torch.randn(B, K, H, W, generator=g)
    targets = torch.rand(B * H * W, K, generator=g)
    targets[3] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    targets = targets / targets.sum(1, keepdim=True)
    p_rows, s_rows = [], []
    for b in range(B):
        for h in range(H):
            for w in range(W):
                p_rows.append(targets[b * H * W + h * W + w].tolist())
                s_rows.append(scores[b, :, h, w].tolist())
    want = brute_kl(p_rows, s_rows)
    assert math.isclose(quest_loss(scores, targets).item(), want, rel_tol=1e-5)
    # equals F.kl_div batchmean on the N×K view (docs/method.md §1)
    ref = F.kl_div(flatten_locations(scores).log_softmax(1), targets, reduction="batchmean")
    assert math.isclose(quest_loss(scores, targets).item(), ref.item(), rel_tol=1e-6)


def test_quest_loss_is_a_mean_over_locations():
    g = torch.Generator().manual_seed(7)
    B, K = 3, 5
    scores = torch.randn(B, K, 1, 1, generator=g)
    targets = torch.softmax(torch.randn(B, K, generator=g) * 3, 1)
    small = quest_loss(scores, targets)
    H, W = 4, 6
    big_scores = scores.expand(B, K, H, W).contiguous()
    big_targets = targets.repeat_interleave(H * W, dim=0)  # same per-location content, b-major
    big = quest_loss(big_scores, big_targets)
    assert small.item() > 0.01
    assert math.isclose(big.item(), small.item(), rel_tol=1e-5)


def test_quest_loss_zero_when_student_matches_targets():
    targets = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    scores = targets.log().T.reshape(1, 3, 1, 2)
    assert abs(quest_loss(scores, targets).item()) < 1e-6


def test_quest_loss_bf16_scores_computed_in_float32():
    g = torch.Generator().manual_seed(8)
    scores = torch.randn(2, 4, 2, 2, generator=g).bfloat16()
    targets = torch.softmax(torch.randn(8, 4, generator=g), 1)
    got = quest_loss(scores, targets)
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), quest_loss(scores.float(), targets).item(), rel_tol=1e-6)


def test_gradient_reaches_student_never_teacher_or_codebook():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    teacher = nn.Conv2d(3, 6, 3, padding=1)  # requires_grad=True on purpose: targets must detach
    centroids = torch.randn(8, 6, requires_grad=True)
    backbone = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 7, 1))
    head = CosineHead(7, 8, gamma=3.0)

    targets = soft_assign(flatten_locations(teacher(x)), centroids, beta=5.0)
    assert not targets.requires_grad
    loss = quest_loss(head(backbone(x)), targets)
    loss.backward()

    assert centroids.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    for name, p in [*head.named_parameters(), *backbone.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n for n, _ in head.named_parameters()} == {"weight", "gamma"}


# ------------------------------------------------------------------------------------ kd / total


def test_kd_loss_hand_computed():
    s = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
    t = torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    T = 2.0

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        p, q = softmax(trow), softmax(srow)
        kl += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
    want = T * T * kl / 2
    got = kd_loss(s, t, T)
    assert math.isclose(got.item(), want, rel_tol=1e-5)
    assert got.item() > 0.1


def test_kd_loss_zero_when_logits_equal():
    logits = torch.randn(4, 10)
    assert abs(kd_loss(logits, logits.clone(), 4.0).item()) < 1e-6


def test_total_loss_weights_and_named_parts():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    q0 = torch.tensor(0.3, requires_grad=True)
    q1 = torch.tensor(1.7, requires_grad=True)
    kd = torch.tensor(0.9, requires_grad=True)

    ce_hand = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        ce_hand += -(row[y] - math.log(sum(math.exp(v) for v in row)))
    ce_hand /= 2

    loss, parts = total_loss(
        logits,
        labels,
        ce_weight=0.7,
        quest_parts=[q0, q1],
        level_weights=[0.5, 2.0],
        quest_weight=3.0,
        kd=kd,
        kd_weight=0.25,
    )
    want = 0.7 * ce_hand + 3.0 * (0.5 * 0.3 + 2.0 * 1.7) + 0.25 * 0.9
    assert math.isclose(loss.item(), want, rel_tol=1e-6)
    assert set(parts) == {"ce", "quest", "quest_0", "quest_1", "kd", "loss"}
    assert math.isclose(parts["ce"].item(), ce_hand, rel_tol=1e-6)
    assert math.isclose(parts["quest"].item(), 0.5 * 0.3 + 2.0 * 1.7, rel_tol=1e-6)
    assert math.isclose(parts["quest_0"].item(), 0.3, rel_tol=1e-6)
    assert math.isclose(parts["quest_1"].item(), 1.7, rel_tol=1e-6)
    assert math.isclose(parts["kd"].item(), 0.9, rel_tol=1e-6)
    assert math.isclose(parts["loss"].item(), want, rel_tol=1e-6)
    assert not any(v.requires_grad for v in parts.values())  # logged parts are detached
    loss.backward()
    assert math.isclose(q1.grad.item(), 3.0 * 2.0) and math.isclose(kd.grad.item(), 0.25)


def test_total_loss_ce_only_and_single_level():
    logits = torch.tensor([[0.0, 0.0]])
    labels = torch.tensor([1])
    loss, parts = total_loss(logits, labels)
    assert set(parts) == {"ce", "loss"}
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    loss, parts = total_loss(logits, labels, quest_parts=[torch.tensor(2.0)], quest_weight=10.0)
    assert set(parts) == {"ce", "quest", "loss"}
    assert math.isclose(loss.item(), math.log(2) + 20.0, rel_tol=1e-6)


# ------------------------------------------------------------------------------------ CosineHead


def test_cosine_head_equals_gamma_times_cosine_by_hand():
    torch.manual_seed(1)
    head = CosineHead(4, 3, gamma=2.5)
    fmap = torch.randn(2, 4, 2, 3)
    out = head(fmap)
    assert out.shape == (2, 3, 2, 3)
    w = head.weight.detach().double().tolist()
    for b in range(2):
        for h in range(2):
            for x in range(3):
                f = fmap[b, :, h, x].double().tolist()
                nf = math.sqrt(sum(v * v for v in f))
                for k in range(3):
                    nw = math.sqrt(sum(v * v for v in w[k]))
                    cos = sum(a * c for a, c in zip(f, w[k])) / (nf * nw)
                    assert math.isclose(
                        out[b, k, h, x].item(), 2.5 * cos, rel_tol=1e-5, abs_tol=1e-6
                    )


def test_cosine_head_invariant_to_positive_rescaling():
    torch.manual_seed(2)
    head = CosineHead(6, 5, gamma=3.0, bias=True)
    with torch.no_grad():
        head.bias.copy_(torch.randn(5))
    fmap = torch.randn(3, 6, 2, 2)
    ref = head(fmap)
    torch.testing.assert_close(head(fmap * 17.0), ref, rtol=1e-5, atol=1e-5)
    per_location = torch.rand(3, 1, 2, 2) * 100 + 1e-3
    torch.testing.assert_close(head(fmap * per_location), ref, rtol=1e-5, atol=1e-5)
    # |score| ≤ gamma (+ bias): cosine is bounded
    assert (ref - head.bias.view(1, -1, 1, 1)).abs().max() <= 3.0 + 1e-5


def test_unit_rows_gradcheck_in_float64():
    torch.manual_seed(4)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(unit_rows, (x,))
    # a row below eps is the linear map x / eps (gradient g / eps), the rest are unit rows
    tiny = torch.randn(4, 3, dtype=torch.float64)
    tiny[1] *= 1e-9
    tiny.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: unit_rows(a, eps=1e-3), (tiny,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_rows_equals_f_normalize_in_value_and_gradient(dtype):
    torch.manual_seed(5)
    x = (torch.randn(64, 48) * torch.rand(64, 1) * 10).to(dtype)
    x[3] = 0  # a clamped row: zero output, gradient g / eps
    x[7] *= 1e-13
    g = torch.randn(64, 48).to(dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = unit_rows(a), F.normalize(b, dim=1, eps=1e-12)
    assert ours.dtype == ref.dtype == dtype
    assert torch.equal(ours, ref)  # the same forward ops
    ours.backward(g)
    ref.backward(g)
    assert a.grad.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)
    assert a.grad[3].abs().max() > 1e6  # g / eps where the norm was clamped


def test_cosine_head_and_loss_gradients_equal_the_f_normalize_formula():
    """The head's fast path (unit_rows, γ on the features, Σ p log p as a dot) against the plain
    formula gamma · normalize(f) @ normalize(w)ᵀ + b with autograd's gradients."""
    torch.manual_seed(6)
    head = CosineHead(16, 32, gamma=2.0, bias=True)
    with torch.no_grad():
        head.bias.copy_(torch.randn(32) * 0.1)
    fmap = torch.randn(3, 16, 2, 5, requires_grad=True)
    targets = torch.randn(30, 32).mul(3).softmax(1)
    targets[0] = F.one_hot(torch.tensor(4), 32).float()  # zeros: 0·log 0 = 0
    loss = quest_loss(head(fmap), targets)
    loss.backward()
    w = head.weight.detach().clone().requires_grad_()
    gamma = torch.tensor(2.0, requires_grad=True)
    f = fmap.detach().clone().requires_grad_()
    scores = gamma * F.normalize(flatten_locations(f), dim=1) @ F.normalize(w, dim=1).T + head.bias
    ref = F.kl_div(scores.log_softmax(1), targets, reduction="batchmean")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for ours, theirs in (
        (fmap.grad, f.grad),
        (head.weight.grad, w.grad),
        (head.gamma.grad, gamma.grad),
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)


def test_cosine_head_zero_feature_is_finite():
    head = CosineHead(4, 3)
    out = head(torch.zeros(1, 4, 1, 1))
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_cosine_head_gamma_learnable_or_fixed_buffer():
    learn = CosineHead(8, 4, gamma=3.0)
    assert "gamma" in dict(learn.named_parameters())
    assert learn.gamma.item() == 3.0 and learn.bias is None

    fixed = CosineHead(8, 4, gamma=10.0, learn_gamma=False, bias=True)
    params = dict(fixed.named_parameters())
    assert "gamma" not in params
    assert "gamma" in dict(fixed.named_buffers())
    assert fixed.gamma.item() == 10.0 and not fixed.gamma.requires_grad
    assert fixed.state_dict()["gamma"].item() == 10.0  # saved with the student
    assert "bias" in params and torch.equal(fixed.bias, torch.zeros(4))
    fixed(torch.randn(2, 8, 1, 1)).sum().backward()
    assert fixed.gamma.item() == 10.0 and fixed.bias.grad is not None


def test_cosine_head_weight_std():
    torch.manual_seed(3)
    channels = 64
    head = CosineHead(channels, 4096)
    std = head.weight.detach().double().std().item()
    assert abs(std / math.sqrt(2.0 / channels) - 1) < 0.02
    assert abs(head.weight.detach().double().mean().item()) < 0.01


# ------------------------------------------------------------------------------------ diagnostics


def test_word_diagnostics_one_hot_two_words():
    # 4 locations (B=1, H=2, W=2), K=4; teacher uses words 0 and 2, twice each.
    targets = F.one_hot(torch.tensor([0, 2, 2, 0]), 4).float()
    student_words = torch.tensor([0, 2, 1, 3])  # agrees at locations 0 and 1
    scores = F.one_hot(student_words, 4).float().T.reshape(1, 4, 2, 2)
    d = word_diagnostics(scores, targets)
    assert set(d) == {"agreement", "perplexity", "max_prob"}
    assert math.isclose(d["agreement"].item(), 0.5)
    assert math.isclose(d["perplexity"].item(), 2.0, rel_tol=1e-6)
    assert math.isclose(d["max_prob"].item(), 1.0)


def test_word_diagnostics_soft_targets_by_hand():
    targets = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    scores = torch.tensor([[[[5.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]]])  # argmax 0 then 1
    d = word_diagnostics(scores, targets)
    usage = [0.3, 0.175, 0.525]
    entropy = -sum(u * math.log(u) for u in usage)
    assert math.isclose(d["perplexity"].item(), math.exp(entropy), rel_tol=1e-6)
    assert math.isclose(d["max_prob"].item(), (0.5 + 0.8) / 2, rel_tol=1e-6)
    assert math.isclose(
        d["agreement"].item(), 0.5
    )  # location 0 agrees (0 = 0), location 1 not (1 ≠ 2)


def test_word_diagnostics_uniform_usage_of_all_words():
    targets = torch.eye(8)
    scores = torch.eye(8).reshape(8, 8, 1, 1)  # B=8 one location each, student agrees everywhere
    d = word_diagnostics(scores, targets)
    assert math.isclose(d["perplexity"].item(), 8.0, rel_tol=1e-6)
    assert d["agreement"].item() == 1.0
