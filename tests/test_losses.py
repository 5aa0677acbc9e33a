"""Loss terms against hand computations and torch.distributions (design §1.4–§1.6)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from mirror_model.losses import clip_loss, gaussian_kl, retention_loss, symmetric_kl


def test_clip_loss_matches_explicit_loops():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, 3, generator=g, dtype=torch.float64)
    s = 7.5
    n = a.shape[0]
    total_ab = 0.0
    total_ba = 0.0
    for i in range(n):
        logits_ab = [s * sum(float(a[i, k] * b[j, k]) for k in range(3)) for j in range(n)]
        logits_ba = [s * sum(float(b[i, k] * a[j, k]) for k in range(3)) for j in range(n)]
        total_ab += -logits_ab[i] + math.log(sum(math.exp(v) for v in logits_ab))
        total_ba += -logits_ba[i] + math.log(sum(math.exp(v) for v in logits_ba))
    expected = 0.5 * (total_ab / n + total_ba / n)
    got = clip_loss(a, b, torch.tensor(s))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert clip_loss(a, b, s).item() == pytest.approx(expected, rel=1e-5)
    # symmetric in its two modalities
    assert clip_loss(b, a, s).item() == pytest.approx(expected, rel=1e-5)


def test_clip_loss_is_small_for_matched_and_large_for_shuffled_pairs():
    e = torch.eye(5)
    assert clip_loss(e, e, 100.0).item() < 1e-6
    assert clip_loss(e, e.roll(1, dims=0), 100.0).item() > 50


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(6, 4, generator=g, dtype=torch.float64)
    logvar = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1).mean()
    assert gaussian_kl(mu, logvar).item() == pytest.approx(ref.item(), rel=1e-6)


def test_gaussian_kl_is_exactly_zero_only_at_standard_normal():
    zeros = torch.zeros(3, 8)
    assert gaussian_kl(zeros, zeros).item() == 0.0
    assert gaussian_kl(zeros + 0.1, zeros).item() > 0
    assert gaussian_kl(zeros, zeros + 0.1).item() > 0
    assert gaussian_kl(zeros, zeros - 0.1).item() > 0


def test_symmetric_kl_matches_torch_distributions_and_is_symmetric():
    g = torch.Generator().manual_seed(2)
    la = torch.randn(5, 7, generator=g, dtype=torch.float64)
    lb = torch.randn(5, 7, generator=g, dtype=torch.float64)
    pa, pb = Categorical(logits=la), Categorical(logits=lb)
    ref = 0.5 * (kl_divergence(pa, pb) + kl_divergence(pb, pa)).mean()
    assert symmetric_kl(la, lb).item() == pytest.approx(ref.item(), rel=1e-6)
    assert symmetric_kl(la, lb).item() == pytest.approx(symmetric_kl(lb, la).item(), rel=1e-12)
    assert symmetric_kl(la, la).item() == 0.0
    # the posteriors, not the logits, matter: a constant shift changes nothing
    assert symmetric_kl(la, la + 3.0).item() == pytest.approx(0.0, abs=1e-12)
    assert symmetric_kl(la, lb).item() > 0


def test_retention_loss_counts_only_masked_tokens():
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 5, 3, generator=g)
    target = torch.randn(2, 5, 3, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    per_token = ((pred - target) ** 2).mean(-1)
    expected = (per_token[0, 0] + per_token[0, 2] + per_token[1, 3] + per_token[1, 4]) / 4
    got = retention_loss(pred, target, mask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    changed = pred.clone()
    changed[~mask] += 100.0  # unmasked predictions are free
    assert retention_loss(changed, target, mask).item() == pytest.approx(got.item(), rel=1e-6)
    changed = pred.clone()
    changed[0, 0] += 1.0
    assert retention_loss(changed, target, mask).item() != pytest.approx(got.item(), rel=1e-6)


def test_retention_loss_on_vectors_averages_masked_coordinates():
    pred = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = torch.zeros(2, 3)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    assert retention_loss(pred, target, mask).item() == pytest.approx((1 + 9 + 0) / 3)


def test_loss_gradients_are_finite_under_bf16_inputs():
    a = torch.randn(4, 8, requires_grad=True)
    b = torch.randn(4, 8)
    loss = clip_loss(a.bfloat16(), b.bfloat16(), 14.0)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(a.grad).all()
