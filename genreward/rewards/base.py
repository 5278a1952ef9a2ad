"""The reward contract, the registry of rewards by name, and weighted composition.

Every reward takes images ``[B,3,H,W]`` in [0,1] plus the B prompts (and optional context such as
``metadata`` or ``reference_images``) and returns a :class:`RewardOutput`. Rewards are registered by
name with :func:`register` and built from configs with :func:`build`.

The range is checked (:func:`check_batch`): values more than :data:`IMAGE_RANGE_TOLERANCE` outside [0, 1]
(0..255 pixel values, [-1, 1] VAE outputs) are a one-line error instead of plausible-looking scores. An image with
a non-finite pixel (NaN/inf, e.g. from a diverged policy) has no meaningful score: it scores NaN, never a finite
number; the other images of the batch are scored as usual, trainers leave NaN rewards out (and stop after
``train.max_nonfinite_epochs`` epochs without a single finite one), and evaluation records them as null.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from genreward.errors import GenrewardError
from genreward.images import check_images


@dataclass
class RewardOutput:
    """Scores ``[B]`` (higher is better), optional per-image details (each ``[B]``) and optional verdicts:
    one short human-readable judgement per image, which evaluation records and galleries show."""

    scores: torch.Tensor
    details: dict[str, torch.Tensor] = field(default_factory=dict)
    verdicts: list[str] | None = None

    def __post_init__(self) -> None:
        if self.scores.ndim != 1:
            raise ValueError(f"RewardOutput.scores must be 1-D [B], got shape {tuple(self.scores.shape)}")
        for key, value in self.details.items():
            if value.shape[:1] != self.scores.shape:
                raise ValueError(f"RewardOutput.details[{key!r}] must have leading shape [B]={tuple(self.scores.shape)}")
        if self.verdicts is not None and len(self.verdicts) != self.scores.shape[0]:
            raise ValueError(f"RewardOutput.verdicts must have one entry per image, got {len(self.verdicts)} for {self.scores.shape[0]}")


@runtime_checkable
class Reward(Protocol):
    """What trainers and evaluation rely on.

    ``**context`` carries optional per-call keys. A reward reads the ones it knows and must ignore the rest
    (wrappers forward them all to their inner rewards), so callers can pass keys meant for a nested reward:

    * ``metadata`` — one entry per image (prompt-set metadata); ``reference_images`` /
      ``reference_rewards`` — reward-specific references;
    * ``update_stats`` (bool, default True) — False: a stateful reward scores without updating its state
      (evaluation passes it);
    * ``gather`` (``Callable[[Tensor], Tensor]``, 1-D tensor → concatenation over all ranks in rank order,
      like ``accelerator.gather``) and ``gather_prompts`` (``Callable[[list[str]], list[str]]``, like
      ``accelerate.utils.gather_object``) — let a stateful reward update its state with every rank's batch,
      so all ranks hold the same state; they are collectives, so every rank must make the call.
    """

    name: str
    differentiable: bool  # True ⇒ scores carry gradients back to the input images

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput: ...


IMAGE_RANGE_TOLERANCE = 5e-3  # resampling overshoot and float error; 0..255 or [-1, 1] images are far outside


def check_image_range(name: str, images: torch.Tensor, what: str = "images") -> None:
    """One line when the finite values of ``images`` leave [0, 1] by more than :data:`IMAGE_RANGE_TOLERANCE`."""
    x = images.detach()
    if x.numel() == 0:
        return
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        if not bool(finite.any()):
            return
        x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    lo, hi = (float(v) for v in x.float().aminmax())
    tol = IMAGE_RANGE_TOLERANCE
    if lo >= -tol and hi <= 1 + tol:
        return
    if hi > 2:
        hint = "; these look like 0..255 pixel values: divide by 255"
    elif lo < -tol and lo >= -1 - tol:
        hint = "; these look like [-1, 1] values (e.g. a VAE decode): use images / 2 + 0.5"
    else:
        hint = "; clamp or rescale them"
    raise GenrewardError(f"{name}: {what} must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")


def nonfinite_images(images: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: which images hold a NaN or infinite value (they score NaN; see the module docs)."""
    return ~torch.isfinite(images.detach()).flatten(1).all(dim=1)


