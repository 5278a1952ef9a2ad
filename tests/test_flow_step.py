"""Flow-matching step kernels and schedules: docs/algorithms/flow_grpo.md §9 items 1–7, 12 and 14."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from genreward.errors import GenrewardError
from genreward.flow import (
    dance_sigmas,
    fast_window,
    flow_mean_std,
    flow_rollout,
    flow_sigmas,
    flow_step_with_logprob,
    flow_timesteps,
    euler_step,
    flux_image_seq_len,
    flux_mu,
    mixgrpo_window,
    noise_levels,
    scheduler_sigmas,
    stochastic_steps,
)

SD3_10 = [1.0, 0.9601293, 0.9133490, 0.8576923, 0.7903683, 0.7072785, 0.6021506, 0.4648760, 0.2780488, 0.0089286, 0.0]
FLUX_6_512 = [1.0, 0.9037, 0.7897, 0.6525, 0.4842, 0.2730, 0.0]
SD3_S = [3.506, 3.435, 2.273, 1.719, 1.359, 1.088, 0.861, 0.652, 0.434, 0.066]
SD3_TAU = [0.700, 0.743, 0.536, 0.446, 0.392, 0.353, 0.319, 0.282, 0.225, 0.0063]
FLUX_512 = {"image_seq_len": 1024}
KIND_LEVEL = {"sde": 0.7, "cps": 0.8, "dance": 0.3}


def _inputs(shape=(3, 4, 6, 6), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    z = torch.randn(shape, generator=g)
    return x, v, z


# ------------------------------------------------------------------------------------ item 1: schedules


def test_item1_sd3_sigmas_match_spec_and_diffusers():
    sigmas = flow_sigmas(10, shift=3.0)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (11,)
    torch.testing.assert_close(sigmas, torch.tensor(SD3_10), atol=1e-6, rtol=0)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    assert torch.equal(sigmas, scheduler.sigmas)
    assert torch.equal(flow_timesteps(sigmas), scheduler.timesteps)  # timesteps = 1000·σ


def test_item1_flux_mu_and_sigmas_match_spec_and_diffusers():
    assert flux_image_seq_len(512, 512) == 1024 and flux_image_seq_len(1024, 1024) == 4096
    assert flux_mu(1024) == pytest.approx(0.63, abs=1e-12)
    assert flux_mu(4096) == pytest.approx(1.15, abs=1e-12)
    sigmas = flow_sigmas(6, dynamic=FLUX_512)
    torch.testing.assert_close(sigmas, torch.tensor(FLUX_6_512), atol=1e-3, rtol=0)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    # The scheduler called the way the FLUX pipeline calls it (explicit linspace sigmas and μ).
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=0.63)
    assert torch.equal(sigmas, scheduler.sigmas)
    assert torch.equal(flow_timesteps(sigmas), scheduler.timesteps)


def test_item1_flux_mu_equals_pipeline_calculate_shift():
    flux = pytest.importorskip("diffusers.pipelines.flux.pipeline_flux")
    for length in (256, 1024, 2304, 4096):
        assert flux_mu(length) == pytest.approx(flux.calculate_shift(length), abs=1e-12)


def test_item1_scheduler_sigmas_reads_the_real_scheduler_and_dance_table():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert torch.equal(scheduler_sigmas(scheduler, 10), flow_sigmas(10))
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(GenrewardError):
        scheduler_sigmas(flux, 6)
    torch.testing.assert_close(scheduler_sigmas(flux, 6, image_seq_len=1024), flow_sigmas(6, dynamic=FLUX_512))
    with pytest.raises(GenrewardError):
        flow_sigmas(6, dynamic={"image_seq_len": 1024, "shift": 2})
    # DanceGRPO / toy grid: σ_i = 3u/(1+2u), u = 1 − i/N, shifted once.
    table = dance_sigmas(16)
    u = 1 - torch.arange(17) / 16
    torch.testing.assert_close(table, 3 * u / (1 + 2 * u))
    assert table[0].item() == 1.0 and table[-1].item() == 0.0


def test_item14_schedule_helpers_leave_the_callers_scheduler_alone():
    """A 40-step evaluation between sampling and training must not change the stored table (and vice versa)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(40)
    before = scheduler.timesteps.clone()
    table = scheduler_sigmas(scheduler, 10)
    assert torch.equal(scheduler.timesteps, before)
    x, v, _ = _inputs()
    _, lp1, _, _ = flow_step_with_logprob(table, v, x, 3, 0.7, noise=torch.zeros_like(x) + 0.5)
    scheduler.set_timesteps(40)
    _, lp2, _, _ = flow_step_with_logprob(table, v, x, 3, 0.7, noise=torch.zeros_like(x) + 0.5)
    assert torch.equal(lp1, lp2)


