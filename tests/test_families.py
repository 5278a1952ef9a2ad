"""Model families (sd, sdxl, sd3, flux) behind one sampler: deterministic samples equal each diffusers pipeline's own
output, recorded log-probs equal recomputed ones, LoRA weights reload in plain diffusers, and bad combinations stop
with one line. Tiny random-weight pipelines, fp32, CPU, offline."""

from __future__ import annotations

import pytest
import torch

from genreward.errors import GenrewardError
from genreward.models.families import FAMILIES, Conditioning, detect_family, family_of
from genreward.models.pipeline import load_pipeline
from genreward.sampling import make_generators, sample_trajectories, step_log_prob
from trainers.passes import recompute_log_probs

SPECS = {"sd": "tiny:sd", "sdxl": "tiny:sdxl", "sd3": "tiny:sd3", "flux": "tiny:flux"}
GUIDANCE = {"sd": 4.0, "sdxl": 4.0, "sd3": 4.5, "flux": 3.5}
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def pipes():
    return {name: load_pipeline(spec, device="cpu") for name, spec in SPECS.items()}


@pytest.mark.parametrize("name", list(SPECS))
def test_family_is_detected_from_the_pipeline_class(pipes, name):
    assert detect_family(pipes[name]) == name
    fam = family_of(pipes[name])
    assert fam.kernel == ("ddim" if name in ("sd", "sdxl") else "flow")
    assert fam.denoiser is getattr(pipes[name], "unet" if name in ("sd", "sdxl") else "transformer")


@pytest.mark.parametrize("name", list(SPECS))
def test_deterministic_samples_equal_the_diffusers_pipeline(pipes, name):
    """η = 0 (DDIM) or a = 0 (flow: exact Euler) from the same x_T gives the pipeline's own images (≤ 1e-5)."""
    pipe, fam = pipes[name], family_of(pipes[name])
    h, w = fam.default_size()
    x_T = fam.initial_latents(len(PROMPTS), h, w, make_generators([3, 4]), torch.float32)
    ours = sample_trajectories(pipe, PROMPTS, num_steps=4, guidance_scale=GUIDANCE[name], eta=0.0, noise_level=0.0,
                               latents=x_T)
    kwargs = dict(num_inference_steps=4, guidance_scale=GUIDANCE[name], latents=x_T.clone(), output_type="pt")
    if name in ("sd", "sdxl"):
        kwargs.update(eta=0.0, negative_prompt=[""] * len(PROMPTS))
    elif name == "sd3":
        kwargs.update(negative_prompt=[""] * len(PROMPTS), max_sequence_length=32)
    else:
        kwargs.update(height=h, width=w, max_sequence_length=32)
    theirs = pipe(PROMPTS, **kwargs).images
    assert ours.log_probs is None
    assert ours.images.shape == theirs.shape == (2, 3, h, w)
    assert (ours.images - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(SPECS))
def test_recomputed_log_probs_equal_recorded(pipes, name):
    pipe, fam = pipes[name], family_of(pipes[name])
    traj = sample_trajectories(pipe, PROMPTS, num_steps=4, guidance_scale=GUIDANCE[name], seeds=[0, 1])
    assert traj.log_probs is not None and torch.isfinite(traj.log_probs).all()
    assert torch.equal(recompute_log_probs(fam.denoiser, fam, traj, chunk_size=2), traj.log_probs)  # same batch: bitwise
    chunked = recompute_log_probs(fam.denoiser, fam, traj, chunk_size=1)  # other batch shapes: float rounding only
    assert (chunked - traj.log_probs).abs().max().item() < 1e-5
    mixed = step_log_prob(fam.denoiser, fam, traj, torch.tensor([3, 1]))  # one step per sample (DDPO's shuffle)
    assert torch.equal(mixed, torch.stack([traj.log_probs[0, 3], traj.log_probs[1, 1]]))


@pytest.mark.parametrize("kind", ["sde", "cps", "dance"])
def test_flow_window_records_densities_only_inside_it(pipes, kind):
    pipe, fam = pipes["sd3"], family_of(pipes["sd3"])
    traj = sample_trajectories(pipe, PROMPTS, num_steps=6, guidance_scale=4.5, seeds=[0, 1], noise_level=0.8,
                               flow_kind=kind, sde_window=(1, 3))
    assert traj.stochastic == [False, True, True, True, False, False]
    assert torch.isnan(traj.log_probs[:, [0, 4, 5]]).all() and torch.isfinite(traj.log_probs[:, 1:4]).all()
    again = recompute_log_probs(fam.denoiser, fam, traj, chunk_size=2)
    assert torch.equal(again[:, 1:4], traj.log_probs[:, 1:4])


def test_same_seed_same_sample_whatever_the_batch(pipes):
    pipe = pipes["flux"]
    both = sample_trajectories(pipe, PROMPTS, num_steps=3, guidance_scale=3.5, seeds=[5, 6])
    alone = sample_trajectories(pipe, PROMPTS[1:], num_steps=3, guidance_scale=3.5, seeds=[6])
    assert torch.allclose(both.latents[1:], alone.latents, atol=1e-6)


