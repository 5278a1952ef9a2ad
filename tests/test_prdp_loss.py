"""PRDP loss: the loss-related items of docs/algorithms/prdp.md §9 (1–9, 11; item 10 needs a diffusion model).

Test names carry the item of §9 they check (``test_spec9_<item>_...``). Gradient checks run on a toy fp64 "model":
a linear map θ: features[n, i, t] → Gaussian means, so log π_θ(n, i, t) is a differentiable function of θ,
π_ref is a frozen copy and π_θold a perturbed copy.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from genreward.errors import GenrewardError
from genreward.sampling import gaussian_log_prob
from trainers.losses import logratio_from_means, rdp_loss, rdp_pair_terms, rdp_step_weights

F64 = torch.float64


# ----------------------------------------------------------------------------------------- helpers


class ToyPolicy:
    """Per-(prompt, image, step) Gaussian transitions whose means are a linear function of θ = W [D, F]."""

    def __init__(self, n: int, b: int, t: int, feat_dim: int = 4, dim: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.feat = torch.randn(n, b, t, feat_dim, generator=g, dtype=F64)
        # Stored "next latents": fp32-representable so the fp32 cast inside gaussian_log_prob is exact.
        self.x = torch.randn(n, b, t, dim, generator=g, dtype=torch.float32).to(F64)
        self.sigma = torch.linspace(0.5, 1.5, t, dtype=F64)
        self.w_ref = 0.5 * torch.randn(dim, feat_dim, generator=g, dtype=F64)
        self.g = g

    def perturbed(self, w: torch.Tensor, scale: float) -> torch.Tensor:
        return w + scale * torch.randn(w.shape, generator=self.g, dtype=F64)

    def log_prob(self, w: torch.Tensor, steps: slice = slice(None)) -> torch.Tensor:
        """log π_w(x_{t−1} | x_t) [N, B, t] for the timesteps in ``steps`` (per-element mean, as DDPO)."""
        mean = self.feat[:, :, steps] @ w.T
        n, b, t, d = mean.shape
        std = self.sigma[steps].reshape(1, 1, t, 1).expand(n, b, t, 1).reshape(-1, 1)
        return gaussian_log_prob(self.x[:, :, steps].reshape(-1, d), mean.reshape(-1, d), std).reshape(n, b, t)


def one_graph_grad(policy: ToyPolicy, w: torch.Tensor, old: torch.Tensor, rewards, beta, eps, reduction="mean", valid=None):
    """Reference: autograd of rdp_loss built in a single graph over all timesteps."""
    w = w.detach().clone().requires_grad_()
    logratio = policy.log_prob(w) - policy.log_prob(policy.w_ref)
    loss, stats = rdp_loss(logratio, old, rewards, beta, eps, reduction, valid, return_stats=True)
    loss.backward()
    return w.grad, loss.detach(), stats


def two_pass_grad(policy: ToyPolicy, w: torch.Tensor, old: torch.Tensor, rewards, beta, eps, reduction="mean", valid=None, chunk=2):
    """docs/algorithms/prdp.md §4.1: no-grad pass 1 → step weights → pass 2 backprop of Σ g·log π_θ in timestep chunks."""
    w = w.detach().clone().requires_grad_()
    ref = policy.log_prob(policy.w_ref)
    with torch.no_grad():
        logratio = policy.log_prob(w) - ref
    weights, stats = rdp_step_weights(logratio, old, rewards, beta, eps, reduction, valid, return_stats=True)
    num_steps = logratio.shape[-1]
    for start in range(0, num_steps, chunk):
        steps = slice(start, start + chunk)
        (weights[:, :, steps] * policy.log_prob(w, steps)).sum().backward()
    return w.grad, stats


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def loop_loss(logratio, old, rewards, beta, eps, reduction="mean") -> float:
    """Literal per-pair Python loop of docs/algorithms/prdp.md §3–4 (the paper's pseudo-code), for closed-form comparisons."""
    n_prompts, b, t = logratio.shape
    total = 0.0
    for n in range(n_prompts):
        a, o, r = logratio[n].double(), old[n].double(), rewards[n].double()
        c = torch.maximum(torch.minimum(a, o + eps), o - eps)
        red = (lambda z: z.mean(-1)) if reduction == "mean" else (lambda z: z.sum(-1))
        big_a, big_c = red(a), red(c)
        pair_losses = []
        for i, j in itertools.permutations(range(b), 2):
            if r[i] > r[j]:
                y = (r[i] - r[j]) / beta
                pair_losses.append(max(float((big_a[i] - big_a[j] - y) ** 2), float((big_c[i] - big_c[j] - y) ** 2)))
        total += sum(pair_losses) / len(pair_losses) if pair_losses else 0.0
    return total / n_prompts


def random_inputs(n=3, b=5, t=7, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    old = 0.1 * torch.randn(n, b, t, generator=g, dtype=F64)
    logratio = old + spread * 1e-3 * torch.randn(n, b, t, generator=g, dtype=F64)
    rewards = torch.randn(n, b, generator=g, dtype=F64)
    return logratio, old, rewards


# --------------------------------------------------------------------------------- §9.1 initial loss


def test_spec9_1_initial_loss_closed_form():
    """θ = θ_old = θ_ref ⇒ a = o = 0 ⇒ loss = mean_n mean_{r_i>r_j} ((r_i − r_j)/β)², ties dropped."""
    policy = ToyPolicy(n=3, b=6, t=5)
    logratio = policy.log_prob(policy.w_ref) - policy.log_prob(policy.w_ref)
    assert torch.equal(logratio, torch.zeros_like(logratio))
    rewards = torch.tensor(
        [[0.3, 0.1, 0.3, -0.2, 0.7, 0.1], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.5, 0.5, 0.5, 0.5, 0.5, 0.25]], dtype=F64
    )
    beta = 0.05
    expected = 0.0
    for row in rewards.tolist():
        diffs = [(ri - rj) / beta for ri, rj in itertools.product(row, row) if ri > rj]
        expected += sum(d * d for d in diffs) / len(diffs)
    expected /= rewards.shape[0]
    for eps in (1e-6, 1e-4, math.inf):
        loss, stats = rdp_loss(logratio, logratio, rewards, beta, eps, return_stats=True)
        assert float(loss) == pytest.approx(expected, rel=1e-14)
        assert int(stats["num_pairs"]) == 13 + 15 + 5  # ties dropped: prompt 0 has two tied pairs
    assert float(rdp_loss(logratio, logratio, rewards, beta, 1e-6, reduction="sum")) == pytest.approx(expected, rel=1e-14)


# ------------------------------------------------------------------------------ §9.2 initial gradient


def test_spec9_2_initial_gradient_formula():
    """∇L at init = −(2/N) Σ_n (1/P_n) Σ_pairs (Δr/β)(1/T) Σ_t [∇log π(i,t) − ∇log π(j,t)], three ways."""
    n, b, t = 3, 4, 6
    policy = ToyPolicy(n, b, t, seed=1)
    rewards = torch.tensor([[0.2, 0.9, -0.4, 0.9], [1.0, 0.0, 0.5, 0.25], [0.3, 0.3, 0.3, 0.3]], dtype=F64)
    beta, eps = 0.1, 1e-6
    old = torch.zeros(n, b, t, dtype=F64)

    w = policy.w_ref.clone().requires_grad_()
    surrogate = torch.zeros((), dtype=F64)
    logp = policy.log_prob(w)
    for k in range(n):
        pairs = [(i, j) for i, j in itertools.permutations(range(b), 2) if rewards[k, i] > rewards[k, j]]
        for i, j in pairs:
            dr = float(rewards[k, i] - rewards[k, j]) / beta
            surrogate = surrogate - (2.0 / n) / len(pairs) * dr * (logp[k, i].sum() - logp[k, j].sum()) / t
    (expected,) = torch.autograd.grad(surrogate, w)

    grad_graph, loss, _ = one_graph_grad(policy, policy.w_ref, old, rewards, beta, eps)
    grad_two_pass, _ = two_pass_grad(policy, policy.w_ref, old, rewards, beta, eps, chunk=4)
    assert rel_err(grad_graph, expected) < 1e-10
    assert rel_err(grad_two_pass, expected) < 1e-10
    assert expected.norm() > 0


# ------------------------------------------------------------------------------ §9.3 unclipped limit


def test_spec9_3_unclipped_limit_is_plain_rdp():
    """ε = ∞: the loss equals Eq. 14 with the App. G mean over T, and no pair is on the clipped branch."""
    logratio, old, rewards = random_inputs(spread=50.0, seed=3)
    loss, stats = rdp_loss(logratio, old, rewards, beta=0.5, clip_eps=math.inf, return_stats=True)
    plain = 0.0
    for k in range(logratio.shape[0]):
        big_a = logratio[k].mean(-1)
        terms = [
            float((big_a[i] - big_a[j] - (rewards[k, i] - rewards[k, j]) / 0.5) ** 2)
            for i, j in itertools.permutations(range(logratio.shape[1]), 2)
            if rewards[k, i] > rewards[k, j]
        ]
        plain += sum(terms) / len(terms)
    plain /= logratio.shape[0]
    assert float(loss) == pytest.approx(plain, rel=1e-13)
    assert float(stats["frac_clipped_branch"]) == 0.0
    assert float(stats["frac_steps_clipped"]) == 0.0
    # Finite ε agrees with the literal pair loop too (clipped case).
    eps = float((logratio - old).abs().median())
    assert float(rdp_loss(logratio, old, rewards, 0.5, eps)) == pytest.approx(loop_loss(logratio, old, rewards, 0.5, eps), rel=1e-13)


# ---------------------------------------------------------------------------- §9.4 clip freezes progress


@pytest.mark.parametrize("image", [0, 1])
def test_spec9_4_clip_freezes_progress_in_improving_direction(image):
    """A step moved past o ± ε in the improving direction gets zero gradient; moved the other way it still gets one."""
    t, eps, beta = 4, 1e-3, 1.0
    g = torch.Generator().manual_seed(4)
    old = 0.01 * torch.randn(1, 2, t, generator=g, dtype=F64)
    rewards = torch.tensor([[1.0, 0.0]], dtype=F64)  # image 0 is the winner: y = 1 > 0 = A_0 − A_1 at a = o
    improving = 1.0 if image == 0 else -1.0  # the winner should raise its log-ratio, the loser lower it

    def grads(shift: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
        logratio = old.clone()
        logratio[0, image, 1] += shift
        weights, stats = rdp_step_weights(logratio, old, rewards, beta, eps, return_stats=True)
        a = logratio.clone().requires_grad_()
        rdp_loss(a, old, rewards, beta, eps).backward()
        torch.testing.assert_close(a.grad, weights, rtol=1e-12, atol=1e-15)
        return weights, a.grad, stats

    frozen, _, stats = grads(2 * eps * improving)
    assert float(stats["frac_clipped_branch"]) == 1.0  # clipped error is the larger one
    assert frozen[0, image, 1] == 0.0
    others = [s for s in range(t) if s != 1]
    assert torch.all(frozen[0, image, others] != 0)  # steps still inside the interval keep learning

    worsening, _, stats = grads(-2 * eps * improving)
    assert float(stats["frac_clipped_branch"]) == 0.0  # unclipped error is the larger one
    assert worsening[0, image, 1] != 0.0
    torch.testing.assert_close(worsening[0, image, 1], worsening[0, image, 0], rtol=1e-14, atol=0)
    # The gradient at the moved step pushes back towards improvement (descent raises the winner's a).
    assert float(-worsening[0, image, 1]) * improving > 0


# ------------------------------------------------------------------------------- §9.5 invariances


def test_spec9_5_pair_swap_and_permutation_invariance():
    logratio, old, rewards = random_inputs(n=2, b=6, seed=5, spread=30.0)
    eps = float((logratio - old).abs().median())
    base = rdp_loss(logratio, old, rewards, 0.3, eps)
    swap = torch.tensor([1, 0, 2, 3, 4, 5])
    swapped = rdp_loss(logratio[:, swap], old[:, swap], rewards[:, swap], 0.3, eps)
    torch.testing.assert_close(swapped, base, rtol=1e-13, atol=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        perm = torch.randperm(6, generator=g)
        permuted = rdp_loss(logratio[:, perm], old[:, perm], rewards[:, perm], 0.3, eps)
        torch.testing.assert_close(permuted, base, rtol=1e-13, atol=0)
        weights = rdp_step_weights(logratio[:, perm], old[:, perm], rewards[:, perm], 0.3, eps)
        torch.testing.assert_close(weights, rdp_step_weights(logratio, old, rewards, 0.3, eps)[:, perm], rtol=1e-12, atol=1e-15)
    # A single pair: l(i, j) = l(j, i) when the roles (and rewards) swap.
    two = rdp_loss(logratio[:1, :2], old[:1, :2], rewards[:1, :2], 0.3, eps)
    two_swapped = rdp_loss(logratio[:1, [1, 0]], old[:1, [1, 0]], rewards[:1, [1, 0]], 0.3, eps)
    assert float(two) == float(two_swapped)


def test_spec9_5_reward_shift_invariance():
    logratio, old, rewards = random_inputs(n=3, b=5, seed=6, spread=30.0)
    eps = float((logratio - old).abs().median())
    shift = torch.tensor([[3.0], [-7.5], [0.125]], dtype=F64)
    base = rdp_loss(logratio, old, rewards, 0.2, eps)
    torch.testing.assert_close(rdp_loss(logratio, old, rewards + shift, 0.2, eps), base, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        rdp_step_weights(logratio, old, rewards + shift, 0.2, eps),
        rdp_step_weights(logratio, old, rewards, 0.2, eps),
        rtol=1e-10,
        atol=1e-14,
    )


def test_spec9_5_all_equal_rewards_zero_loss_finite_grad():
    """All-equal rewards → no pairs → loss 0 with a zero (not NaN) gradient; such a group still counts in N."""
    logratio, old, _ = random_inputs(n=2, b=4, seed=7, spread=10.0)
    equal = torch.full((2, 4), 0.42, dtype=F64)
    a = logratio.clone().requires_grad_()
    loss, stats = rdp_loss(a, old, equal, 1e-3, 1e-4, return_stats=True)
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(stats["num_pairs"]) == 0
    assert torch.isfinite(a.grad).all() and torch.equal(a.grad, torch.zeros_like(a.grad))
    assert torch.equal(rdp_step_weights(logratio, old, equal, 1e-3, 1e-4), torch.zeros_like(logratio))
    assert all(math.isfinite(float(v)) for v in stats.values())
    # Mixed batch: a pairless prompt contributes 0 and still divides by N (App. G masked mean over all prompts).
    rewards = equal.clone()
    rewards[1] = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=F64)
    mixed = rdp_loss(logratio, old, rewards, 1e-3, 1e-4)
    alone = rdp_loss(logratio[1:], old[1:], rewards[1:], 1e-3, 1e-4)
    torch.testing.assert_close(mixed, alone / 2, rtol=1e-14, atol=0)


def test_nonfinite_rewards_masked_equal_dropping_them():
    """NaN/inf rewards with valid=False: finite loss and gradient, identical to removing those images."""
    logratio, old, rewards = random_inputs(n=2, b=5, seed=8, spread=30.0)
    eps = float((logratio - old).abs().median())
    bad = rewards.clone()
    bad[0, 2], bad[1, 4], bad[1, 0] = float("nan"), float("inf"), float("-inf")
    valid = torch.isfinite(bad)
    poisoned = logratio.clone()
    poisoned[0, 2, 3] = float("nan")  # even a non-finite log-ratio of an excluded image must not leak
    a = poisoned.clone().requires_grad_()
    loss, stats = rdp_loss(a, old, bad, 0.3, eps, valid=valid, return_stats=True)
    loss.backward()
    keep0, keep1 = [0, 1, 3, 4], [1, 2, 3]
    dropped = (
        rdp_loss(logratio[:1, keep0], old[:1, keep0], rewards[:1, keep0], 0.3, eps)
        + rdp_loss(logratio[1:, keep1], old[1:, keep1], rewards[1:, keep1], 0.3, eps)
    ) / 2
    torch.testing.assert_close(loss, dropped, rtol=1e-13, atol=0)
    assert int(stats["num_pairs"]) == 6 + 3
    assert torch.isfinite(a.grad).all()
    assert torch.all(a.grad[~valid] == 0)
    weights = rdp_step_weights(poisoned, old, bad, 0.3, eps, valid=valid)
    torch.testing.assert_close(weights, a.grad, rtol=1e-12, atol=1e-15)
    # valid=None: non-finite rewards are excluded automatically.
    torch.testing.assert_close(rdp_loss(poisoned, old, bad, 0.3, eps), loss.detach(), rtol=0, atol=0)


# ------------------------------------------------------------------------- §9.6 u = v at first step


@pytest.mark.parametrize("eps", [1e-6, 1e-4, 0.0])
def test_spec9_6_u_equals_v_at_first_step_of_epoch(eps):
    """θ = θ_old (≠ θ_ref): pass 1 gives a = o bit-exactly, so u = v for every pair and the gradient is the unclipped one."""
    policy = ToyPolicy(n=2, b=5, t=4, seed=9)
    w_old = policy.perturbed(policy.w_ref, 0.05)
    ref = policy.log_prob(policy.w_ref)
    old = policy.log_prob(w_old) - ref
    logratio = policy.log_prob(w_old) - ref  # recomputation at k = 1
    rewards = torch.randn(2, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    terms = rdp_pair_terms(logratio, old, rewards, 0.01, eps)
    assert terms.pair_mask.any()
    assert torch.equal(terms.res_u[terms.pair_mask], terms.res_v[terms.pair_mask])
    assert torch.all(terms.res_u[terms.pair_mask] != 0)
    loss, stats = rdp_loss(logratio, old, rewards, 0.01, eps, return_stats=True)
    assert float(stats["frac_clipped_branch"]) == 0.0
    torch.testing.assert_close(
        rdp_step_weights(logratio, old, rewards, 0.01, eps), rdp_step_weights(logratio, old, rewards, 0.01, math.inf), rtol=0, atol=0
    )


# -------------------------------------------------------------------------- §9.7 sum/mean equivalence


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spec9_7_mean_equals_sum_with_scaled_beta(seed):
    """loss_mean(β) = loss_sum(β/T)/T² (and so do the gradients), clipped or not."""
    logratio, old, rewards = random_inputs(n=3, b=6, t=9, seed=seed, spread=40.0)
    t = logratio.shape[-1]
    beta = 0.7
    for eps in (float((logratio - old).abs().median()), math.inf):
        mean_loss, mean_stats = rdp_loss(logratio, old, rewards, beta, eps, "mean", return_stats=True)
        if eps < math.inf:
            assert float(mean_stats["frac_clipped_branch"]) > 0  # the clipped branch is exercised
        sum_loss = rdp_loss(logratio, old, rewards, beta / t, eps, "sum")
        torch.testing.assert_close(mean_loss, sum_loss / t**2, rtol=1e-12, atol=0)
        torch.testing.assert_close(
            rdp_step_weights(logratio, old, rewards, beta, eps, "mean"),
            rdp_step_weights(logratio, old, rewards, beta / t, eps, "sum") / t**2,
            rtol=1e-10,
            atol=1e-15,
        )


# ------------------------------------------------------------------------------ §9.8 toy optimum


def _gaussian_logratio(x: torch.Tensor, mu: torch.Tensor, s: float) -> torch.Tensor:
    """1-step toy: log N(x; μ, s²) − log N(x; 0, s²) for x [N, B] → [N, B, 1]."""
    flat = x.reshape(-1, 1)
    std = torch.tensor(s, dtype=F64)
    return logratio_from_means(flat, mu.expand_as(flat), torch.zeros_like(flat), std).reshape(*x.shape, 1)


def test_spec9_8_toy_loss_is_zero_at_tilted_optimum():
    s, beta = 0.8, 0.25
    mu_star = torch.tensor(s**2 / beta, dtype=F64)
    g = torch.Generator().manual_seed(10)
    for _ in range(3):
        x = mu_star + s * torch.randn(4, 8, generator=g, dtype=F64) * 3
        a = _gaussian_logratio(x, mu_star, s)
        old = _gaussian_logratio(x, mu_star - 0.3, s)  # the unclipped RDP loss ignores the snapshot
        assert float(rdp_loss(a, a, x, beta, 1e-4)) < 1e-24  # snapshot at the optimum: both branches are 0
        assert float(rdp_loss(a, old, x, beta, math.inf)) < 1e-24
        assert float(rdp_loss(_gaussian_logratio(x, mu_star * 0.9, s), old, x, beta, math.inf)) > 1e-3


@pytest.mark.parametrize("eps", [0.02, 0.2])
def test_spec9_8_toy_online_training_converges_to_tilted_mean(eps):
    """Online PRDP with snapshots on π_θ = N(μ, s²), π_ref = N(0, s²), r(x) = x converges to μ = s²/β."""
    s, beta = 0.8, 0.25
    mu_star = s**2 / beta
    n, b, k_steps, epochs = 4, 16, 5, 120
    g = torch.Generator().manual_seed(11)
    mu = torch.zeros((), dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([mu], lr=0.2)
    clipped_steps = 0.0
    for _ in range(epochs):
        mu_old = mu.detach().clone()
        x = mu_old + s * torch.randn(n, b, generator=g, dtype=F64)  # samples from the snapshot
        old = _gaussian_logratio(x, mu_old, s)
        for _ in range(k_steps):
            loss, stats = rdp_loss(_gaussian_logratio(x, mu, s), old, x, beta, eps, return_stats=True)
            clipped_steps = max(clipped_steps, float(stats["frac_steps_clipped"]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert clipped_steps > 0.5  # the proximal clip was active during training
    assert abs(mu.item() - mu_star) / mu_star < 0.02


# ------------------------------------------------------------------- §9.9 two-pass = one-graph gradient


def _clipped_setting(seed: int):
    """θ_ref, θ_old = θ_ref + δ, θ = θ_old + δ' with ε at the median |a − o|: ~half the steps clipped."""
    n, b, t = 3, 5, 6
    policy = ToyPolicy(n, b, t, seed=seed)
    w_old = policy.perturbed(policy.w_ref, 0.05)
    w = policy.perturbed(w_old, 0.05)
    ref = policy.log_prob(policy.w_ref)
    old = policy.log_prob(w_old) - ref
    logratio = policy.log_prob(w) - ref
    rewards = torch.randn(n, b, generator=torch.Generator().manual_seed(seed + 100), dtype=F64)
    eps = float((logratio - old).abs().median())
    return policy, w, old, rewards, eps


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spec9_9_two_pass_gradient_equals_one_graph_with_clipping(seed, reduction):
    policy, w, old, rewards, eps = _clipped_setting(seed)
    beta = 5.0 if reduction == "mean" else 5.0 / 6
    expected, loss, stats = one_graph_grad(policy, w, old, rewards, beta, eps, reduction)
    got, stats_two_pass = two_pass_grad(policy, w, old, rewards, beta, eps, reduction, chunk=2)
    assert 0 < float(stats["frac_steps_clipped"]) < 1, "some steps must be clipped and some inside"
    assert 0 < float(stats["frac_clipped_branch"]) < 1, "some pairs must be on the clipped (v) branch"
    assert rel_err(got, expected) < 1e-8
    torch.testing.assert_close(stats_two_pass["loss"], loss, rtol=1e-14, atol=0)
    assert float(stats_two_pass["frac_clipped_branch"]) == float(stats["frac_clipped_branch"])


@pytest.mark.parametrize("chunk", [1, 4, 6])
def test_spec9_9_two_pass_gradient_independent_of_chunking_and_masks(chunk):
    policy, w, old, rewards, eps = _clipped_setting(3)
    rewards[0, 1] = rewards[0, 3]  # a tie
    rewards[2] = 0.5  # a pairless prompt
    valid = torch.ones_like(rewards, dtype=torch.bool)
    valid[1, 4] = False
    expected, _, _ = one_graph_grad(policy, w, old, rewards, 5.0, eps, valid=valid)
    got, _ = two_pass_grad(policy, w, old, rewards, 5.0, eps, valid=valid, chunk=chunk)
    assert rel_err(got, expected) < 1e-8


def test_spec9_9_two_pass_gradient_unclipped_and_first_step():
    policy, w, old, rewards, _ = _clipped_setting(4)
    for eps in (math.inf, 1e-5):
        expected, _, _ = one_graph_grad(policy, w, old, rewards, 5.0, eps)
        got, _ = two_pass_grad(policy, w, old, rewards, 5.0, eps, chunk=3)
        assert rel_err(got, expected) < 1e-8
    # First step of an epoch: θ = θ_old, u = v.
    w_old = policy.perturbed(policy.w_ref, 0.05)
    old = policy.log_prob(w_old) - policy.log_prob(policy.w_ref)
    expected, _, _ = one_graph_grad(policy, w_old, old, rewards, 5.0, 1e-6)
    got, _ = two_pass_grad(policy, w_old, old, rewards, 5.0, 1e-6, chunk=3)
    assert rel_err(got, expected) < 1e-8


# ---------------------------------------------------------------------------- §9.11 log-ratio shortcut


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_spec9_11_logratio_shortcut_matches_full_densities(reduction):
    g = torch.Generator().manual_seed(12)
    shape = (5, 4, 8, 8)
    mu_theta = torch.randn(shape, generator=g)
    mu_ref = mu_theta + 0.1 * torch.randn(shape, generator=g)
    std = 0.2 + torch.rand(5, 1, 1, 1, generator=g)
    x = mu_ref + std * torch.randn(shape, generator=g)
    shortcut = logratio_from_means(x, mu_theta, mu_ref, std, reduction)
    assert shortcut.dtype == torch.float32 and shortcut.shape == (5,)
    full64 = gaussian_log_prob(x, mu_theta.double(), std.double(), reduction) - gaussian_log_prob(
        x, mu_ref.double(), std.double(), reduction
    )
    scale = 1.0 if reduction == "mean" else float(x[0].numel())
    torch.testing.assert_close(shortcut.double(), full64, rtol=0, atol=1e-6 * scale)
    full32 = gaussian_log_prob(x, mu_theta, std, reduction) - gaussian_log_prob(x, mu_ref, std, reduction)
    torch.testing.assert_close(shortcut, full32, rtol=0, atol=1e-5 * scale)
    # Same gradient w.r.t. μ_θ as the full log-density, and exactly 0 at μ_θ = μ_ref.
    mu = mu_theta.clone().requires_grad_()
    (grad_short,) = torch.autograd.grad(logratio_from_means(x, mu, mu_ref, std, reduction).sum(), mu)
    (grad_full,) = torch.autograd.grad(gaussian_log_prob(x, mu, std, reduction).sum(), mu)
    torch.testing.assert_close(grad_short, grad_full, rtol=1e-5, atol=1e-7)
    assert torch.equal(logratio_from_means(x, mu_ref, mu_ref, std, reduction), torch.zeros(5))


def test_rdp_rejects_bad_arguments():
    logratio, old, rewards = random_inputs()
    with pytest.raises(GenrewardError):
        rdp_loss(logratio, old, rewards, beta=0.0, clip_eps=1e-4)
    with pytest.raises(GenrewardError):
        rdp_loss(logratio, old, rewards, beta=1.0, clip_eps=-1.0)
    with pytest.raises(GenrewardError):
        rdp_step_weights(logratio, old, rewards, 1.0, 1e-4, reduction="max")
    with pytest.raises(ValueError):
        rdp_loss(logratio, old[:, :, :-1], rewards, 1.0, 1e-4)
    with pytest.raises(ValueError):
        rdp_loss(logratio, old, rewards[:, :-1], 1.0, 1e-4)