# ------------------------------------------------------------------------------- item 2: a = 0 is Euler


@pytest.mark.parametrize("schedule", ["sd3", "flux"])
def test_item2_zero_noise_equals_diffusers_euler_step(schedule):
    if schedule == "sd3":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(10)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=0.63)
    sigmas = scheduler.sigmas.clone()
    for i, t in enumerate(scheduler.timesteps):  # the scheduler's own step counter follows i
        x, v, z = _inputs(seed=i)
        euler = scheduler.step(v, t, x).prev_sample
        prev, lp, mean, std = flow_step_with_logprob(sigmas, v, x, i, 0.0, noise=z, kind="sde")
        torch.testing.assert_close(prev, euler, atol=1e-6, rtol=0)
        torch.testing.assert_close(mean, euler, atol=1e-6, rtol=0)
        assert torch.isnan(lp).all() and (std == 0).all()  # no density: reported invalid, never trained on
        prev, lp, mean, _ = flow_step_with_logprob(sigmas, v, x, i, 0.0, noise=z, kind="cps")
        torch.testing.assert_close(prev, euler, atol=1e-5, rtol=0)
        torch.testing.assert_close(mean, euler, atol=1e-5, rtol=0)
        assert (lp == 0).all()
        prev, lp, mean, _ = flow_step_with_logprob(sigmas, v, x, i, 0.0, noise=z, kind="dance")
        torch.testing.assert_close(prev, euler, atol=1e-6, rtol=0)
        assert torch.isnan(lp).all()
        assert torch.equal(euler_step(sigmas, v, x, i), euler)


def test_item2_zero_noise_sde_and_dance_are_bit_exact_euler():
    sigmas = flow_sigmas(10)
    x, v, z = _inputs()
    for i in range(10):
        prev, _, mean, _ = flow_step_with_logprob(sigmas, v, x, i, 0.0, noise=z)
        assert torch.equal(prev, x + (sigmas[i + 1] - sigmas[i]) * v) and torch.equal(prev, mean)
        assert torch.equal(prev, euler_step(sigmas, v, x, i))
        dance, _, _, _ = flow_step_with_logprob(sigmas, v, x, i, 0.0, noise=z, kind="dance")
        assert torch.equal(dance, prev)
    steps = torch.tensor([0, 3, 9])
    per_sample = euler_step(sigmas, v, x, steps)
    for b, i in enumerate(steps.tolist()):
        assert torch.equal(per_sample[b], euler_step(sigmas, v[b : b + 1], x[b : b + 1], i)[0])


# --------------------------------------------------------------------------------- item 3: first step


@pytest.mark.parametrize("num_steps", [2, 6, 10, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0, "flux"])
@pytest.mark.parametrize("a", [0.5, 0.7, 0.9])
def test_item3_first_step_transition_std_is_noise_level(num_steps, shift, a):
    sigmas = flow_sigmas(num_steps, dynamic=FLUX_512) if shift == "flux" else flow_sigmas(num_steps, shift=shift)
    x, v, _ = _inputs(shape=(2, 3))
    _, std, tau = flow_mean_std(sigmas, v, x, 0, a, "sde")
    torch.testing.assert_close(tau, torch.full_like(tau, a), atol=1e-6, rtol=0)
    s0 = a / math.sqrt(1 - sigmas[1].item())
    torch.testing.assert_close(std, torch.full_like(std, s0), atol=1e-5, rtol=1e-6)


