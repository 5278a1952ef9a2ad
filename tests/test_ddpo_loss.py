"""DDPO loss pieces: docs/algorithms/ddpo.md §8 items 6 (per-prompt tracker) and 7 (PPO surrogate)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from trainers.losses import PerPromptStatTracker, batch_advantages, ddpo_loss

F64 = torch.float64


# ------------------------------------------------------------------------- §8.6 per-prompt tracker


def test_spec8_6_tracker_uses_batch_stats_before_min_count():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=4)
    prompts = ["cat", "dog", "cat", "owl", "dog"]
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 0.5])
    adv = tracker.update(prompts, rewards)
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)  # population std, batch-global
    np.testing.assert_allclose(adv, expected, rtol=1e-12)
    assert adv.dtype == np.float64
    counts = {k: v["count"] for k, v in tracker.get_stats().items()}
    assert counts == {"cat": 2, "dog": 2, "owl": 1}


def test_spec8_6_tracker_uses_prompt_buffer_once_min_count_reached():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=4)
    tracker.update(["cat", "cat", "dog"], np.array([1.0, 2.0, 7.0]))
    # "cat" reaches 4 values now → its buffer stats; "dog" has 2 → this batch's global stats.
    prompts = ["cat", "dog", "cat"]
    rewards = np.array([4.0, 5.0, 9.0])
    adv = tracker.update(prompts, rewards)
    cat_buffer = np.array([1.0, 2.0, 4.0, 9.0])
    np.testing.assert_allclose(adv[[0, 2]], (rewards[[0, 2]] - cat_buffer.mean()) / (cat_buffer.std() + 1e-6), rtol=1e-12)
    np.testing.assert_allclose(adv[1], (5.0 - rewards.mean()) / (rewards.std() + 1e-6), rtol=1e-12)
    stats = tracker.get_stats()
    assert stats["cat"]["mean"] == pytest.approx(cat_buffer.mean()) and stats["cat"]["count"] == 4


def test_spec8_6_tracker_buffer_advantages_are_standardised():
    """Once a prompt has ≥ min_count rewards, its buffer normalised by the tracker has mean ≈ 0 and std ≈ 1."""
    rng = np.random.default_rng(0)
    buffer_size, min_count = 16, 8
    tracker = PerPromptStatTracker(buffer_size, min_count)
    names = [f"prompt {k}" for k in range(5)]
    for step in range(12):
        prompts = list(rng.choice(names, size=12))
        rewards = rng.normal(loc=3.0 * step, scale=2.0, size=12)  # drifting rewards: the buffer must roll
        adv = tracker.update(prompts, rewards)
        for name in set(prompts):
            buffer = np.asarray(tracker.stats[name])
            assert len(buffer) <= buffer_size
            if len(buffer) < min_count:
                continue
            rows = np.asarray(prompts) == name
            mean, std = buffer.mean(), buffer.std()
            np.testing.assert_allclose(adv[rows], (rewards[rows] - mean) / (std + 1e-6), rtol=1e-10)
            standardised = (buffer - mean) / (std + 1e-6)
            assert abs(standardised.mean()) < 1e-9 and standardised.std() == pytest.approx(1.0, abs=1e-5)
    # A prompt whose batch fills its whole buffer: the returned advantages themselves are standardised.
    tracker = PerPromptStatTracker(buffer_size=16, min_count=16)
    adv = tracker.update(["a"] * 16, rng.normal(5.0, 3.0, size=16))
    assert abs(adv.mean()) < 1e-9 and adv.std() == pytest.approx(1.0, abs=1e-5)


def test_spec8_6_tracker_buffer_keeps_most_recent_rewards():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    for r in range(6):
        tracker.update(["x"], np.array([float(r)]))
    assert list(tracker.stats["x"]) == [3.0, 4.0, 5.0]


def test_tracker_tensor_in_tensor_out_and_nonfinite_rewards():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    rewards = torch.tensor([1.0, float("nan"), 3.0, 2.0], dtype=torch.float32)
    adv = tracker.update(["a", "a", "b", "a"], rewards)
    assert isinstance(adv, torch.Tensor) and adv.dtype == torch.float32 and adv.shape == (4,)
    assert torch.isfinite(adv).all() and adv[1] == 0
    assert list(tracker.stats["a"]) == [1.0, 2.0]  # the NaN is not stored
    finite = np.array([1.0, 3.0, 2.0])
    assert float(adv[2]) == pytest.approx((3.0 - finite.mean()) / (finite.std() + 1e-6), rel=1e-6)


def test_tracker_state_dict_round_trip():
    rng = np.random.default_rng(1)
    names = ["a", "b", "c"]
    tracker = PerPromptStatTracker(buffer_size=5, min_count=3)
    for _ in range(4):
        tracker.update(list(rng.choice(names, size=6)), rng.normal(size=6))
    blob = io.BytesIO()
    torch.save(tracker.state_dict(), blob)
    blob.seek(0)
    resumed = PerPromptStatTracker(buffer_size=99, min_count=99)
    resumed.load_state_dict(torch.load(blob, weights_only=True))
    assert resumed.buffer_size == 5 and resumed.min_count == 3
    assert resumed.get_stats() == tracker.get_stats()
    for _ in range(4):
        prompts, rewards = list(rng.choice(names, size=6)), rng.normal(size=6)
        np.testing.assert_array_equal(resumed.update(prompts, rewards), tracker.update(prompts, rewards))
    assert all(resumed.stats[k].maxlen == 5 for k in resumed.stats)


def test_batch_advantages_without_tracking():
    rewards = np.array([0.5, 1.5, -2.0, 4.0])
    np.testing.assert_allclose(batch_advantages(rewards), (rewards - rewards.mean()) / (rewards.std() + 1e-8), rtol=1e-12)
    t = torch.tensor(rewards, dtype=torch.float32)
    out = batch_advantages(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor((rewards - rewards.mean()) / (rewards.std() + 1e-8), dtype=torch.float32))
    assert np.all(batch_advantages(np.array([2.0, 2.0, 2.0])) == 0)


# ---------------------------------------------------------------------------- §8.7 PPO surrogate


def _toy_log_prob(theta: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """A differentiable per-sample log-prob: log p_k = tanh(feats_k · θ)."""
    return torch.tanh(feats @ theta)


def test_spec8_7_surrogate_at_ratio_one_is_policy_gradient():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(8, 3, generator=g, dtype=F64)
    theta = torch.randn(3, generator=g, dtype=F64, requires_grad=True)
    advantages = torch.tensor([0.5, -1.0, 7.0, -9.0, 2.0, 0.0, -0.3, 5.5], dtype=F64)
    a_clip = advantages.clamp(-5, 5)
    log_prob = _toy_log_prob(theta, feats)
    loss, stats = ddpo_loss(log_prob, log_prob.detach(), advantages, clip_range=1e-4)
    assert float(loss.detach()) == pytest.approx(float(-a_clip.mean()), rel=1e-14)
    (grad,) = torch.autograd.grad(loss, theta)
    (expected,) = torch.autograd.grad(-(a_clip * _toy_log_prob(theta, feats)).mean(), theta)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
    assert float(stats["clipfrac"]) == 0.0 and float(stats["approx_kl"]) == 0.0 and float(stats["ratio"]) == 1.0


def test_spec8_7_advantage_clipping_at_five():
    log_prob = torch.zeros(4, dtype=F64)
    advantages = torch.tensor([100.0, -100.0, 5.0, -4.0], dtype=F64)
    loss, _ = ddpo_loss(log_prob, log_prob, advantages, clip_range=1e-4)
    assert float(loss) == pytest.approx(-(5.0 - 5.0 + 5.0 - 4.0) / 4, rel=1e-14)
    loss_custom, _ = ddpo_loss(log_prob, log_prob, advantages, clip_range=1e-4, adv_clip_max=1.0)
    assert float(loss_custom) == pytest.approx(-(1.0 - 1.0 + 1.0 - 1.0) / 4, abs=1e-15)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_spec8_7_no_gradient_past_clip_on_improving_side(sign):
    """A > 0 with ρ > 1+ε (or A < 0 with ρ < 1−ε) has already improved: zero gradient. The other side still learns."""
    eps = 1e-4
    old = torch.zeros(3, dtype=F64)
    advantages = torch.full((3,), 2.0 * sign, dtype=F64)
    improved = (sign * 5 * eps) * torch.ones(3, dtype=F64)
    log_prob = improved.clone().requires_grad_()
    loss, stats = ddpo_loss(log_prob, old, advantages, clip_range=eps)
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert torch.equal(grad, torch.zeros_like(grad))
    assert float(stats["clipfrac"]) == 1.0
    worsened = (-improved).clone().requires_grad_()
    loss, _ = ddpo_loss(worsened, old, advantages, clip_range=eps)
    (grad,) = torch.autograd.grad(loss, worsened)
    torch.testing.assert_close(grad, -advantages * torch.exp(-improved) / 3, rtol=1e-12, atol=0)


def test_ddpo_stats_values():
    log_prob = torch.tensor([0.0, 1e-3, -2e-3, 5e-5], dtype=F64)
    old = torch.zeros(4, dtype=F64)
    _, stats = ddpo_loss(log_prob, old, torch.ones(4, dtype=F64), clip_range=1e-4)
    assert float(stats["approx_kl"]) == pytest.approx(0.5 * float((log_prob**2).mean()), rel=1e-12)
    assert float(stats["clipfrac"]) == 0.5
    assert float(stats["ratio"]) == pytest.approx(float(torch.exp(log_prob).mean()), rel=1e-12)
    with pytest.raises(ValueError):
        ddpo_loss(log_prob, old[:3], torch.ones(4, dtype=F64), clip_range=1e-4)
