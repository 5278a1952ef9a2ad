"""λ-Harmonic reward (docs/algorithms/rpo_lambda_harmonic.md §3, §11 items 1–3): maths, backends, references, errors."""

from __future__ import annotations

import math

import pytest
import torch

from genreward.errors import GenrewardError
from genreward.rewards import build
from genreward.rewards.lambda_harmonic import (
    LambdaHarmonic,
    lambda_harmonic,
    map_similarity,
    strip_tokens,
)

GRID = torch.linspace(0.02, 1.0, 25)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, 2 threads per process thrash (see OFFLINE-NOTES)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def clip_reward():
    return build("lambda_harmonic", lam=0.5, backend="clip", model="tiny:clip")


@pytest.fixture(scope="module")
def align_reward():
    return build("lambda_harmonic", lam=0.5, backend="align", model="tiny:align")


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(5, 3, 32, 32, generator=gen)


# ------------------------------------------------------------------------------------------ §11 item 1


def test_spec11_1_half_is_ordinary_harmonic_mean():
    a, b = torch.meshgrid(GRID, GRID, indexing="ij")
    torch.testing.assert_close(lambda_harmonic(a, b, 0.5), 2 * a * b / (a + b), rtol=1e-6, atol=1e-7)


def test_spec11_1_edge_cases_return_each_term_exactly():
    a, b = GRID, GRID.flip(0)
    assert torch.equal(lambda_harmonic(a, b, 1.0), a)
    assert torch.equal(lambda_harmonic(a, b, 0.0), b)


