"""Flow-GRPO advantages, clipped loss and KL: docs/algorithms/flow_grpo.md §9 items 8, 9, 10 and 13."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genreward.flow import flow_mean_std, flow_sigmas, flow_step_with_logprob, trained_steps
from trainers.losses import flow_kl, group_advantages, grpo_loss, nonzero_advantage_mask


def _grouped_rewards(seed=0, groups=6, size=8):
    rng = np.random.default_rng(seed)
    rewards = np.concatenate([rng.normal(loc=k, scale=0.3 + 0.2 * k, size=size) for k in range(groups)])
    ids = [f"prompt {k}" for k in range(groups) for _ in range(size)]
    perm = rng.permutation(len(ids))  # groups interleaved, as after gathering across ranks
    return rewards[perm], [ids[p] for p in perm]


# ---------------------------------------------------------------------------------- item 8: advantages


def test_item8_per_group_mean_zero_and_std_ratio():
    rewards, ids = _grouped_rewards()
    adv = group_advantages(rewards, ids, global_std=False, clip=None)
    assert isinstance(adv, np.ndarray) and adv.shape == rewards.shape
    ids_arr = np.asarray(ids)
    for key in set(ids):
        rows = ids_arr == key
        std = rewards[rows].std()
        assert abs(adv[rows].mean()) < 1e-12
        assert adv[rows].std() == pytest.approx(std / (std + 1e-4), rel=1e-12)
        np.testing.assert_allclose(adv[rows], (rewards[rows] - rewards[rows].mean()) / (std + 1e-4), rtol=1e-12)


def test_item8_global_std_uses_the_epoch_wide_std():
    rewards, ids = _grouped_rewards(seed=1)
    adv = group_advantages(rewards, ids, global_std=True, clip=None)
    ids_arr = np.asarray(ids)
    for key in set(ids):
        rows = ids_arr == key
        assert abs(adv[rows].mean()) < 1e-12
        expected = (rewards[rows] - rewards[rows].mean()) / (rewards.std() + 1e-4)
        np.testing.assert_allclose(adv[rows], expected, rtol=1e-12)


@pytest.mark.parametrize("global_std", [False, True])
def test_item8_constant_group_is_exactly_zero_and_filtered(global_std):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.3, 0.9, 0.5, 0.2], dtype=torch.float32)
    ids = ["a"] * 4 + ["b"] * 4
    adv = group_advantages(rewards, ids, global_std=global_std)
    assert isinstance(adv, torch.Tensor) and adv.dtype == torch.float32
    assert (adv[:4] == 0).all() and (adv[4:] != 0).all()
    keep = nonzero_advantage_mask(adv, num_batches=2)
    assert keep.tolist() == [False] * 4 + [True] * 4
    # 4 kept is a multiple of 2 batches; with 3 batches, 2 dropped samples are re-added at random.
    keep3 = nonzero_advantage_mask(adv[:, None].expand(8, 3), num_batches=3, generator=torch.Generator().manual_seed(0))
    assert int(keep3.sum()) == 6 and keep3[4:].all()


def test_item8_single_group_clip_nonfinite_and_ids_as_tensor():
    rewards = np.array([0.0] * 48 + [100.0])  # one outlier of 49: z = sqrt(48) ≈ 6.9 before the clip
    adv = group_advantages(rewards, None, clip=5.0)
    assert adv[-1] == 5.0 and (adv[:-1] < 0).all()
    assert group_advantages(rewards, None, clip=None)[-1] == pytest.approx(48**0.5, rel=1e-4)
    adv = group_advantages(np.array([1.0, np.nan, 3.0, 2.0]), torch.tensor([0, 0, 0, 1]), clip=None)
    assert adv[1] == 0 and adv[3] == 0  # NaN reward → 0; single-sample group → 0
    np.testing.assert_allclose(adv[[0, 2]], [-1 / (1 + 1e-4), 1 / (1 + 1e-4)])
    with pytest.raises(ValueError):
        group_advantages(rewards, ["a"] * 3)


# ------------------------------------------------------------------------------------ item 9: PPO loss


def test_item9_loss_at_ratio_one_is_policy_gradient():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(16, generator=g, dtype=torch.float64)
    adv = torch.randn(16, generator=g, dtype=torch.float64) * 4
    log_prob = old.clone().requires_grad_()
    loss, stats = grpo_loss(log_prob, old, adv, clip_range=1e-4)
    clipped = adv.clamp(-5, 5)
    torch.testing.assert_close(loss, -clipped.mean())
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -clipped / 16)  # ∇ = −mean(A ∇log p)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0 and stats["ratio"].item() == 1.0


def test_item9_no_gradient_past_the_clip_on_the_improving_side():
    eps = 1e-4
    old = torch.zeros(4, dtype=torch.float64)
    # ρ > 1+ε with A > 0, ρ < 1−ε with A < 0: clipped, zero gradient. The other two: unclipped, gradient.
    log_prob = torch.tensor([3e-4, -3e-4, 3e-4, -3e-4], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    loss, stats = grpo_loss(log_prob, old, adv, clip_range=eps)
    loss.backward()
    assert log_prob.grad[0].item() == 0.0 and log_prob.grad[1].item() == 0.0
    ratio = torch.exp(log_prob.detach())
    torch.testing.assert_close(log_prob.grad[2:], -adv[2:] * ratio[2:] / 4)
    assert stats["clipfrac"].item() == 1.0
    assert stats["approx_kl"].item() == pytest.approx(0.5 * 9e-8)


def test_item9_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        grpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(4), 1e-4)


# ---------------------------------------------------------------------------------------- item 10: KL


def _step_means(seed=0, step=3):
    sigmas = flow_sigmas(10).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    v = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    v_ref = v + 0.05 * torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    return sigmas, x, v, v_ref


def test_item10_kl_is_zero_when_the_means_are_equal():
    sigmas, x, v, _ = _step_means()
    mean, std, _ = flow_mean_std(sigmas, v, x, 3, 0.7, "sde")
    mean_ref, _, _ = flow_mean_std(sigmas, v.clone(), x, 3, 0.7, "sde")  # LoRA B = 0: same network output
    assert torch.equal(mean, mean_ref)
    assert flow_kl(mean, mean_ref, std).item() == 0.0


@pytest.mark.parametrize("step", [0, 3, 8])
def test_item10_kl_equals_spec_form_and_step_times_gaussian_kl(step):
    sigmas, x, v, v_ref = _step_means(step=step)
    v = v.requires_grad_()
    _, _, mean, std = flow_step_with_logprob(sigmas, v, x, step, 0.7, noise=torch.zeros_like(x))
    mean_ref, _, tau = flow_mean_std(sigmas, v_ref, x, step, 0.7, "sde")
    kl = flow_kl(mean, mean_ref, std)
    spec = (((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std**2)).mean()
    torch.testing.assert_close(kl, spec)
    # |Δ_j| × the exact per-element Gaussian KL(N(μ_θ, τ²) ‖ N(μ_ref, τ²)), τ = s·sqrt(|Δ_j|).
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, tau.expand_as(mean)), torch.distributions.Normal(mean_ref, tau.expand_as(mean))
    )
    delta = (sigmas[step] - sigmas[step + 1]).item()
    torch.testing.assert_close(kl, delta * exact.mean(dim=(1, 2, 3)).mean())
    kl.backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()
    # Scalar std and [B] std are accepted.
    torch.testing.assert_close(flow_kl(mean.detach(), mean_ref, std.reshape(-1)), spec.detach())
    torch.testing.assert_close(flow_kl(mean.detach(), mean_ref, 0.5), (((mean - mean_ref) ** 2).mean() / 0.5).detach())


# ------------------------------------------------------------------------------------ item 13: trained steps


def test_item13_trained_steps():
    assert trained_steps(10, 0.99) == list(range(9))  # steps 0–8; the last step never enters the loss
    assert 9 not in trained_steps(10, 0.99)
    assert trained_steps(6, 5 / 6 + 1e-9) == list(range(5))  # FLUX: 5 of 6
    assert trained_steps(10, 1.0) == list(range(10))
    with pytest.raises(ValueError):
        trained_steps(10, 0.0)
