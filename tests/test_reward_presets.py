"""Preference rewards (HPSv2, PickScore, LAION aesthetic) on tiny stand-ins, and their offline failures.

The stand-ins are the tiny random CLIPs of :mod:`genreward.models.clip` plus checkpoint/head files written
to tmp_path in the published formats, so the real file-loading code runs; no test contacts a hub.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from genreward.errors import GenrewardError, OfflineModelError
from genreward.models.clip import ClipModel, load_clip
from genreward.rewards import Reward, RewardOutput, build
from genreward.rewards.preference import AestheticHead

PROMPTS = ["a photo of a cat", "a red car on a road", "an oil painting of mountains"]
TINY_DIM = 32  # embedding width of tiny:clip / tiny:open_clip


def _images(b: int = 3, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def _save_head(path: Path, dim: int = TINY_DIM, seed: int = 7) -> Path:
    """A random improved-aesthetic-predictor MLP whose output sits near 5.5, saved as a plain state dict."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticHead(dim)
    state = head.state_dict()
    state["layers.7.bias"] = torch.tensor([5.5])
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def head_file(tmp_path_factory) -> Path:
    return _save_head(tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth")


@pytest.fixture(scope="module")
def presets(head_file: Path) -> dict:
    """One reward per preset, on tiny stand-ins, shared by tests that only read scores."""
    return {
        "hpsv2": build("hpsv2", model="tiny:open_clip", device="cpu"),
        "pickscore": build("pickscore", model="tiny:clip", device="cpu"),
        "laion_aesthetic": build("laion_aesthetic", clip_model="tiny:clip", head=str(head_file), device="cpu"),
    }


RANGES = {"hpsv2": (-1.0, 1.0), "pickscore": (-1.0, 1.0), "laion_aesthetic": (1.0, 10.0)}


# ------------------------------------------------------------------------------------------ protocol


@pytest.mark.parametrize("name", sorted(RANGES))
def test_preset_protocol_and_range(presets: dict, name: str) -> None:
    reward = presets[name]
    assert isinstance(reward, Reward)
    assert reward.name == name and reward.differentiable is True
    out = reward(_images(b=4), PROMPTS + ["x"])
    assert isinstance(out, RewardOutput)
    assert out.scores.shape == (4,) and out.scores.dtype == torch.float32
    low, high = RANGES[name]
    assert torch.isfinite(out.scores).all()
    assert ((out.scores >= low) & (out.scores <= high)).all(), out.scores
    assert not out.scores.requires_grad  # images did not require grad: no graph is built
    empty = reward(_images(b=0), [])
    assert empty.scores.shape == (0,)


def _reward_parameters(reward) -> list[torch.nn.Parameter]:
    params = list(reward.clip.parameters())
    if hasattr(reward, "head"):
        params += list(reward.head.parameters())
    return params


@pytest.mark.parametrize("name", sorted(RANGES))
def test_gradients_reach_pixels_not_the_reward_model(presets: dict, name: str) -> None:
    reward = presets[name]
    images = _images().requires_grad_()
    scores = reward(images, PROMPTS).scores
    assert scores.requires_grad
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    params = _reward_parameters(reward)
    assert params and all(not p.requires_grad and p.grad is None for p in params)
    assert not reward.clip.training
    with torch.no_grad():
        assert not reward(images, PROMPTS).scores.requires_grad


@pytest.mark.parametrize("name", sorted(RANGES))
def test_prompt_count_must_match(presets: dict, name: str) -> None:
    with pytest.raises(GenrewardError, match="one prompt per image") as info:
        presets[name](_images(b=3), PROMPTS[:2])
    assert "\n" not in str(info.value) and name in str(info.value)


# ------------------------------------------------------------------------------------------- hpsv2


def test_hpsv2_is_the_cosine_after_hps_letterbox_preprocessing(presets: dict) -> None:
    """HPS resizes the longer side to the model size and pads with black (then normalises)."""
    reward = presets["hpsv2"]
    clip: ClipModel = reward.clip
    assert clip.backend == "open_clip" and clip.resize_mode == "longest"
    images = _images(b=3, h=40, w=80)  # → 16×32, padded by 8 rows above and below
    small = torch.nn.functional.interpolate(images, size=(16, 32), mode="bicubic", antialias=True, align_corners=False)
    boxed = torch.nn.functional.pad(small, (0, 0, 8, 8), value=0.0)
    mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.std).view(1, 3, 1, 1)
    with torch.no_grad():
        img = clip.model.encode_image((boxed - mean) / std)
        txt = clip.model.encode_text(clip.tokenizer(PROMPTS))
    expected = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    out = reward(images, PROMPTS)
    torch.testing.assert_close(out.scores, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.details["cosine"], out.scores)


def test_hpsv2_checkpoint_in_hps_format_is_loaded(tmp_path: Path) -> None:
    """An HPS training checkpoint (``{"state_dict": …}`` with DDP ``module.`` keys) replaces the weights."""
    base = load_clip("tiny:open_clip", device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        state = {f"module.{k}": v + 0.05 * torch.randn_like(v) for k, v in base.model.state_dict().items()}
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state, "epoch": 1}, path)

    reward = build("hpsv2", model="tiny:open_clip", checkpoint=str(path), device="cpu")
    loaded = reward.clip.model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key[len("module.") :]], value)
    assert all(not p.requires_grad for p in reward.clip.parameters())
    plain = build("hpsv2", model="tiny:open_clip", device="cpu")
    assert not torch.allclose(reward(_images(), PROMPTS).scores, plain(_images(), PROMPTS).scores)
    assert reward.checkpoint == str(path)


