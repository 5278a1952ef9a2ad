"""The DDIM log-prob sampler: every item of docs/algorithms/ddpo.md §8 (1–5) plus pipeline agreement."""

from __future__ import annotations

import math

import pytest
import torch

from genreward.errors import GenrewardError
from genreward.models.families import family_of
from genreward.sampling import (
    ddim_mean_std,
    ddim_step_with_logprob,
    gaussian_log_prob,
    sample_trajectories,
    step_log_prob,
)

PROMPTS = ["a cat", "a dog on a skateboard", "two red circles", "an owl"]


def _step_inputs(pipe, num_steps=10, step=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pipe.scheduler.set_timesteps(num_steps)
    t = pipe.scheduler.timesteps[step]
    sample = torch.randn(2, 4, 16, 16, generator=g)
    model_output = torch.randn(2, 4, 16, 16, generator=g)
    z = torch.randn(2, 4, 16, 16, generator=g)
    return t, sample, model_output, z


@pytest.mark.parametrize("step", [0, 4, 9])
def test_closed_form_log_prob_in_sampling_mode(tiny_pipe, step):
    """§8.1: log_prob = mean(−z²/2) − log σ − ½ log 2π and x' = μ + σ z."""
    t, sample, model_output, z = _step_inputs(tiny_pipe, step=step)
    prev, log_prob = ddim_step_with_logprob(tiny_pipe.scheduler, model_output, t, sample, eta=1.0, variance_noise=z)
    mean, std, _ = ddim_mean_std(tiny_pipe.scheduler, model_output, t, sample, 1.0)
    expected = (-(z**2) / 2).mean(dim=(1, 2, 3)) - torch.log(std.reshape(-1)) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(log_prob, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(prev, mean + std * z, atol=1e-6, rtol=0)


@pytest.mark.parametrize("step", [0, 5, 9])
@pytest.mark.parametrize("pipe_name", ["tiny_pipe", "tiny_pipe_v"])
def test_step_agrees_with_diffusers_ddim(request, pipe_name, step):
    """§8.2: same x_{t'} as DDIMScheduler.step(eta=1, variance_noise=z) (ε- and v-prediction)."""
    pipe = request.getfixturevalue(pipe_name)
    t, sample, model_output, z = _step_inputs(pipe, step=step)
    ours, _ = ddim_step_with_logprob(pipe.scheduler, model_output, t, sample, eta=1.0, variance_noise=z)
    theirs = pipe.scheduler.step(model_output, t, sample, eta=1.0, variance_noise=z).prev_sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_sum_reduction_is_mean_times_elements(tiny_pipe):
    t, sample, model_output, z = _step_inputs(tiny_pipe)
    _, lp_mean = ddim_step_with_logprob(tiny_pipe.scheduler, model_output, t, sample, variance_noise=z)
    _, lp_sum = ddim_step_with_logprob(tiny_pipe.scheduler, model_output, t, sample, variance_noise=z, reduction="sum")
    torch.testing.assert_close(lp_sum, lp_mean * sample[0].numel(), rtol=1e-5, atol=1e-3)


def test_recomputed_log_probs_equal_recorded(tiny_pipe):
    """§8.3: re-evaluating stored transitions with the same U-Net and CFG gives ratio 1 (< 1e-6)."""
    traj = sample_trajectories(tiny_pipe, PROMPTS, num_steps=8, guidance_scale=5.0, eta=1.0, seeds=[0, 1, 2, 3])
    assert traj.log_probs.shape == (4, 8)
    with torch.no_grad():
        recomputed = torch.stack([step_log_prob(tiny_pipe.unet, family_of(tiny_pipe), traj, k) for k in range(8)], dim=1)
    assert (recomputed - traj.log_probs).abs().max().item() < 1e-6
    ratio = torch.exp(recomputed - traj.log_probs)
    assert ((ratio - 1).abs() > 1e-4).float().mean().item() == 0.0  # clipfrac = 0 before the first update


def test_log_prob_gradient_flows_only_through_mean():
    """§8.4: ∂ log p / ∂μ = (x' − μ)/(σ² D) element-wise; the next sample receives no gradient."""
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64).requires_grad_()
    x_next = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64).requires_grad_()
    std = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64).reshape(3, 1, 1, 1)
    log_prob = gaussian_log_prob(x_next, mean, std)
    log_prob.sum().backward()
    d = mean[0].numel()
    torch.testing.assert_close(mean.grad, (x_next.detach() - mean.detach()) / (std**2 * d))
    assert x_next.grad is None


def test_eta_zero_is_rejected_for_log_probs(tiny_pipe):
    """§8.5: η = 0 raises a clear error, never a silent NaN/Inf."""
    t, sample, model_output, _ = _step_inputs(tiny_pipe)
    with pytest.raises(GenrewardError, match="eta > 0"):
        ddim_step_with_logprob(tiny_pipe.scheduler, model_output, t, sample, eta=0.0)