@pytest.mark.parametrize("lam", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_spec11_1_between_min_and_max_and_below_arithmetic_mean(lam):
    a, b = torch.meshgrid(GRID, GRID, indexing="ij")
    r = lambda_harmonic(a, b, lam)
    assert torch.all(r >= torch.minimum(a, b) - 1e-6)
    assert torch.all(r <= torch.maximum(a, b) + 1e-6)
    assert torch.all(r <= lam * a + (1 - lam) * b + 1e-6)


def test_spec11_1_increasing_in_both_arguments_and_in_lambda_when_si_gt_st():
    a, b = torch.meshgrid(GRID, GRID, indexing="ij")
    r = lambda_harmonic(a, b, 0.4)
    assert torch.all(r[1:, :] > r[:-1, :])  # increasing in S_I
    assert torch.all(r[:, 1:] > r[:, :-1])  # increasing in S_T
    mask = a > b
    lams = torch.linspace(0.0, 1.0, 11)
    values = torch.stack([lambda_harmonic(a, b, float(l))[mask] for l in lams])
    assert torch.all(values[1:] > values[:-1])


def test_spec11_1_lambda_outside_unit_interval_is_an_error():
    with pytest.raises(GenrewardError, match="lam"):
        lambda_harmonic(GRID, GRID, 1.5)
    with pytest.raises(GenrewardError, match="lam"):
        build("lambda_harmonic", lam=-0.1, backend="clip", model="tiny:clip")


# ------------------------------------------------------------------------------------------ §11 item 2


@pytest.mark.parametrize("backend", ["clip_reward", "align_reward"])
def test_spec11_2_image_against_only_itself_gives_si_one(backend, images, request):
    reward = request.getfixturevalue(backend)
    for i in range(images.shape[0]):
        out = reward(images[i : i + 1], ["a photo of a cat"], reference_images=images[i : i + 1])
        assert out.details["image_similarity"].item() == pytest.approx(1.0, abs=1e-5)
        assert out.details["image_cosine"].item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("backend", ["clip_reward", "align_reward"])
def test_spec11_2_mapped_similarities_lie_in_unit_interval(backend, images, request):
    reward = request.getfixturevalue(backend)
    prompts = ["a cat", "a dog on the moon", "sks", "", "a painting of a red bicycle"]
    out = reward(images, prompts, reference_images=images.flip(0)[:3])
    for key in ("image_similarity", "text_similarity"):
        assert torch.all((out.details[key] >= 0) & (out.details[key] <= 1)), key
    assert torch.all((out.scores >= 0) & (out.scores <= 1))
    cos = torch.linspace(-1, 1, 9)
    torch.testing.assert_close(map_similarity(cos), (cos + 1) / 2)
    assert map_similarity(torch.tensor(-1.0)) == 0 and map_similarity(torch.tensor(1.0)) == 1


# ------------------------------------------------------------------------------------------ §11 item 3


@pytest.mark.parametrize("backend", ["clip_reward", "align_reward"])
def test_spec11_3_reference_order_does_not_matter_and_is_the_mean(backend, images, request):
    reward = request.getfixturevalue(backend)
    refs = images[1:]
    a = reward(images[:1], ["a cat"], reference_images=refs)
    b = reward(images[:1], ["a cat"], reference_images=refs.flip(0).clone())
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-6)
    singles = torch.stack([reward(images[:1], ["a cat"], reference_images=refs[m : m + 1]).details["image_cosine"] for m in range(4)])
    torch.testing.assert_close(a.details["image_cosine"], singles.mean(0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- reward behaviour


def test_scores_are_the_lambda_harmonic_of_the_details(clip_reward, images):
    out = clip_reward(images, ["a cat"] * 5, reference_images=images[:2])
    expected = lambda_harmonic(out.details["image_similarity"], out.details["text_similarity"], 0.5)
    torch.testing.assert_close(out.scores, expected)


def test_view_shares_backbone_and_lambda_one_zero_are_si_st(clip_reward, images):
    full = clip_reward(images, ["a sks cat"] * 5, reference_images=images[:2])
    img = clip_reward.view(1.0)(images, ["a sks cat"] * 5, reference_images=images[:2])
    txt = clip_reward.view(0.0)(images, ["a sks cat"] * 5, reference_images=images[:2])
    assert clip_reward.view(0.3).embedder is clip_reward.embedder
    torch.testing.assert_close(img.scores, full.details["image_similarity"])
    torch.testing.assert_close(txt.scores, full.details["text_similarity"])


def test_remove_tokens_strips_identifier_from_text_only(clip_reward, images):
    assert strip_tokens("a photo of sks cat, sks.", ["sks"]) == "a photo of cat, ."
    assert strip_tokens("a sksx cat", ["sks"]) == "a sksx cat"
    stripped = clip_reward.view(0.0, ["sks"])(images[:1], ["a sks cat"], reference_images=images[:1])
    plain = clip_reward.view(0.0)(images[:1], ["a cat"], reference_images=images[:1])
    torch.testing.assert_close(stripped.scores, plain.scores)


@pytest.mark.parametrize("backend", ["clip_reward", "align_reward"])
def test_differentiable_to_pixels(backend, images, request):
    reward = request.getfixturevalue(backend)
    assert reward.differentiable
    x = images[:2].clone().requires_grad_(True)
    out = reward(x, ["a cat", "a dog"], reference_images=images[2:4])
    out.scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_per_sample_reference_sets(clip_reward, images):
    per = clip_reward(images[:2], ["a", "b"], reference_images=[images[2:3], images[3:5]])
    one = clip_reward(images[:1], ["a"], reference_images=images[2:3])
    two = clip_reward(images[1:2], ["b"], reference_images=images[3:5])
    torch.testing.assert_close(per.scores, torch.cat([one.scores, two.scores]), rtol=1e-5, atol=1e-6)
    with pytest.raises(GenrewardError, match="per-image reference sets"):
        clip_reward(images[:2], ["a", "b"], reference_images=[images[2:3]])


def test_references_option_from_folder(tmp_path, images):
    from genreward.images import save_png

    for i in range(3):
        save_png(images[i], tmp_path / f"r{i}.png")
    reward = build("lambda_harmonic", lam=0.5, backend="clip", model="tiny:clip", references=str(tmp_path))
    assert reward.references.shape == (3, 3, 32, 32)
    out = reward(images[:2], ["a", "b"])
    assert out.scores.shape == (2,)


def test_missing_references_and_bad_backend_are_one_line_errors(clip_reward, images):
    bare = LambdaHarmonic(lam=0.5, embedder=clip_reward.embedder)
    with pytest.raises(GenrewardError, match="reference images"):
        bare(images[:1], ["a cat"])
    with pytest.raises(GenrewardError, match="reference_images") as err:  # the one context key, as vlm_judge's
        bare(images[:1], ["a cat"], references=images[:1])
    assert "\n" not in str(err.value)
    with pytest.raises(GenrewardError, match="backend"):
        build("lambda_harmonic", backend="dino")
    with pytest.raises(GenrewardError, match="no option"):
        build("lambda_harmonic", lambda_=0.5)


def test_hub_align_offline_is_one_line_error():
    with pytest.raises(GenrewardError) as err:
        build("lambda_harmonic", backend="align", model="kakaobrain/align-base")
    assert "\n" not in str(err.value) and "align-base" in str(err.value)


def test_tiny_align_is_deterministic_and_non_degenerate(align_reward, images):
    from genreward.rewards.lambda_harmonic import build_tiny_align

    again = build_tiny_align()
    a = align_reward.embedder.embed_images(images)
    torch.testing.assert_close(a, again.embed_images(images))
    assert torch.allclose(a.norm(dim=-1), torch.ones(5), atol=1e-5)  # not the all-zero embedding of a dead network
    sims = a @ a.T
    assert sims[~torch.eye(5, dtype=torch.bool)].max() < 0.999
    assert not math.isnan(float(sims.sum()))