def test_hpsv2_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pt"
    torch.save({"state_dict": {"visual.nope": torch.zeros(1)}}, bad)
    for options, match in [
        ({"version": "v3"}, "version must be one of v2.0, v2.1"),
        ({"checkpoint": str(tmp_path / "missing.pt")}, "hpsv2 checkpoint not found"),
        ({"model": "tiny:open_clip", "checkpoint": str(bad)}, "cannot load hpsv2 checkpoint"),
        ({"model": "tiny:clip", "checkpoint": str(bad)}, "is not open_clip"),
    ]:
        with pytest.raises(GenrewardError, match=match) as info:
            build("hpsv2", **options)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------- pickscore


def test_pickscore_is_a_scaled_cosine(presets: dict) -> None:
    reward = presets["pickscore"]
    clip: ClipModel = reward.clip
    with torch.no_grad():
        img = clip.encode_image(clip.preprocess(_images()))
        txt = clip.encode_text(PROMPTS)
    cosine = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(reward(_images(), PROMPTS).scores, cosine, rtol=1e-5, atol=1e-6)

    scaled = build("pickscore", model="tiny:clip", scale=2.5)(_images(), PROMPTS)
    torch.testing.assert_close(scaled.scores, 2.5 * cosine, rtol=1e-5, atol=1e-6)
    paper = build("pickscore", model="tiny:clip", scale="logit_scale")
    torch.testing.assert_close(paper(_images(), PROMPTS).scores, clip.logit_scale * cosine, rtol=1e-5, atol=1e-5)
    with pytest.raises(GenrewardError, match="scale must be a number"):
        build("pickscore", model="tiny:clip", scale="big")


# --------------------------------------------------------------------------------- laion_aesthetic


def test_aesthetic_is_the_published_mlp_on_normalised_embeddings(presets: dict, head_file: Path) -> None:
    reward = presets["laion_aesthetic"]
    # An independent rebuild of the published layout, loaded from the same file.
    mlp = torch.nn.Sequential(
        torch.nn.Linear(TINY_DIM, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()
    state = torch.load(head_file, weights_only=True)
    mlp.load_state_dict({k[len("layers.") :]: v for k, v in state.items()})
    clip: ClipModel = reward.clip
    with torch.no_grad():
        emb = clip.encode_image(clip.preprocess(_images()))
        expected = mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    out = reward(_images(), ["", "", ""])
    torch.testing.assert_close(out.scores, expected, rtol=1e-5, atol=1e-5)
    reward.head.train()  # dropout must never switch on inside a reward
    assert not reward.head.training
    torch.testing.assert_close(reward(_images(), ["", "", ""]).scores, out.scores)


def test_aesthetic_head_errors_are_one_line(tmp_path: Path) -> None:
    wide = _save_head(tmp_path / "l14.pth", dim=768)
    partial = tmp_path / "partial.pth"
    torch.save({"layers.0.weight": torch.zeros(1024, TINY_DIM)}, partial)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    for head, match in [
        (tmp_path / "missing.pth", "head not found.*improved-aesthetic-predictor"),
        (wide, "takes 768-d embeddings but CLIP 'tiny:clip' gives 32-d"),
        (partial, "lacks layers.0.bias"),
        (junk, "cannot read laion_aesthetic head"),
    ]:
        with pytest.raises(GenrewardError, match=match) as info:
            build("laion_aesthetic", clip_model="tiny:clip", head=str(head))
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------- composition


def test_prdp_multi_reward_is_the_weighted_sum(head_file: Path) -> None:
    images, prompts = _images(), PROMPTS
    total = build(
        "weighted_sum",
        components=[
            {"name": "pickscore", "options": {"model": "tiny:clip"}, "weight": 10.0},
            {"name": "hpsv2", "options": {"model": "tiny:open_clip"}, "weight": 2.0},
            {"name": "laion_aesthetic", "options": {"clip_model": "tiny:clip", "head": str(head_file)}, "weight": 0.05},
        ],
    )
    assert total.differentiable is True
    out = total(images, prompts)
    pick = build("pickscore", model="tiny:clip")(images, prompts).scores
    hps = build("hpsv2", model="tiny:open_clip")(images, prompts).scores
    aes = build("laion_aesthetic", clip_model="tiny:clip", head=str(head_file))(images, prompts).scores
    torch.testing.assert_close(out.scores, 10.0 * pick + 2.0 * hps + 0.05 * aes)
    for key, value in [("pickscore", pick), ("hpsv2", hps), ("laion_aesthetic", aes)]:
        torch.testing.assert_close(out.details[key], value)
    grad_images = images.clone().requires_grad_()
    total(grad_images, prompts).scores.sum().backward()
    assert grad_images.grad is not None and grad_images.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ offline


@pytest.mark.parametrize(
    "name,options,needles",
    [
        ("hpsv2", {}, ["xswu/HPSv2", "HPS_v2.1_compressed.pt", "checkpoint="]),
        ("hpsv2", {"version": "v2.0"}, ["xswu/HPSv2", "HPS_v2_compressed.pt", "checkpoint="]),
        ("pickscore", {}, ["yuvalkirstain/PickScore_v1", "local"]),
        ("laion_aesthetic", {}, ["trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth", "head="]),
        ("laion_aesthetic", {"clip_model": "tiny:clip"}, ["trl-lib/ddpo-aesthetic-predictor", "head="]),
        ("laion_aesthetic", {"head": "HEAD"}, ["openai/clip-vit-large-patch14", "local"]),
    ],
)
def test_real_loading_offline_is_a_fast_one_line_error(
    monkeypatch, tmp_path: Path, head_file: Path, name: str, options: dict, needles: list[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache, whatever this machine holds
    options = {k: (str(head_file) if v == "HEAD" else v) for k, v in options.items()}
    start = time.perf_counter()
    with pytest.raises(OfflineModelError) as info:
        build(name, **options)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