def nan_for_nonfinite_images(scores: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``scores`` with NaN where the image had a non-finite pixel (for rewards whose pipeline would hide it,
    e.g. PIL conversion, which turns NaN into black)."""
    bad = nonfinite_images(images).to(scores.device)
    return scores.masked_fill(bad, float("nan")) if bool(bad.any()) else scores


def check_batch(name: str, images: torch.Tensor, prompts: Sequence[str]) -> None:
    """The reward input contract: images [B,3,H,W] float in [0,1] and one prompt string per image."""
    check_images(images)
    check_image_range(name, images)
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise GenrewardError(f"{name} needs one prompt per image: {images.shape[0]} images, {got}")
    if any(not isinstance(p, str) for p in prompts):
        raise GenrewardError(f"{name} prompts must be strings")


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Class/factory decorator: make a reward buildable by ``build(name, **options)``."""

    def wrap(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward name {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available() -> list[str]:
    """Names of all registered rewards."""
    return sorted(_REGISTRY)


def _accepted_options(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword names a factory accepts, or None if it takes ``**kwargs``."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"}


def build(name: str, /, **options: Any) -> Reward:
    """Build a registered reward by name. Unknown names and options are one-line errors.

    A name not registered yet makes the registry import the plugins (:data:`genreward.registry.PLUGINS`, by
    name, once) and look again, so plugin rewards such as the shapes world's ``verifier`` need no import.
    """
    if name not in _REGISTRY:
        from genreward.registry import load_plugins

        load_plugins()
    if name not in _REGISTRY:
        raise GenrewardError(f"unknown reward {name!r}; available rewards: {', '.join(available())}")
    factory = _REGISTRY[name]
    accepted = _accepted_options(factory)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise GenrewardError(
                f"reward {name!r} has no option(s) {', '.join(unknown)}; its options are: {', '.join(sorted(accepted)) or '(none)'}"
            )
    return factory(**options)


@dataclass
class RewardSpec:
    """A reward as written in a config: its registered name, options, and a display name.

    ``weight`` is used only when several specs are combined into a :class:`WeightedSum`.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    label: str | None = None  # how it appears in metrics (defaults to ``name``)

    @property
    def key(self) -> str:
        return self.label or self.name


def build_from_spec(spec: RewardSpec) -> Reward:
    reward = build(spec.name, **spec.options)
    if spec.label:
        reward.name = spec.label
    return reward


def reward_from_specs(specs: Sequence[RewardSpec], name: str = "reward") -> Reward:
    """One reward from a config list: a single spec as is (weight 1), otherwise their weighted sum."""
    if not specs:
        raise GenrewardError("the config lists no reward; add at least one under 'reward'")
    if len(specs) == 1 and specs[0].weight == 1.0:
        return build_from_spec(specs[0])
    return WeightedSum([build_from_spec(s) for s in specs], [s.weight for s in specs], name=name)


class WeightedSum:
    """Composition: score = Σ_k w_k · r_k. Details keep each component's score under its name.

    Every component gets the full call context (``update_stats``, ``gather``… included), in list order on
    every rank, so components' collectives line up across ranks.
    """

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float], name: str = "weighted_sum"):
        if len(rewards) != len(weights) or not rewards:
            raise GenrewardError("weighted_sum needs one weight per reward and at least one reward")
        self.rewards = list(rewards)
        self.weights = [float(w) for w in weights]
        self.name = name
        self.differentiable = all(r.differentiable for r in self.rewards)

    def state_dict(self) -> dict[str, Any]:
        """States of stateful components (running statistics, reference caches), for checkpoints."""
        return {str(i): r.state_dict() for i, r in enumerate(self.rewards) if hasattr(r, "state_dict")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, r in enumerate(self.rewards):
            if str(i) in state and hasattr(r, "load_state_dict"):
                r.load_state_dict(state[str(i)])

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        total = None
        details: dict[str, torch.Tensor] = {}
        for reward, weight in zip(self.rewards, self.weights):
            out = reward(images, prompts, **context)
            details[reward.name] = out.scores
            for key, value in out.details.items():
                details[f"{reward.name}/{key}"] = value
            term = weight * out.scores.float()
            total = term if total is None else total + term.to(total.device)
        return RewardOutput(scores=total, details=details)


@register("weighted_sum")
def _weighted_sum(components: Sequence[dict[str, Any]], name: str = "weighted_sum") -> WeightedSum:
    """Config form: ``{name: weighted_sum, options: {components: [{name, options, weight}, ...]}}``."""
    specs = [RewardSpec(**c) if isinstance(c, dict) else c for c in components]
    return WeightedSum([build_from_spec(s) for s in specs], [s.weight for s in specs], name=name)


def spec_from_dict(data: dict[str, Any]) -> RewardSpec:
    known = {f.name for f in dataclasses.fields(RewardSpec)}
    unknown = set(data) - known
    if unknown:
        raise GenrewardError(f"reward entry has unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
    return RewardSpec(**data)