def test_item3_sd3_per_step_std_table():
    sigmas = flow_sigmas(10)
    x, v, _ = _inputs(shape=(1, 2))
    for i in range(10):
        _, std, tau = flow_mean_std(sigmas, v, x, i, 0.7, "sde")
        assert std.item() == pytest.approx(SD3_S[i], abs=1e-3)
        assert tau.item() == pytest.approx(SD3_TAU[i], abs=1e-4 if i == 9 else 1e-3)


# ------------------------------------------------------------------------------------ item 4: closed form


@pytest.mark.parametrize("kind", ["sde", "cps", "dance"])
@pytest.mark.parametrize("step", [0, 4, 9])
def test_item4_closed_form_in_sampling_mode(kind, step):
    sigmas = dance_sigmas(10) if kind == "dance" else flow_sigmas(10)
    x, v, z = _inputs()
    prev, lp, mean, _ = flow_step_with_logprob(sigmas, v, x, step, KIND_LEVEL[kind], noise=z, kind=kind)
    m2, _, tau = flow_mean_std(sigmas, v, x, step, KIND_LEVEL[kind], kind)
    assert torch.equal(mean, m2)
    torch.testing.assert_close(prev, mean + tau * z, atol=1e-6, rtol=0)
    if kind == "cps":
        expected = -(tau**2 * z**2).mean(dim=(1, 2, 3))  # unnormalised: −mean (x' − μ)²
        torch.testing.assert_close(lp, expected, atol=1e-6, rtol=1e-5)
    else:
        expected = (-(z**2) / 2).mean(dim=(1, 2, 3)) - torch.log(tau.reshape(-1)) - 0.5 * math.log(2 * math.pi)
        torch.testing.assert_close(lp, expected, atol=1e-5, rtol=0)
    _, lp_sum, _, _ = flow_step_with_logprob(sigmas, v, x, step, KIND_LEVEL[kind], noise=z, kind=kind, reduction="sum")
    torch.testing.assert_close(lp_sum, lp * x[0].numel(), rtol=1e-5, atol=1e-4)


def test_item4_sde_mean_formula_and_cps_dance_means():
    sigmas = flow_sigmas(10)
    x, v, _ = _inputs()
    i, a = 3, 0.7
    sig, nxt = sigmas[i], sigmas[i + 1]
    dt = nxt - sig
    mean, std, _ = flow_mean_std(sigmas, v, x, i, a, "sde")
    s = a * torch.sqrt(sig / (1 - sig))
    torch.testing.assert_close(std.reshape(-1), s.expand(3))
    torch.testing.assert_close(mean, x * (1 + s**2 * dt / (2 * sig)) + v * (1 + s**2 * (1 - sig) / (2 * sig)) * dt)
    mean, _, tau = flow_mean_std(sigmas, v, x, i, 0.8, "cps")
    x0, x1 = x - sig * v, x + (1 - sig) * v
    torch.testing.assert_close(tau.reshape(-1), (nxt * math.sin(0.4 * math.pi)).expand(3))
    torch.testing.assert_close(mean, (1 - nxt) * x0 + nxt * math.cos(0.4 * math.pi) * x1, atol=1e-6, rtol=1e-5)
    mean, _, tau = flow_mean_std(sigmas, v, x, i, 0.3, "dance")
    torch.testing.assert_close(tau.reshape(-1), (0.3 * torch.sqrt(sig - nxt)).expand(3))
    torch.testing.assert_close(mean, x + dt * v - 0.5 * 0.09 * (-x1 / sig) * dt, atol=1e-6, rtol=1e-5)