@pytest.mark.parametrize("name", list(SPECS))
def test_lora_reloads_in_plain_diffusers_and_reproduces_the_finetuned_samples(pipes, name, tmp_path):
    from diffusers import DiffusionPipeline  # noqa: F401  (the reload below is diffusers' own load_lora_weights)
    from peft import LoraConfig

    from trainers.common import save_unet_weights

    fam = family_of(pipes[name])
    policy = load_pipeline(SPECS[name], device="cpu")
    denoiser = family_of(policy).denoiser
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(fam.lora_targets)))
    with torch.no_grad():
        for n, p in denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    save_unet_weights(denoiser, tmp_path, "lora", family_of(policy))
    fresh = load_pipeline(SPECS[name], device="cpu")
    fresh.load_lora_weights(str(tmp_path))  # plain diffusers, the family's pipeline class
    args = dict(num_steps=3, guidance_scale=GUIDANCE[name], eta=0.0, noise_level=0.0, seeds=[0, 1])
    tuned = sample_trajectories(policy, PROMPTS, **args).images
    reloaded = sample_trajectories(fresh, PROMPTS, **args).images
    base = sample_trajectories(pipes[name], PROMPTS, **args).images
    assert (tuned - reloaded).abs().max().item() <= 1e-5
    assert (tuned - base).abs().max().item() > 1e-3  # the LoRA changed the model, and the reload carries the change


def test_lora_of_another_family_is_one_line(pipes, tmp_path):
    from peft import LoraConfig

    from trainers.common import load_unet_weights, save_unet_weights

    sd = load_pipeline("tiny:sd", device="cpu")
    sd.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    save_unet_weights(sd.unet, tmp_path, "lora", family_of(sd))
    sd3 = load_pipeline("tiny:sd3", device="cpu")
    sd3.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(family_of(sd3).lora_targets)))
    with pytest.raises(GenrewardError, match="not for a sd3 transformer.*another model family"):
        load_unet_weights(sd3.transformer, tmp_path, "lora", family_of(sd3))


def test_flux_negative_prompt_is_one_line(pipes):
    with pytest.raises(GenrewardError, match="negative_prompt is set but family 'flux' has no negative prompts"):
        sample_trajectories(pipes["flux"], PROMPTS, num_steps=2, negative_prompt="blurry")


def test_unknown_family_and_unknown_pipeline_class_are_one_line(pipes):
    with pytest.raises(GenrewardError, match="unknown model family 'sd4'.*known: sd, sdxl, sd3, flux"):
        family_of(pipes["sd"], "sd4")

    class ImageToVideoPipeline:  # a class no family knows
        pass

    with pytest.raises(GenrewardError, match="no model family knows pipeline class ImageToVideoPipeline"):
        detect_family(ImageToVideoPipeline())


@pytest.mark.parametrize("name,bad,good", [("sd3", 30, "28 or 32"), ("flux", 30, "28 or 32")])  # tiny: VAE ×2, patches 2
def test_sizes_that_do_not_fit_the_patches_are_one_line(pipes, name, bad, good):
    with pytest.raises(GenrewardError, match=f"height={bad} does not suit this {name} model.*use {good}"):
        sample_trajectories(pipes[name], PROMPTS, num_steps=2, height=bad, width=32)


def test_conditioning_select_and_cat_keep_shared_tensors():
    cond = Conditioning({"a": torch.arange(6).view(3, 2)}, {"ids": torch.zeros(4, 3)})
    part = cond.select([2, 0])
    assert torch.equal(part["a"], torch.tensor([[4, 5], [0, 1]])) and part["ids"].shape == (4, 3)
    assert len(Conditioning.cat([part, cond])) == 5


def test_every_family_names_its_lora_targets_and_kernel():
    assert set(FAMILIES) == {"sd", "sdxl", "sd3", "flux"}
    for fam in FAMILIES.values():
        assert fam.lora_targets and fam.kernel in ("ddim", "flow") and fam.pipeline_classes


@pytest.mark.slow
def test_full_size_random_architectures_have_the_real_models_sizes():
    """random:sdxl / random:sd35m / random:flux-dev build the real architectures (on the meta device here: no memory)."""
    from genreward.models.tiny import build_random_family

    sizes = {}
    for spec in ("random:sdxl", "random:sd35m", "random:flux-dev"):
        with torch.device("meta"):
            pipe = build_random_family(spec)
        sizes[spec] = sum(p.numel() for p in family_of(pipe).denoiser.parameters())
    assert sizes["random:sdxl"] == 2_567_463_684  # SDXL base 1.0 U-Net
    assert sizes["random:flux-dev"] == 11_901_408_320  # FLUX.1-dev transformer
    assert 2.2e9 < sizes["random:sd35m"] < 2.6e9  # SD3.5 Medium MM-DiT-X
