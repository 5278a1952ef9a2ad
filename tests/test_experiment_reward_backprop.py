"""experiments/world_reward_backprop.py: its differentiable sampler matches the library's, gradients reach the LoRA, and it runs."""

from __future__ import annotations

import pytest
import torch


def test_sampler_draws_the_library_sampler_images_and_backprops(tiny_pipe, load_experiment):
    from genreward.sampling import sample_trajectories

    script = load_experiment("world_reward_backprop")
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    with torch.no_grad():
        ref = sample_trajectories(tiny_pipe, prompts, num_steps=script.STEPS, guidance_scale=script.GUIDANCE, eta=script.ETA, seeds=seeds)
    latent = torch.zeros(1, requires_grad=True)  # a stand-in parameter: scales the U-Net output at every step
    unet_forward = tiny_pipe.unet.forward

    def scaled(*args, **kwargs):
        out = unet_forward(*args, **kwargs)
        out.sample = out.sample * (1 + latent)
        return out

    tiny_pipe.unet.forward = scaled
    try:
        images = script.sample_with_grad(tiny_pipe, prompts, seeds, backprop_steps=1)
    finally:
        tiny_pipe.unet.forward = unet_forward
    torch.testing.assert_close(images.detach(), ref.images, atol=1e-5, rtol=0)
    images.mean().backward()
    assert latent.grad is not None and latent.grad.abs().item() > 0


@pytest.mark.slow
def test_runs_end_to_end(capsys, load_experiment):
    script = load_experiment("world_reward_backprop")
    assert script.main(["--max-steps", "2", "--eval-images", "1", "--prompts-per-step", "2", "--images-per-prompt", "2"]) == 0
    out = capsys.readouterr().out
    assert "before: held-out verifier pass" in out and "(12 captions × 1)" in out
    assert "after 2 updates" in out and "hacking gap" in out