def test_last_step_cps_is_deterministic_and_sde_is_not():
    sigmas = flow_sigmas(10)
    x, v, z = _inputs()
    prev, lp, mean, std = flow_step_with_logprob(sigmas, v, x, 9, 0.8, noise=z, kind="cps")
    assert (std == 0).all() and torch.equal(prev, mean.to(prev.dtype)) and (lp == 0).all()
    _, lp, _, _ = flow_step_with_logprob(sigmas, v, x, 9, 0.7, noise=z, kind="sde")
    assert torch.isfinite(lp).all()


def test_bad_arguments_are_rejected():
    sigmas = flow_sigmas(4)
    x, v, _ = _inputs()
    with pytest.raises(GenrewardError):
        flow_step_with_logprob(sigmas, v, x, 0, 0.7, kind="ode")
    with pytest.raises(ValueError):
        flow_step_with_logprob(sigmas, v, x, 4, 0.7)
    with pytest.raises(GenrewardError):
        flow_step_with_logprob(sigmas, v, x, 0, -0.1)
    with pytest.raises(GenrewardError):
        flow_step_with_logprob(sigmas, v, x, 0, 0.7, reduction="max")


# ----------------------------------------------------------------------------- item 5: recompute = recorded


@pytest.mark.parametrize("kind", ["sde", "cps", "dance"])
def test_item5_recomputed_equals_recorded_scalar_and_per_sample(kind):
    sigmas = flow_sigmas(10)
    a = KIND_LEVEL[kind]
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    x, v, _ = _inputs()
    for i in range(9):
        prev, lp, _, _ = flow_step_with_logprob(sigmas, v, x, i, a, kind=kind, generator=gens)
        _, again, _, _ = flow_step_with_logprob(sigmas, v, x, i, a, prev_sample=prev, kind=kind)
        assert (again - lp).abs().max().item() < 1e-6
    # Per-sample step indices: each row equals its own single-step evaluation, recorded and recomputed.
    steps = torch.tensor([0, 5, 8])
    prev, lp, mean, std = flow_step_with_logprob(sigmas, v, x, steps, a, kind=kind, generator=gens)
    _, again, _, _ = flow_step_with_logprob(sigmas, v, x, steps, a, prev_sample=prev, kind=kind)
    assert (again - lp).abs().max().item() < 1e-6
    for b, i in enumerate(steps.tolist()):
        _, one, m1, s1 = flow_step_with_logprob(sigmas, v[b : b + 1], x[b : b + 1], i, a, prev_sample=prev[b : b + 1], kind=kind)
        assert (one - lp[b]).abs().item() < 1e-6
        assert torch.equal(m1, mean[b : b + 1]) and torch.equal(s1, std[b : b + 1])


def test_item5_per_sample_noise_levels():
    sigmas = flow_sigmas(10)
    x, v, z = _inputs()
    levels = torch.tensor([0.7, 0.0, 0.5])
    prev, lp, _, _ = flow_step_with_logprob(sigmas, v, x, 2, levels, noise=z)
    for b in range(3):
        p1, l1, _, _ = flow_step_with_logprob(sigmas, v[b : b + 1], x[b : b + 1], 2, float(levels[b]), noise=z[b : b + 1])
        assert torch.equal(p1, prev[b : b + 1])
        assert torch.equal(l1.isnan(), lp[b : b + 1].isnan()) and (l1.nan_to_num() == lp[b : b + 1].nan_to_num()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["sde", "cps", "dance"])
