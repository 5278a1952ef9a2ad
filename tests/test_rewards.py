"""Rewards: protocol, CLIPScore (both CLIP backends), JPEG (in)compressibility, composition, errors.

Everything runs offline on tiny random-weight CLIPs; no test may contact a model hub.
"""

from __future__ import annotations

import io
import json
import time

import pytest
import torch

from genreward.errors import GenrewardError, OfflineModelError
from genreward.images import to_pil
from genreward.models.clip import ClipModel, load_clip
from genreward.rewards import Reward, RewardOutput, build

TINY = ["tiny:clip", "tiny:open_clip"]
PROMPTS = ["a photo of a cat", "a red car on a road", "an oil painting of mountains"]


@pytest.fixture(scope="module")
def clip_rewards() -> dict:
    """One reward per tiny backend, shared by the tests that only read scores."""
    return {spec: build("clip_score", model=spec, device="cpu") for spec in TINY}


def _images(b: int = 3, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


# ------------------------------------------------------------------------------------------ protocol


@pytest.mark.parametrize(
    "name,options,differentiable",
    [
        ("clip_score", {"model": "tiny:clip"}, True),
        ("clip_score", {"model": "tiny:open_clip"}, True),
        ("jpeg_compressibility", {}, False),
        ("jpeg_incompressibility", {}, False),
    ],
)
def test_reward_protocol(name: str, options: dict, differentiable: bool) -> None:
    reward = build(name, **options)
    assert isinstance(reward, Reward)
    assert reward.name == name
    assert reward.differentiable is differentiable
    out = reward(_images(), PROMPTS)
    assert isinstance(out, RewardOutput)
    assert out.scores.shape == (3,)
    assert out.scores.dtype == torch.float32
    assert torch.isfinite(out.scores).all()


# ---------------------------------------------------------------------------------------- clip_score


@pytest.mark.parametrize("spec", TINY)
def test_clip_score_is_a_cosine(clip_rewards: dict, spec: str) -> None:
    reward = clip_rewards[spec]
    out = reward(_images(b=4), PROMPTS + ["x"])
    assert out.scores.shape == (4,)
    assert ((out.scores >= -1.0) & (out.scores <= 1.0)).all()
    assert torch.equal(out.details["cosine"], out.scores)
    assert not out.scores.requires_grad  # images did not require grad: no graph is built
    # Independent recomputation from the raw (unnormalised) embeddings.
    clip: ClipModel = reward.clip
    with torch.no_grad():
        img = clip.encode_image(clip.preprocess(_images(b=4)))
        txt = clip.encode_text(PROMPTS + ["x"])
    expected = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(out.scores, expected, rtol=1e-5, atol=1e-6)


def test_clip_score_scale_option() -> None:
    plain = build("clip_score", model="tiny:clip")(_images(), PROMPTS).scores
    scaled = build("clip_score", model="tiny:clip", scale=2.5)(_images(), PROMPTS)
    torch.testing.assert_close(scaled.scores, 2.5 * plain)
    torch.testing.assert_close(scaled.details["cosine"], plain)


@pytest.mark.parametrize("spec", TINY)
def test_clip_score_gradient_reaches_pixels_not_clip(clip_rewards: dict, spec: str) -> None:
    reward = clip_rewards[spec]
    images = _images().requires_grad_()
    scores = reward(images, PROMPTS).scores
    assert scores.requires_grad
    scores.sum().backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    params = list(reward.clip.parameters())
    assert params and all(not p.requires_grad and p.grad is None for p in params)
    assert not reward.clip.training


def test_clip_score_respects_no_grad(clip_rewards: dict) -> None:
    images = _images().requires_grad_()
    with torch.no_grad():
        scores = clip_rewards["tiny:clip"](images, PROMPTS).scores
    assert not scores.requires_grad


def test_tiny_clip_is_reproducible_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    first = build("clip_score", model="tiny:clip")(_images(), PROMPTS).scores
    second = build("clip_score", model="tiny:clip")(_images(), PROMPTS).scores
    assert torch.equal(first, second)
    assert torch.equal(state, torch.get_rng_state())


def test_prompt_count_must_match_batch(clip_rewards: dict) -> None:
    with pytest.raises(GenrewardError, match="one prompt per image") as info:
        clip_rewards["tiny:clip"](_images(b=3), PROMPTS[:2])
    assert "\n" not in str(info.value)


def test_text_cache_returns_the_same_embeddings(clip_rewards: dict) -> None:
    reward = clip_rewards["tiny:open_clip"]
    prompts = ["a dog", "a cat", "a dog"]
    cached = reward.text_embeddings(prompts)
    with torch.no_grad():
        fresh = reward.clip.embed_texts(prompts)
    torch.testing.assert_close(cached, fresh)
    torch.testing.assert_close(cached[0], cached[2])


# ------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("spec", TINY)
def test_preprocess_at_model_size_is_only_normalisation(clip_rewards: dict, spec: str) -> None:
    clip: ClipModel = clip_rewards[spec].clip
    s = clip.image_size
    images = _images(h=s, w=s)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.equal(clip.preprocess(images), (images - mean) / std)


def test_preprocess_matches_torchvision_resize_crop_normalise(clip_rewards: dict) -> None:
    from torchvision.transforms import v2

    clip: ClipModel = clip_rewards["tiny:clip"].clip
    reference = v2.Compose(
        [
            v2.Resize(clip.image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(clip.image_size),
            v2.Normalize(mean=list(clip.mean), std=list(clip.std)),
        ]
    )
    for h, w in [(40, 56), (77, 45), (64, 64), (20, 30)]:
        images = _images(h=h, w=w)
        ours = clip.preprocess(images)
        assert ours.shape == (3, 3, clip.image_size, clip.image_size)
        torch.testing.assert_close(ours, reference(images), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- jpeg


def test_jpeg_sizes_and_signs() -> None:
    images = _images(b=2, h=64, w=64)
    comp = build("jpeg_compressibility")(images, ["", ""])
    incomp = build("jpeg_incompressibility")(images, ["", ""])
    assert (comp.details["jpeg_kb"] > 0).all()
    assert torch.equal(comp.scores, -incomp.scores)
    assert torch.equal(incomp.scores, incomp.details["jpeg_kb"])
    buffer = io.BytesIO()  # kB is bytes / 1000 of a quality-95 JPEG
    to_pil(images[:1])[0].save(buffer, format="JPEG", quality=95)
    assert incomp.scores[0].item() == pytest.approx(len(buffer.getvalue()) / 1000.0)


def test_flat_grey_is_more_compressible_than_noise() -> None:
    grey = torch.full((1, 3, 64, 64), 0.5)
    images = torch.cat([grey, _images(b=1, h=64, w=64)])
    scores = build("jpeg_compressibility")(images, ["", ""]).scores
    assert scores[0] > scores[1]
    assert build("jpeg_incompressibility")(images, ["", ""]).scores[1] > 0


def test_jpeg_quality_option_is_checked() -> None:
    with pytest.raises(GenrewardError, match="quality"):
        build("jpeg_compressibility", quality=0)


# ---------------------------------------------------------------------------------------- composition


def test_weighted_sum_of_jpeg_and_clip() -> None:
    images, prompts = _images(), PROMPTS
    total = build(
        "weighted_sum",
        components=[
            {"name": "jpeg_compressibility", "weight": 2.0},
            {"name": "clip_score", "options": {"model": "tiny:clip"}, "weight": 0.5},
        ],
    )
    assert total.differentiable is False  # one component goes through PIL
    out = total(images, prompts)
    jpeg = build("jpeg_compressibility")(images, prompts).scores
    clip = build("clip_score", model="tiny:clip")(images, prompts).scores
    torch.testing.assert_close(out.scores, 2.0 * jpeg + 0.5 * clip)
    torch.testing.assert_close(out.details["jpeg_compressibility"], jpeg)
    torch.testing.assert_close(out.details["clip_score"], clip)
    assert "jpeg_compressibility/jpeg_kb" in out.details
    assert "clip_score/cosine" in out.details


# --------------------------------------------------------------------------------------------- errors


def test_unknown_reward_and_option_are_one_line_errors() -> None:
    with pytest.raises(GenrewardError, match="unknown reward 'nope'") as info:
        build("nope")
    assert "\n" not in str(info.value) and "clip_score" in str(info.value)
    with pytest.raises(GenrewardError, match="no option") as info:
        build("clip_score", model="tiny:clip", temperature=3)
    assert "\n" not in str(info.value) and "temperature" in str(info.value)


def test_bad_clip_specs_are_one_line_errors() -> None:
    for spec, kwargs, match in [
        ("tiny:nope", {}, "unknown tiny CLIP"),
        ("tiny:clip", {"backend": "open_clip"}, "needs backend"),
        ("tiny:clip", {"backend": "jax"}, "unknown CLIP backend"),
        ("tiny:clip", {"dtype": "fp8"}, "unknown dtype"),
        ("open_clip:NotAnArch/x", {}, "unknown open_clip architecture"),
        ("open_clip:ViT-B-32/not_a_tag", {}, "neither a pretrained tag"),
        ("./no/such/folder", {}, "folder not found"),
    ]:
        with pytest.raises(GenrewardError, match=match) as info:
            load_clip(spec, **kwargs)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "spec,backend",
    [
        ("openai/clip-vit-large-patch14", "auto"),
        ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip"),
        ("open_clip:ViT-H-14/laion2b_s32b_b79k", "auto"),
        ("open_clip:hf-hub:laion/CLIP-ViT-g-14-laion2B-s12B-b42K", "auto"),
    ],
)
def test_hub_model_offline_is_a_fast_one_line_error(monkeypatch, tmp_path, spec: str, backend: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache, whatever this machine holds
    start = time.perf_counter()
    with pytest.raises(OfflineModelError) as info:
        build("clip_score", model=spec, backend=backend)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message
    assert spec in message and "local" in message


# ---------------------------------------------------------------------------------- local checkpoints


def test_transformers_folder_roundtrip(tmp_path, clip_rewards: dict) -> None:
    tiny: ClipModel = clip_rewards["tiny:clip"].clip
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_clip(str(tmp_path), device="cpu")
    assert loaded.backend == "transformers" and loaded.image_size == tiny.image_size
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_images(images), tiny.embed_images(images))
        torch.testing.assert_close(loaded.embed_texts(PROMPTS), tiny.embed_texts(PROMPTS))


def test_transformers_folder_without_tokenizer_files_gets_clips_bpe(tmp_path, clip_rewards: dict) -> None:
    """No tokenizer files in the folder: CLIP's offline BPE (49,408 entries), cut to the text tower's positions."""
    tiny: ClipModel = clip_rewards["tiny:clip"].clip
    tiny.model.save_pretrained(tmp_path)
    loaded = load_clip(str(tmp_path), device="cpu")
    assert len(loaded.tokenizer) == 49408
    assert loaded.tokenizer("a red circle")["input_ids"] == tiny.tokenizer("a red circle")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_texts(PROMPTS), tiny.embed_texts(PROMPTS))


def test_open_clip_local_dir_roundtrip(tmp_path, clip_rewards: dict) -> None:
    from safetensors.torch import save_file

    tiny: ClipModel = clip_rewards["tiny:open_clip"].clip
    config = {
        "model_cfg": {
            "embed_dim": 32,
            "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        },
        "preprocess_cfg": {"mean": list(tiny.mean), "std": list(tiny.std)},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    loaded = load_clip(str(tmp_path), device="cpu")
    assert loaded.backend == "open_clip" and loaded.image_size == 32
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_images(images), tiny.embed_images(images))
        torch.testing.assert_close(loaded.embed_texts(PROMPTS), tiny.embed_texts(PROMPTS))