def test_eta_zero_images_equal_diffusers_pipeline(tiny_pipe):
    """With η = 0 and the same x_T, the sampler's images equal StableDiffusionPipeline's to 1e-5."""
    x_t = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    traj = sample_trajectories(tiny_pipe, PROMPTS, num_steps=12, guidance_scale=5.0, eta=0.0, latents=x_t)
    assert traj.log_probs is None
    expected = tiny_pipe(PROMPTS, num_inference_steps=12, guidance_scale=5.0, eta=0.0, latents=x_t, output_type="pt").images
    assert (traj.images - expected).abs().max().item() < 1e-5


def test_eta_zero_images_equal_pipeline_with_negative_prompt(tiny_pipe_v):
    x_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    prompts = PROMPTS[:2]
    traj = sample_trajectories(tiny_pipe_v, prompts, num_steps=6, guidance_scale=7.5, eta=0.0, latents=x_t, negative_prompt="blurry")
    expected = tiny_pipe_v(
        prompts, num_inference_steps=6, guidance_scale=7.5, eta=0.0, latents=x_t, negative_prompt=["blurry"] * 2, output_type="pt"
    ).images
    assert (traj.images - expected).abs().max().item() < 1e-5


def test_trajectory_shapes_and_ranges(tiny_pipe):
    traj = sample_trajectories(tiny_pipe, PROMPTS[:3], num_steps=5, seeds=[5, 6, 7])
    assert traj.latents.shape == (3, 6, 4, 16, 16)
    assert traj.timesteps.tolist() == tiny_pipe.scheduler.timesteps.tolist()
    assert traj.images.shape == (3, 3, 32, 32)
    assert 0.0 <= traj.images.min().item() and traj.images.max().item() <= 1.0
    assert traj.prompt_embeds.shape[0] == 3 and traj.uncond["encoder_hidden_states"].shape == traj.prompt_embeds.shape
    assert torch.isfinite(traj.log_probs).all()


def test_per_sample_seeds_do_not_depend_on_batching(tiny_pipe):
    """A sample's trajectory depends on its seed only, not on batch size or position.

    (Up to float round-off: batched matmuls sum in a different order, ~1e-5.)
    """
    a = sample_trajectories(tiny_pipe, PROMPTS, num_steps=4, seeds=[10, 11, 12, 13], batch_size=4)
    b = sample_trajectories(tiny_pipe, PROMPTS, num_steps=4, seeds=[10, 11, 12, 13], batch_size=1)
    torch.testing.assert_close(a.latents, b.latents, atol=2e-4, rtol=0)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=2e-4, rtol=0)
    c = sample_trajectories(tiny_pipe, PROMPTS[2:], num_steps=4, seeds=[12, 13])
    torch.testing.assert_close(a.latents[2:], c.latents, atol=2e-4, rtol=0)
    other = sample_trajectories(tiny_pipe, PROMPTS[2:], num_steps=4, seeds=[99, 98])
    assert (other.latents[:, 0] - c.latents[:, 0]).abs().max() > 0.1


def test_trajectory_select_and_cat_roundtrip(tiny_pipe):
    traj = sample_trajectories(tiny_pipe, PROMPTS, num_steps=3, seeds=[0, 1, 2, 3])
    parts = [traj.select([0, 1]), traj.select(slice(2, 4))]
    back = type(traj).cat(parts)
    assert back.prompts == traj.prompts and back.seeds == traj.seeds
    torch.testing.assert_close(back.latents, traj.latents)


def test_scheduler_with_clip_sample_is_rejected(tiny_pipe):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config({**tiny_pipe.scheduler.config, "clip_sample": True})
    sched.set_timesteps(10)
    with pytest.raises(GenrewardError, match="clip_sample"):
        ddim_mean_std(sched, torch.zeros(1, 4, 2, 2), sched.timesteps[0], torch.zeros(1, 4, 2, 2), 1.0)