def test_item5_recorded_log_prob_belongs_to_the_rounded_stored_latent(dtype, kind):
    sigmas = flow_sigmas(10)
    a = KIND_LEVEL[kind]
    x, v, z = _inputs(dtype=dtype)
    for steps in (4, torch.tensor([1, 4, 7])):
        prev, lp, mean, _ = flow_step_with_logprob(sigmas, v, x, steps, a, noise=z, kind=kind)
        assert prev.dtype == dtype and lp.dtype == torch.float32 and mean.dtype == torch.float32
        _, again, _, _ = flow_step_with_logprob(sigmas, v, x, steps, a, prev_sample=prev, kind=kind)
        assert torch.equal(again, lp)  # bit for bit: the density was taken at the stored (rounded) value
        # The density at the unrounded value differs: that is what rounding first avoids.
        _, _, tau = flow_mean_std(sigmas, v, x, steps, a, kind)
        _, other, _, _ = flow_step_with_logprob(sigmas, v, x, steps, a, prev_sample=mean + tau * z, kind=kind)
        assert not torch.equal(other, lp)


def test_item5_rollout_records_what_recomputation_gives():
    sigmas = flow_sigmas(6)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(3)) * 0.1

    def velocity(x, i):
        return x @ w - 0.3 * sigmas[i]

    x0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    out = flow_rollout(velocity, x0, sigmas, 0.7, generator=[torch.Generator().manual_seed(s) for s in range(5)])
    assert out.latents.shape == (5, 7, 4) and out.log_probs.shape == (5, 6) and out.steps == list(range(6))
    for k in range(6):
        x = out.latents[:, k]
        _, lp, _, _ = flow_step_with_logprob(sigmas, velocity(x, k), x, k, 0.7, prev_sample=out.latents[:, k + 1])
        assert torch.equal(lp, out.log_probs[:, k])
    assert torch.equal(out.final, out.latents[:, -1])


# --------------------------------------------------------------------------------------- item 6: gradients


