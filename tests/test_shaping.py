"""Reward shaping (docs/algorithms/shaping.md): VLM-RM goal–baseline, PAR/lsc, meanstd, clamp.

Test names carry the item of shaping.md §5 they check: ``test_vlmrm_<n>_…`` for VLM-RM item n (§1),
``test_par_<n>_…`` for PAR item n (§2). Everything runs offline on tiny random-weight models.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import pytest
import torch

from genreward.errors import GenrewardError
from genreward.rewards import Reward, RewardOutput, build
from genreward.rewards.shaping import (
    MeanStd,
    PreferenceAsReward,
    clamp_reward,
    goal_baseline_matrix,
    goal_baseline_reward,
    goal_baseline_reward_affine,
    lsc_reward,
    merge_moments,
    par_reward,
    reference_percentile_85,
    reference_seed,
)

D = 16


class FixedReward:
    """An inner reward whose scores come from the call context (``raw=[B]``), to test the shapers alone."""

    differentiable = True

    def __init__(self) -> None:
        self.name = "fixed"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        return RewardOutput(scores=torch.as_tensor(context["raw"], dtype=torch.float32))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=_gen(seed), dtype=torch.float64), dim=-1)


def _images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=_gen(seed))


@pytest.fixture(scope="module")
def goal_baseline_tiny():
    return build("goal_baseline", model="tiny:clip", alpha=0.0, device="cpu")


# ================================================================================ §1 VLM-RM goal–baseline


def test_vlmrm_1_alpha0_single_goal_is_cosine() -> None:
    x, g, b = _unit(8, D, seed=1), _unit(D, seed=2), _unit(D, seed=3)
    reward = goal_baseline_reward(x, g, b, alpha=0.0)
    torch.testing.assert_close(reward, x @ g, atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_vlmrm_2_x_equals_goal_gives_one(alpha: float) -> None:
    g = torch.randn(5, D, generator=_gen(4), dtype=torch.float64).mean(0)  # a mean of goals need not be unit
    b = _unit(D, seed=5)
    assert goal_baseline_reward(g, g, b, alpha).item() == pytest.approx(1.0, abs=1e-12)


def test_vlmrm_3_alpha1_ignores_directions_orthogonal_to_d() -> None:
    x, g, b = _unit(8, D, seed=6), _unit(D, seed=7), _unit(D, seed=8)
    u = torch.nn.functional.normalize(g - b, dim=-1)
    z = torch.randn(8, D, generator=_gen(9), dtype=torch.float64) * 3
    orthogonal = z - (z @ u)[:, None] * u
    torch.testing.assert_close(goal_baseline_reward(x + orthogonal, g, b, 1.0), goal_baseline_reward(x, g, b, 1.0))
    # …whereas moving along d does change it
    assert not torch.allclose(goal_baseline_reward(x + 0.3 * u, g, b, 1.0), goal_baseline_reward(x, g, b, 1.0))


def test_vlmrm_4_unit_inputs_alpha0_in_range() -> None:
    x, g, b = _unit(1000, D, seed=10), _unit(1000, D, seed=11), _unit(1000, D, seed=12)
    reward = goal_baseline_reward(x, g, b, 0.0)
    assert reward.min() >= -1 - 1e-12 and reward.max() <= 1 + 1e-12
    torch.testing.assert_close(goal_baseline_reward(-g, g, b, 0.0), torch.full((1000,), -1.0, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_vlmrm_5_matrix_and_affine_projection_forms_agree(alpha: float) -> None:
    x = torch.randn(32, D, generator=_gen(13), dtype=torch.float64)
    g, b = torch.randn(D, generator=_gen(14), dtype=torch.float64), torch.randn(D, generator=_gen(15), dtype=torch.float64)
    m = goal_baseline_matrix(g, b, alpha)
    matrix_form = 1 - 0.5 * ((x - g) @ m.T).pow(2).sum(-1)
    torch.testing.assert_close(goal_baseline_reward(x, g, b, alpha), matrix_form)
    torch.testing.assert_close(goal_baseline_reward_affine(x, g, b, alpha), matrix_form)
    # per-row g, b (one goal and baseline per prompt) broadcast the same way
    gs = torch.randn(32, D, generator=_gen(16), dtype=torch.float64)
    bs = torch.randn(32, D, generator=_gen(17), dtype=torch.float64)
    per_row = torch.stack(
        [1 - 0.5 * (goal_baseline_matrix(gs[i], bs[i], alpha) @ (x[i] - gs[i])).pow(2).sum() for i in range(32)]
    )
    torch.testing.assert_close(goal_baseline_reward(x, gs, bs, alpha), per_row)


def test_goal_baseline_tiny_clip_alpha0_equals_clip_cosine(goal_baseline_tiny) -> None:
    prompts = ["a photo of a cat", "a red car", "a photo of a cat"]
    images = _images(3, seed=1)
    cosine = build("clip_score", model="tiny:clip", device="cpu")(images, prompts).scores
    out = goal_baseline_tiny(images, prompts)
    torch.testing.assert_close(out.scores, cosine, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.details["goal_cosine"], cosine, atol=1e-5, rtol=0)


def test_goal_baseline_tiny_clip_gradient_reaches_pixels() -> None:
    reward = build(
        "goal_baseline", model="tiny:clip", alpha=0.5, baseline=["a photo"], goals=["a picture of {prompt}"], device="cpu"
    )
    assert isinstance(reward, Reward) and reward.differentiable
    images = _images(2, seed=2).requires_grad_(True)
    out = reward(images, ["a cat", "a dog"])
    out.scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # the goal texts really are the prompt plus the filled-in template
    g, _ = reward.goal_and_baseline("a cat")
    manual = reward.clip.embed_texts(["a cat", "a picture of a cat"]).mean(0)
    torch.testing.assert_close(g, manual, atol=1e-6, rtol=0)


def test_goal_baseline_option_errors() -> None:
    with pytest.raises(GenrewardError, match="alpha"):
        build("goal_baseline", alpha=1.5)
    with pytest.raises(GenrewardError, match="baseline"):
        build("goal_baseline", baseline=[])
    with pytest.raises(GenrewardError, match="goals"):
        build("goal_baseline", include_prompt=False)
    same = build("goal_baseline", model="tiny:clip", alpha=0.5, baseline=["{prompt}"], device="cpu")
    with pytest.raises(GenrewardError, match="coincide"):
        same(_images(1), ["a cat"])


# ============================================================================================= §2 PAR


def test_par_1_half_at_reference_bounded_and_monotone() -> None:
    r_ref = torch.tensor([[0.3], [-2.0], [5.0]], dtype=torch.float64)
    torch.testing.assert_close(par_reward(r_ref[:, 0], r_ref), torch.full((3,), 0.5, dtype=torch.float64))
    r = torch.linspace(-10, 10, 201, dtype=torch.float64)
    refs = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64).expand(201, 3)
    values = par_reward(r, refs)
    assert ((values > 0) & (values < 1)).all()
    assert (values.diff() > 0).all()  # strictly increasing in r
    for m in range(3):  # strictly decreasing in each reference
        bumped = refs.clone()
        bumped[:, m] += 0.1
        assert (par_reward(r, bumped) < values).all()


def test_par_2_shift_invariance() -> None:
    r = torch.randn(10, generator=_gen(20), dtype=torch.float64)
    refs = torch.randn(10, 4, generator=_gen(21), dtype=torch.float64)
    for shift in (-7.5, 0.1, 123.0):
        torch.testing.assert_close(par_reward(r + shift, refs + shift), par_reward(r, refs))
        torch.testing.assert_close(lsc_reward(r + shift, refs + shift), lsc_reward(r, refs))


def test_par_3_m_references_is_mean_of_single_and_m0_raises() -> None:
    r = torch.randn(6, generator=_gen(22), dtype=torch.float64)
    refs = torch.randn(6, 5, generator=_gen(23), dtype=torch.float64)
    singles = torch.stack([par_reward(r, refs[:, m : m + 1]) for m in range(5)], dim=1)
    torch.testing.assert_close(par_reward(r, refs), singles.mean(dim=1))
    torch.testing.assert_close(par_reward(r, refs, scale=2.0), torch.sigmoid(2.0 * (r[:, None] - refs)).mean(1))
    # decision: M = 0 is an error, not the PAR code's silent fall-back to the raw reward
    with pytest.raises(GenrewardError, match="M >= 1"):
        par_reward(r, refs[:, :0])
    with pytest.raises(GenrewardError, match="references"):
        build("par", reward={"name": "jpeg_compressibility"}, references=0)
    # non-finite references are skipped; a row with none left is invalid (NaN), never the raw reward
    holed = refs.clone()
    holed[0, 1] = float("nan")
    holed[1, :] = float("inf")
    out = par_reward(r, holed)
    keep = [0, 2, 3, 4]
    assert out[0].item() == pytest.approx(torch.sigmoid(r[0] - refs[0, keep]).mean().item())
    assert math.isnan(out[1].item()) and torch.isfinite(out[2:]).all()


def test_par_4_lsc_nonpositive_and_log_half_at_r85() -> None:
    refs = torch.randn(8, 3, generator=_gen(24), dtype=torch.float64)
    r85 = reference_percentile_85(refs)
    torch.testing.assert_close(r85, refs.mean(1) + 1.0364333894937898 * refs.std(1, unbiased=False))
    torch.testing.assert_close(lsc_reward(r85, refs), torch.full((8,), math.log(0.5), dtype=torch.float64))
    r = torch.linspace(-20, 20, 8, dtype=torch.float64)
    assert (lsc_reward(r, refs) <= 0).all()
    # one reference: r85 is that reference (population std of one value is 0)
    torch.testing.assert_close(reference_percentile_85(refs[:, :1]), refs[:, 0])


def test_par_wrapper_formula_via_reference_rewards_context() -> None:
    par = build("par", reward=FixedReward(), references=2, pipeline="tiny:sd")
    raw = torch.tensor([0.0, 1.0, -1.0])
    refs = torch.tensor([[0.0, 0.0], [0.0, 2.0], [1.0, 3.0]])
    out = par(_images(3), ["a", "b", "c"], raw=raw, reference_rewards=refs)
    torch.testing.assert_close(out.scores, torch.sigmoid(raw[:, None] - refs).mean(1))
    torch.testing.assert_close(out.details["raw"], raw)
    torch.testing.assert_close(out.details["reference_mean"], refs.mean(1))
    assert par._pipe is None and par.num_generated == 0  # given references: no pipeline was even loaded
    lsc = build("par", reward=FixedReward(), mode="lsc", scale=2.0)
    out = lsc(_images(3), ["a", "b", "c"], raw=raw, reference_rewards=refs)
    torch.testing.assert_close(out.scores, torch.nn.functional.logsigmoid(2.0 * (raw - reference_percentile_85(refs))))
    with pytest.raises(GenrewardError, match="mode"):
        build("par", reward=FixedReward(), mode="tanh")


def test_par_end_to_end_tiny_pipeline_generates_once_per_prompt() -> None:
    par = build("par", reward={"name": "jpeg_compressibility"}, references=2, pipeline="tiny:sd",
                num_steps=2, device="cpu", seed=3)
    assert isinstance(par, PreferenceAsReward) and par._pipe is None  # build is cheap: lazy pipeline
    assert par.differentiable is False  # follows the (non-differentiable) inner reward
    prompts = ["a cat", "a dog", "a cat"]
    images = _images(3, seed=5)
    out = par(images, prompts)
    assert par.num_generated == 4  # 2 unique prompts × M = 2
    assert ((out.scores > 0) & (out.scores < 1)).all()
    assert set(par.cache) == {"a cat", "a dog"} and all(len(v) == 2 for v in par.cache.values())
    assert {"raw", "reference_mean", "jpeg_compressibility/jpeg_kb"} <= set(out.details)
    again = par(images, prompts)
    assert par.num_generated == 4  # cached: no new generation
    torch.testing.assert_close(again.scores, out.scores)
    # reproducible references: a fresh wrapper on the same pipeline regenerates identical rewards
    twin = build("par", reward={"name": "jpeg_compressibility"}, references=2, pipeline=par.pipe, num_steps=2, seed=3)
    torch.testing.assert_close(twin.reference_rewards(["a dog"]), torch.tensor([par.cache["a dog"]]))
    # a checkpointed cache is reused (no generation), but not across different reference settings
    state = json.loads(json.dumps(par.state_dict()))
    resumed = build("par", reward={"name": "jpeg_compressibility"}, references=2, pipeline="tiny:sd", num_steps=2, seed=3)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed(images, prompts).scores, out.scores)
    assert resumed.num_generated == 0 and resumed._pipe is None
    other = build("par", reward={"name": "jpeg_compressibility"}, references=2, pipeline="tiny:sd", num_steps=2, seed=4)
    other.load_state_dict(state)
    assert other.cache == {}


def test_reference_seed_is_deterministic_and_distinct() -> None:
    assert reference_seed(0, "a cat", 0) == reference_seed(0, "a cat", 0)
    seeds = {reference_seed(s, p, m) for s in (0, 1) for p in ("a cat", "a dog") for m in range(3)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)


# ========================================================================================== meanstd


def test_meanstd_per_prompt_levels_both_normalise_to_zero_mean() -> None:
    shaper = build("meanstd", reward=FixedReward())
    assert isinstance(shaper, MeanStd) and shaper.differentiable
    g = _gen(30)
    prompts = ["high"] * 4 + ["low"] * 4
    seen: dict[str, list[torch.Tensor]] = {"high": [], "low": []}
    for _ in range(5):
        raw = torch.cat([100 + 5 * torch.randn(4, generator=g), -3 + 0.1 * torch.randn(4, generator=g)])
        out = shaper(_images(8), prompts, raw=raw)
        seen["high"].append(raw[:4])
        seen["low"].append(raw[4:])
    for prompt in ("high", "low"):
        values = torch.cat(seen[prompt]).double()
        stats = shaper.get_stats()[prompt]
        assert stats["count"] == 20
        assert stats["mean"] == pytest.approx(values.mean().item(), rel=1e-9)  # Welford = all-history moments
        assert stats["std"] == pytest.approx(values.std(unbiased=False).item(), rel=1e-9)
        normalised = (values - stats["mean"]) / (stats["std"] + shaper.eps)
        assert abs(normalised.mean().item()) < 1e-6
    # the last batch is normalised with stats that already include it, per prompt (≈ 0 mean, O(1) spread)
    assert out.scores[:4].mean().abs() < 2 and out.scores[4:].mean().abs() < 2
    torch.testing.assert_close(out.details["raw"], raw)


def test_meanstd_update_first_then_normalise_and_global_mode() -> None:
    shaper = build("meanstd", reward=FixedReward())
    out = shaper(_images(4), ["a", "a", "b", "b"], raw=torch.tensor([1.0, 3.0, 10.0, 10.0]))
    # first batch: each prompt is centred on its own mean (stats updated before normalising)
    torch.testing.assert_close(out.scores, torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    frozen = shaper(_images(1), ["a"], raw=torch.tensor([4.0]), update_stats=False)
    torch.testing.assert_close(frozen.scores, torch.tensor([2.0]), atol=1e-5, rtol=0)
    assert shaper.get_stats()["a"]["count"] == 2
    glob = build("meanstd", reward=FixedReward(), per_prompt=False)
    out = glob(_images(4), ["a", "a", "b", "b"], raw=torch.tensor([0.0, 0.0, 2.0, 2.0]))
    torch.testing.assert_close(out.scores, torch.tensor([-1.0, -1.0, 1.0, 1.0]), atol=1e-5, rtol=0)
    assert set(glob.get_stats()) == {""}


def test_meanstd_state_dict_round_trip() -> None:
    shaper = build("meanstd", reward=FixedReward())
    g = _gen(31)
    for _ in range(3):
        shaper(_images(4), ["x", "y", "x", "y"], raw=torch.randn(4, generator=g))
    state = json.loads(json.dumps(shaper.state_dict()))  # plain Python types only
    restored = build("meanstd", reward=FixedReward())
    restored.load_state_dict(state)
    raw = torch.randn(4, generator=g)
    torch.testing.assert_close(restored(_images(4), ["x", "y", "x", "y"], raw=raw).scores,
                               shaper(_images(4), ["x", "y", "x", "y"], raw=raw).scores)
    assert restored.state_dict() == shaper.state_dict()
    with pytest.raises(GenrewardError, match="per_prompt"):
        build("meanstd", reward=FixedReward(), per_prompt=False).load_state_dict(state)


def test_merge_moments_is_batching_independent() -> None:
    values = torch.randn(50, generator=_gen(32), dtype=torch.float64) * 4 + 7
    one = merge_moments((0, 0.0, 0.0), values)
    many = (0, 0.0, 0.0)
    for chunk in values.split([1, 7, 20, 2, 20]):
        many = merge_moments(many, chunk)
    assert one[0] == many[0] == 50
    assert one[1] == pytest.approx(many[1], rel=1e-12) and one[2] == pytest.approx(many[2], rel=1e-12)
    assert merge_moments(one, torch.tensor([float("nan")])) == one


# ============================================================================================ clamp


def test_clamp_bounds_and_gradient() -> None:
    r = torch.tensor([-3.0, -0.5, 0.5, 4.0], requires_grad=True)
    out = clamp_reward(r, low=-1.0, high=1.0)
    torch.testing.assert_close(out, torch.tensor([-1.0, -0.5, 0.5, 1.0]))
    out.sum().backward()
    torch.testing.assert_close(r.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(clamp_reward(r.detach(), high=0.0), torch.tensor([-3.0, -0.5, 0.0, 0.0]))
    torch.testing.assert_close(clamp_reward(r.detach(), low=0.0), torch.tensor([0.0, 0.0, 0.5, 4.0]))
    wrapper = build("clamp", reward=FixedReward(), high=1.0)
    res = wrapper(_images(4), list("abcd"), raw=r.detach())
    torch.testing.assert_close(res.scores, torch.tensor([-3.0, -0.5, 0.5, 1.0]))
    torch.testing.assert_close(res.details["clamped"], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    with pytest.raises(GenrewardError, match="low, high"):
        build("clamp", reward=FixedReward())
    with pytest.raises(GenrewardError, match="<= high"):
        build("clamp", reward=FixedReward(), low=2, high=1)
    with pytest.raises(GenrewardError, match="option 'reward'"):
        build("clamp", high=1.0)


def test_clamp_of_clip_score_is_differentiable_to_pixels() -> None:
    wrapper = build("clamp", reward={"name": "clip_score", "options": {"model": "tiny:clip", "device": "cpu"}}, low=-1.0)
    assert wrapper.differentiable
    images = _images(2, seed=7).requires_grad_(True)
    wrapper(images, ["a cat", "a dog"]).scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


# ================================================================================ wrapper of a wrapper


def test_meanstd_of_par_from_config() -> None:
    nested = build("meanstd", reward={"name": "par", "options": {
        "reward": {"name": "jpeg_compressibility"}, "references": 1, "pipeline": "tiny:sd"}})
    assert nested.differentiable is False and isinstance(nested.inner, PreferenceAsReward)
    images = _images(4, seed=8)
    refs = torch.tensor([[-3.0], [-3.0], [-2.0], [-2.0]])
    out = nested(images, ["a", "a", "b", "b"], reference_rewards=refs)
    inner = nested.inner(images, ["a", "a", "b", "b"], reference_rewards=refs)
    torch.testing.assert_close(out.details["raw"], inner.scores)  # meanstd sees PAR's scores
    assert {"par/raw", "par/reference_mean"} <= set(out.details)
    for rows in ([0, 1], [2, 3]):  # first batch per prompt: centred on its own mean
        assert abs(out.scores[rows].mean().item()) < 1e-4
    assert nested.inner._pipe is None  # given references skip generation at any depth
    state = json.loads(json.dumps(nested.state_dict()))
    assert "inner" in state and "settings" in state["inner"]


def test_par_scores_its_references_without_updating_a_stateful_inner(tiny_pipe) -> None:
    """References are not policy samples and are generated per rank at different times: a meanstd inside
    PAR folds in only the policy batch, and never runs its gather collective for them."""

    class MeanPixel:
        differentiable = True
        name = "mean_pixel"

        def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
            return RewardOutput(scores=images.float().mean(dim=(1, 2, 3)))

    inner = build("meanstd", reward=MeanPixel())
    par = build("par", reward=inner, references=2, pipeline=tiny_pipe, num_steps=2, batch_size=4)
    par(_images(2), ["a cat", "an owl"])
    assert par.num_generated == 4
    assert {k: v["count"] for k, v in inner.get_stats().items()} == {"a cat": 1, "an owl": 1}