def test_per_sample_steps_equal_single_step_evaluation(tiny_pipe):
    """DDPO evaluates each sample at its own (shuffled) step: same values as one step at a time."""
    traj = sample_trajectories(tiny_pipe, PROMPTS, num_steps=6, seeds=[0, 1, 2, 3])
    steps = torch.tensor([5, 0, 3, 3])
    with torch.no_grad():
        mixed = step_log_prob(tiny_pipe.unet, family_of(tiny_pipe), traj, steps)
    torch.testing.assert_close(mixed, traj.log_probs[torch.arange(4), steps], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- mixed precision log-probs


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def low_precision_pipe(request):
    """The tiny SD pipeline in fp16/bf16 on CPU (both run there with torch ≥ 2.1)."""
    from genreward.models import load_pipeline

    return request.param, load_pipeline("tiny:sd", device="cpu", dtype=request.param)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("step", [0, 9])
def test_recorded_log_prob_belongs_to_the_rounded_sample(tiny_pipe, dtype, step):
    """The sampling-mode log-prob is the density *at the stored (rounded) x_{t'}*: re-evaluating that
    latent with ``prev_sample=`` gives the recorded value exactly, and the latent has the input's dtype.

    (Before the fix the density was taken at the fp32 value; on these inputs |Δ log p| was up to 1.4e-5 / 1.7e-4
    in fp16 and 1.3e-4 / 5.1e-3 in bf16 at the first / last of 10 steps.)
    """
    t, sample, model_output, z = _step_inputs(tiny_pipe, step=step)
    sample, model_output = sample.to(dtype), model_output.to(dtype)
    stored, recorded = ddim_step_with_logprob(tiny_pipe.scheduler, model_output, t, sample, eta=1.0, variance_noise=z)
    assert stored.dtype == dtype and recorded.dtype == torch.float32
    _, again = ddim_step_with_logprob(tiny_pipe.scheduler, model_output, t, sample, eta=1.0, prev_sample=stored)
    assert torch.equal(again, recorded)
    mean, std, _ = ddim_mean_std(tiny_pipe.scheduler, model_output, t, sample, 1.0)
    torch.testing.assert_close(recorded, gaussian_log_prob(stored.float(), mean, std), atol=0, rtol=0)


def _recompute_all_steps(pipe, traj):
    with torch.no_grad():
        return torch.stack([step_log_prob(pipe.unet, family_of(pipe), traj, k) for k in range(traj.num_steps)], dim=1)


def test_fp32_recomputed_importance_ratio_is_exactly_one(tiny_pipe):
    """fp32 on CPU, same batch and U-Net: measured max |Δ log p| = 0 (ratio exactly 1), before and after the fix."""
    traj = sample_trajectories(tiny_pipe, PROMPTS, num_steps=6, guidance_scale=5.0, eta=1.0, seeds=[0, 1, 2, 3])
    delta = _recompute_all_steps(tiny_pipe, traj) - traj.log_probs
    assert delta.abs().max().item() == 0.0
    assert torch.exp(delta).eq(1.0).all()


@pytest.mark.slow
def test_low_precision_recomputed_importance_ratio_is_exactly_one(low_precision_pipe):
    """fp16 and bf16 on CPU: the stored latents are in the model dtype and the recorded log-probs are the
    densities at those stored values, so recomputing gives |Δ log p| = 0 (measured: 0 for both, any step count).

    Before the fix (density at the fp32 sample, then rounded) the tiny pipeline measured, for 6–50 steps,
    fp16: |Δ log p| ≤ 3.1e-2 (ratio ∈ [0.969, 1.0014]), bf16: |Δ log p| ≤ 4.5e-1 (ratio ∈ [0.634, 1.0018]),
    i.e. most ratios outside DDPO's clip range 1 ± 1e-4 before the first update.
    """
    name, pipe = low_precision_pipe
    traj = sample_trajectories(pipe, PROMPTS, num_steps=6, guidance_scale=5.0, eta=1.0, seeds=[0, 1, 2, 3])
    assert traj.latents.dtype == pipe.unet.dtype and traj.log_probs.dtype == torch.float32
    delta = _recompute_all_steps(pipe, traj) - traj.log_probs
    assert delta.abs().max().item() == 0.0, f"{name}: max |Δ log p| = {delta.abs().max().item():.3e}"


# ----------------------------------------------------------------------------------- eval mode (dropout)


def _lora_unet_with_dropout(seed: int = 0):
    """A fresh tiny pipeline whose U-Net has a LoRA adapter (dropout 0.5, non-zero B) in train mode."""
    from peft import LoraConfig

    from genreward.models import load_pipeline

    pipe = load_pipeline("tiny:sd", device="cpu", dtype="fp32")
    pipe.unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, lora_dropout=0.5, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:  # peft initialises B = 0, which would make dropout invisible
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    pipe.unet.train()
    return pipe


def test_sampling_uses_eval_mode_so_dropout_does_not_change_samples():
    """With LoRA dropout 0.5 and a U-Net left in train mode, the same seeds give the same trajectory, and
    the U-Net's (per-module) train/eval flags are restored afterwards."""
    pipe = _lora_unet_with_dropout()
    dropouts = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert dropouts, "the LoRA adapter should add dropout modules"
    dropouts[0].eval()  # a mixed-mode model must come back mixed, not all-train
    before = {name: m.training for name, m in pipe.unet.named_modules()}
    a = sample_trajectories(pipe, PROMPTS[:2], num_steps=4, seeds=[0, 1])
    b = sample_trajectories(pipe, PROMPTS[:2], num_steps=4, seeds=[0, 1])
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert {name: m.training for name, m in pipe.unet.named_modules()} == before
    pipe.unet.eval()
    with torch.no_grad():
        recomputed = torch.stack([step_log_prob(pipe.unet, family_of(pipe), a, k) for k in range(4)], dim=1)
    assert (recomputed - a.log_probs).abs().max().item() == 0.0