@pytest.mark.parametrize("kind", ["sde", "cps", "dance"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_item6_gradient_flows_through_the_mean_only(kind, reduction):
    sigmas = flow_sigmas(10, dynamic=None).double()
    i, a = 3, KIND_LEVEL[kind]
    x, v, z = (t.double() for t in _inputs())
    v = v.requires_grad_()
    x = x.requires_grad_()
    with torch.no_grad():
        prev, _, _, _ = flow_step_with_logprob(sigmas, v, x, i, a, noise=z, kind=kind)
    prev = prev.clone().requires_grad_()
    _, lp, mean, std = flow_step_with_logprob(sigmas, v, x, i, a, prev_sample=prev, kind=kind, reduction=reduction)
    mean.retain_grad()
    lp.sum().backward()
    assert prev.grad is None  # the next latent is data
    _, _, tau = flow_mean_std(sigmas, v.detach(), x.detach(), i, a, kind)
    d = 1 if reduction == "sum" else x[0].numel()
    resid = (prev - mean).detach()
    expected = 2 * resid / d if kind == "cps" else resid / (d * tau**2)
    torch.testing.assert_close(mean.grad, expected)
    if kind == "sde":
        sig, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        s = std.detach()
        torch.testing.assert_close(v.grad, expected * (1 + s**2 * (1 - sig) / (2 * sig)) * dt)
        torch.testing.assert_close(x.grad, expected * (1 + s**2 * dt / (2 * sig)))


def test_item6_first_step_sde_gradient_uses_sigma_one_substitution():
    sigmas = flow_sigmas(10).double()
    x, v, z = (t.double() for t in _inputs())
    v.requires_grad_()
    with torch.no_grad():
        prev, _, _, _ = flow_step_with_logprob(sigmas, v, x, 0, 0.7, noise=z)
    _, lp, mean, std = flow_step_with_logprob(sigmas, v, x, 0, 0.7, prev_sample=prev)
    lp.sum().backward()
    s2 = 0.49 / (1 - sigmas[1])
    dt = sigmas[1] - 1
    torch.testing.assert_close(std**2, s2.expand_as(std))
    grad_mu = (prev - mean).detach() / (x[0].numel() * 0.49)
    torch.testing.assert_close(v.grad, grad_mu * dt)  # (1 + s²(1−σ)/(2σ)) = 1 at σ = 1


# ----------------------------------------------------------------------------------- item 7: Gaussian toy

DATA_MEAN, DATA_STD = 0.7, 0.25


def _toy_velocity(x, t, s):
    k = (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2)
    return k * (x - DATA_MEAN * (1 - t)) - DATA_MEAN


def _marginal_var(t, s):
    return (1 - t) ** 2 * s**2 + t**2


def _propagate(kind, a, num_steps, s=DATA_STD, dtype=torch.float64):
    """Exact mean/variance through the affine steps; the map x ↦ A x + B and τ come from the step itself."""
    sigmas = dance_sigmas(num_steps, 3.0, dtype=dtype)
    m, var, worst = 0.0, 1.0, 0.0
    for i in range(num_steps):
        x = torch.tensor([[0.0], [1.0]], dtype=dtype)
        v = _toy_velocity(x, sigmas[i], s)
        p0, _, _, _ = flow_step_with_logprob(sigmas, v, x, i, a, noise=torch.zeros_like(x), kind=kind)
        p1, _, _, _ = flow_step_with_logprob(sigmas, v, x, i, a, noise=torch.ones_like(x), kind=kind)
        shift, slope, tau = p0[0, 0].item(), (p0[1, 0] - p0[0, 0]).item(), (p1[0, 0] - p0[0, 0]).item()
        m, var = slope * m + shift, slope**2 * var + tau**2
        t_next = sigmas[i + 1].item()
        worst = max(worst, abs(m - DATA_MEAN * (1 - t_next)), abs(var - _marginal_var(t_next, s)))
    return m - DATA_MEAN, var - s**2, worst


def test_item7_toy_flow_grpo_sde_n1000_keeps_the_marginal():
    dmean, dvar, _ = _propagate("sde", 0.7, 1000)
    assert abs(dvar) < 1e-3 and abs(dmean) < 1e-4


def test_item7_toy_flow_grpo_sde_n10_and_ode_n10():
    _, dvar, _ = _propagate("sde", 0.7, 10)
    assert dvar == pytest.approx(-1.23e-2, abs=1e-3)
    _, dvar, _ = _propagate("sde", 0.0, 10)
    assert dvar == pytest.approx(-4.27e-2, abs=1e-3)


def test_item7_toy_first_step_over_disperses_by_a4_over_4():
    sigmas = dance_sigmas(1000, dtype=torch.float64)
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    v = _toy_velocity(x, sigmas[0], DATA_STD)
    p0, _, _, _ = flow_step_with_logprob(sigmas, v, x, 0, 0.7, noise=torch.zeros_like(x))
    p1, _, _, _ = flow_step_with_logprob(sigmas, v, x, 0, 0.7, noise=torch.ones_like(x))
    var = (p0[1, 0] - p0[0, 0]).item() ** 2 + (p1[0, 0] - p0[0, 0]).item() ** 2
    assert var - _marginal_var(sigmas[1].item(), DATA_STD) == pytest.approx(0.7**4 / 4, abs=1e-3)


def test_item7_toy_dance_n1000():
    dmean, dvar, _ = _propagate("dance", 0.3, 1000)
    assert abs(dvar) < 1e-3 and abs(dmean) < 1e-4


@pytest.mark.parametrize("a", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("num_steps", [10, 200])
def test_item7_toy_cps_point_mass_is_exact_at_every_step(a, num_steps):
    _, dvar, worst = _propagate("cps", a, num_steps, s=0.0)
    assert abs(dvar) < 1e-5 and worst < 1e-5


def test_item7_toy_cps_under_disperses_with_spread_data():
    _, dvar, _ = _propagate("cps", 0.8, 10)
    assert dvar < -1e-2


@pytest.mark.parametrize("kind,a", [("sde", 0.7), ("sde", 0.0), ("dance", 0.3), ("cps", 0.8)])
def test_item7_toy_monte_carlo_matches_propagation(kind, a):
    n, num_steps = 200_000, 10
    dmean, dvar, _ = _propagate(kind, a, num_steps)
    mean, var = DATA_MEAN + dmean, DATA_STD**2 + dvar
    sigmas = dance_sigmas(num_steps)
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(n, 1, generator=gen)
    out = flow_rollout(lambda x, i: _toy_velocity(x, sigmas[i], DATA_STD), x0, sigmas, a, kind=kind, generator=gen)
    final = out.final.double().reshape(-1)
    se_mean = math.sqrt(var / n)
    se_var = var * math.sqrt(2 / (n - 1))
    assert abs(final.mean().item() - mean) < 5 * se_mean
    assert abs(final.var().item() - var) < 5 * se_var


# ---------------------------------------------------------------------------------------- item 12: windows


def test_item12_stochastic_steps():
    assert stochastic_steps(10) == [True] * 10
    assert stochastic_steps(10, (2, 3)) == [i in (2, 3, 4) for i in range(10)]
    assert stochastic_steps(10, (4, 0)) == [True] * 9 + [False]  # w = 0: all but the last, ODE last step
    assert noise_levels(4, 0.8, (1, 2)) == [0.0, 0.8, 0.8, 0.0]
    with pytest.raises(ValueError):
        stochastic_steps(10, (8, 3))


def test_item12_fast_window_start_range():
    rng = random.Random(0)
    starts = {fast_window(10, 3, (0, 5), rng) for _ in range(400)}
    assert starts == {(s, 3) for s in range(0, 3)}  # start ∈ [lo, hi − w] inclusive
    assert fast_window(10, 0, (0, 5), rng) == (0, 9)
    with pytest.raises(ValueError):
        fast_window(10, 6, (0, 5), rng)


@pytest.mark.parametrize("window", [(2, 3), (0, 0)])
def test_item12_fast_rollout_stores_window_and_is_euler_outside(window):
    sigmas = flow_sigmas(10)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(5)) * 0.1

    def velocity(x, i):
        return x @ w + 0.2 * sigmas[i]

    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    out = flow_rollout(velocity, x0, sigmas, 0.8, kind="cps", window=window, generator=torch.Generator().manual_seed(7))
    flags = stochastic_steps(10, window)
    size = sum(flags)
    assert size == (3 if window[1] else 9)
    assert out.log_probs.shape == (3, size) and out.latents.shape == (3, size + 1, 4)
    assert out.steps == [i for i, f in enumerate(flags) if f]
    # Replay: Euler steps outside the window reproduce the stored latents exactly.
    x = x0
    for i in range(10):
        if i == out.steps[0]:
            assert torch.equal(x, out.latents[:, 0])
        if flags[i]:
            x = out.latents[:, out.steps.index(i) + 1]
            continue
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, i)
    assert torch.equal(x, out.final)
    for k, i in enumerate(out.steps):
        xk = out.latents[:, k]
        _, lp, _, _ = flow_step_with_logprob(sigmas, velocity(xk, i), xk, i, 0.8, prev_sample=out.latents[:, k + 1], kind="cps")
        assert torch.equal(lp, out.log_probs[:, k])


def test_item12_mixgrpo_window_moves_and_rolls_back():
    n = 25
    assert mixgrpo_window(0, n) == [0, 1, 2, 3]
    assert mixgrpo_window(24, n) == [0, 1, 2, 3]
    assert mixgrpo_window(25, n) == [1, 2, 3, 4]
    assert mixgrpo_window(25 * 20, n) == [20, 21, 22]  # ∩ [0, N − 2)
    assert mixgrpo_window(25 * 22, n) == [22]
    assert mixgrpo_window(25 * 23, n) == [0, 1, 2, 3]  # rolled back
    starts = [mixgrpo_window(k, n)[0] for k in range(0, 25 * 23 * 2, 25)]
    assert starts == list(range(23)) * 2
