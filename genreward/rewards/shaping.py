"""Reward shaping: wrappers that transform another reward's scores before a trainer sees them.

Spec: docs/algorithms/shaping.md. Each registered shaping wraps an *inner* reward, given in a
config as ``reward: {name, options}`` (the same form as a trainer's ``reward:`` entries), and keeps the
inner score under ``details["raw"]``:

* ``meanstd`` — running per-prompt (or global) normalisation (r − mean)/(std + eps) (§2, PAR repo baseline);
* ``par`` — Preference As Reward, mean of σ(k·(r − r_ref^m)) over M reference images of the frozen
  reference model, or the PAR repo's ``lsc`` log σ(k·(r − r85)) (§2);
* ``goal_baseline`` — VLM-RM's CLIP reward with goal–baseline projection (§1); it is a CLIP reward
  itself rather than a wrapper, since it needs the image embedding, not a scalar score;
* ``clamp`` — min(max(r, low), high), the PAR repo's reward ceiling generalised to both sides.

The maths lives in pure tensor functions (``par_reward``, ``lsc_reward``, ``goal_baseline_reward``, …)
so it can be tested on small tensors; the classes only add state (running moments, reference caches)
and model loading. A shaping is differentiable exactly when its inner reward is: every transform here
is (sub)differentiable in r and treats statistics and reference scores as constants.
"""

from __future__ import annotations

import hashlib
import logging
import math
from statistics import NormalDist
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from genreward.errors import GenrewardError
from genreward.models.clip import ClipModel, TextEmbeddingCache, load_clip
from genreward.rewards.base import (
    Reward,
    RewardOutput,
    RewardSpec,
    WeightedSum,
    build_from_spec,
    check_batch,
    register,
    spec_from_dict,
)

log = logging.getLogger("genreward.rewards")

NORMAL_85TH_PERCENTILE = NormalDist().inv_cdf(0.85)  # 1.03643…: r85 of a normal fit to the reference rewards

__all__ = [
    "NORMAL_85TH_PERCENTILE",
    "merge_moments",
    "moments_mean_std",
    "meanstd_normalize",
    "par_reward",
    "lsc_reward",
    "reference_percentile_85",
    "reference_seed",
    "goal_baseline_reward",
    "goal_baseline_reward_affine",
    "goal_baseline_matrix",
    "clamp_reward",
    "MeanStd",
    "PreferenceAsReward",
    "GoalBaseline",
    "Clamp",
]


# ============================================================================================ pure maths


Moments = tuple[int, float, float]  # (count, mean, M2 = Σ (v − mean)²), plain Python for checkpoints


def merge_moments(moments: Moments, values: torch.Tensor) -> Moments:
    """Fold a batch into running (count, mean, M2) with Chan et al.'s parallel Welford update.

    Exact for any batching (the result equals the moments of all values seen so far) and numerically
    stable; non-finite values are skipped so one bad reward cannot poison a prompt's statistics.
    """
    flat = values.detach().double().reshape(-1)
    flat = flat[torch.isfinite(flat)]
    count, mean, m2 = moments
    n = int(flat.numel())
    if n == 0:
        return moments
    batch_mean = float(flat.mean())
    batch_m2 = float(((flat - batch_mean) ** 2).sum())
    total = count + n
    delta = batch_mean - mean
    return total, mean + delta * n / total, m2 + batch_m2 + delta * delta * count * n / total


def moments_mean_std(moments: Moments) -> tuple[float, float]:
    """(mean, population std) of running moments; (0, 1) before any value, so unseen keys pass r through."""
    count, mean, m2 = moments
    if count == 0:
        return 0.0, 1.0
    return mean, math.sqrt(max(m2, 0.0) / count)


def meanstd_normalize(r: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r − mean)/(std + eps); ``mean``/``std`` are constants (detached) so gradients reach r only."""
    return (r - mean.detach()) / (std.detach() + eps)


def _finite_reference_moments(r_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (finite mask, mean, population std) of reference rewards ``[B, M]`` over finite entries only.

    A row with no finite reference gets NaN mean/std, which makes its shaped reward NaN (an invalid
    image for the trainers) rather than silently falling back to something else.
    """
    finite = torch.isfinite(r_ref)
    n = finite.sum(dim=1).to(r_ref.dtype)
    safe = torch.where(finite, r_ref, torch.zeros_like(r_ref))
    mean = safe.sum(dim=1) / n
    centred = torch.where(finite, r_ref - mean[:, None], torch.zeros_like(r_ref))
    std = (centred**2).sum(dim=1).div(n).sqrt()
    return finite, mean, std


def _check_references(r: torch.Tensor, r_ref: torch.Tensor) -> torch.Tensor:
    """``r_ref`` as ``[B, M]`` (a ``[B]`` tensor is one reference); M = 0 is an error (see ``par``)."""
    if r.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(r.shape)}")
    if r_ref.ndim == 1:
        r_ref = r_ref[:, None]
    if r_ref.ndim != 2 or r_ref.shape[0] != r.shape[0]:
        raise GenrewardError(f"reference rewards must be [B, M] with B={r.shape[0]}, got shape {tuple(r_ref.shape)}")
    if r_ref.shape[1] == 0:
        raise GenrewardError("PAR needs at least one reference reward per image (M >= 1), got M = 0")
    return r_ref


def par_reward(r: torch.Tensor, r_ref: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Preference As Reward: (1/M) Σ_m σ(k·(r − r_ref^m)), r ``[B]``, r_ref ``[B, M]`` → ``[B]`` in (0, 1).

    The Bradley–Terry probability that the sample beats the reference sample(s); only finite references
    count in the mean. Gradients flow to r; references are constants.
    """
    r_ref = _check_references(r, r_ref).detach().to(r.dtype)
    finite, _, _ = _finite_reference_moments(r_ref)
    probs = torch.sigmoid(scale * (r[:, None] - torch.where(finite, r_ref, torch.zeros_like(r_ref))))
    probs = torch.where(finite, probs, torch.zeros_like(probs))
    return probs.sum(dim=1) / finite.sum(dim=1).to(r.dtype)


def reference_percentile_85(r_ref: torch.Tensor) -> torch.Tensor:
    """r85 = mean + Φ⁻¹(0.85)·std of each row of ``[B, M]`` (population std, as the PAR repo; M = 1 → r_ref)."""
    _, mean, std = _finite_reference_moments(r_ref)
    return mean + NORMAL_85TH_PERCENTILE * std


def lsc_reward(r: torch.Tensor, r_ref: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Log-sigmoid-centred reward log σ(k·(r − r85)) ≤ 0 (PAR repo's ``lsc``), r ``[B]``, r_ref ``[B, M]``."""
    r_ref = _check_references(r, r_ref).detach().to(r.dtype)
    return F.logsigmoid(scale * (r - reference_percentile_85(r_ref)))


def reference_seed(seed: int, prompt: str, m: int) -> int:
    """Seed of reference image m of ``prompt``: a hash of (seed, m, prompt), reproducible across processes
    and runs (Python's ``hash`` is salted per process) and unrelated to the trainer's sample seeds."""
    digest = hashlib.sha256(f"{int(seed)}\x1f{int(m)}\x1f{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _gb_direction(g: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    d = g - b
    return d, (d * d).sum(dim=-1, keepdim=True).clamp_min(eps)


def goal_baseline_reward(
    x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, alpha: float, eps: float = 1e-12
) -> torch.Tensor:
    """VLM-RM reward R_α(x) = 1 − ½‖M_α(x − g)‖², M_α = αP + (1−α)I, P = ddᵀ/‖d‖², d = g − b.

    ``x``, ``g``, ``b`` ``[..., D]`` (broadcast); returns ``[...]``. M_α is applied as an operator
    (P y = (d·y/‖d‖²) d) so a per-prompt g, b never materialises a D×D matrix per image. ‖d‖² is
    floored at ``eps``: with g = b the projection term vanishes (callers reject that case for α > 0).
    """
    d, dd = _gb_direction(g, b, eps)
    y = x - g
    projected = (y * d).sum(dim=-1, keepdim=True) / dd * d
    my = alpha * projected + (1.0 - alpha) * y
    return 1.0 - 0.5 * (my * my).sum(dim=-1)


def goal_baseline_reward_affine(
    x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, alpha: float, eps: float = 1e-12
) -> torch.Tensor:
    """The paper's form 1 − ½‖α·proj_L(x) + (1−α)·x − g‖², proj_L = orthogonal projection onto the line
    through b and g (anchored at b here, so agreeing with :func:`goal_baseline_reward` is a real check)."""
    d, dd = _gb_direction(g, b, eps)
    on_line = b + ((x - b) * d).sum(dim=-1, keepdim=True) / dd * d
    diff = alpha * on_line + (1.0 - alpha) * x - g
    return 1.0 - 0.5 * (diff * diff).sum(dim=-1)


def goal_baseline_matrix(g: torch.Tensor, b: torch.Tensor, alpha: float, eps: float = 1e-12) -> torch.Tensor:
    """The explicit M_α = α ddᵀ/‖d‖² + (1−α) I ``[..., D, D]`` of the VLM-RM code (for checks and small D)."""
    d, dd = _gb_direction(g, b, eps)
    eye = torch.eye(d.shape[-1], dtype=d.dtype, device=d.device)
    return alpha * (d[..., :, None] * d[..., None, :]) / dd[..., None] + (1.0 - alpha) * eye


def clamp_reward(r: torch.Tensor, low: float | None = None, high: float | None = None) -> torch.Tensor:
    """min(max(r, low), high) with either bound optional; zero gradient outside the bounds."""
    if low is not None:
        r = torch.clamp(r, min=low)
    if high is not None:
        r = torch.clamp(r, max=high)
    return r


# ============================================================================================== wrappers


def build_inner(reward: Any, owner: str) -> Reward:
    """The wrapped reward from a config dict ``{name, options[, weight, label]}``, a spec, or a built reward.

    A weight other than 1 scales the inner score before shaping (it matters: it is PAR's temperature).
    """
    if reward is None:
        raise GenrewardError(f"reward {owner!r} needs option 'reward': the reward to shape, as {{name: ..., options: {{...}}}}")
    if isinstance(reward, dict):
        reward = spec_from_dict(reward)
    if isinstance(reward, RewardSpec):
        built = build_from_spec(reward)
        if reward.weight != 1.0:
            built = WeightedSum([built], [reward.weight], name=built.name)
        return built
    if callable(reward) and hasattr(reward, "name"):
        return reward
    raise GenrewardError(f"reward {owner!r} option 'reward' must be {{name: ..., options: {{...}}}}, got {type(reward).__name__}")


def _number(value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise GenrewardError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise GenrewardError(f"{what} must be finite, got {value!r}")
    return out


class _Shaping:
    """Common plumbing: the inner reward, ``raw``/inner details, and nested state for checkpoints."""

    registered = "shaping"

    def __init__(self, reward: Any):
        self.inner = build_inner(reward, self.registered)
        self.name = self.registered
        self.differentiable = bool(getattr(self.inner, "differentiable", False))

    def _details(self, out: RewardOutput, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
        details = {"raw": out.scores.detach().float()}
        details.update({k: v.detach() for k, v in extra.items()})
        details.update({f"{self.inner.name}/{k}": v for k, v in out.details.items()})
        return details

    def _inner_state(self) -> dict[str, Any]:
        get = getattr(self.inner, "state_dict", None)
        return {"inner": get()} if callable(get) and not isinstance(self.inner, torch.nn.Module) else {}

    def _load_inner_state(self, state: dict[str, Any]) -> None:
        load = getattr(self.inner, "load_state_dict", None)
        if "inner" in state and callable(load):
            load(state["inner"])

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (the inner reward's under ``inner``) for the trainer's checkpoint."""
        return self._inner_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_inner_state(state)


@register("meanstd")
class MeanStd(_Shaping):
    """(r − mean)/(std + eps) with running statistics per prompt string (or one global set).

    Statistics are exact running moments of *all* rewards seen so far (parallel Welford), not a window:
    O(1) state per prompt, independent of batching, and the PAR repo's choice. The current batch is
    folded in first and then normalised (the PAR repo's order), so the first batch of a prompt is
    centred on its own mean. Population std; a prompt whose rewards were all equal gives 0 (r = mean).

    Call-context keys (all optional, all forwarded unchanged to the inner reward, so nested shapings see them):

    * ``update_stats=False`` — normalise with the current statistics without folding this batch in
      (evaluation passes it, so held-out images never reach the training statistics); no gather happens.
    * ``gather`` — ``Callable[[Tensor], Tensor]`` concatenating a 1-D tensor over all ranks in rank order
      (``accelerator.gather``); ``gather_prompts`` — ``Callable[[list[str]], list[str]]``, the same for the
      prompts (``accelerate.utils.gather_object``). With them the statistics are updated with the scores
      of *every* rank, so all ranks hold identical statistics (only rank 0's are checkpointed), while only
      the local batch is normalised and returned. Every rank must make the call (they are collectives).
      ``per_prompt=true`` needs both; ``per_prompt=false`` needs only ``gather``. Without them: local stats.
    """

    registered = "meanstd"

    def __init__(self, reward: Any = None, per_prompt: bool = True, eps: float = 1e-6):
        super().__init__(reward)
        if not isinstance(per_prompt, bool):
            raise GenrewardError(f"meanstd option per_prompt must be true or false, got {per_prompt!r}")
        self.per_prompt = per_prompt
        self.eps = _number(eps, "meanstd option eps")
        if self.eps < 0:
            raise GenrewardError(f"meanstd option eps must be >= 0, got {eps!r}")
        self.stats: dict[str, Moments] = {}

    def _keys(self, prompts: Sequence[str], batch: int) -> list[str]:
        if not self.per_prompt:
            return [""] * batch
        if isinstance(prompts, str) or len(prompts) != batch:
            got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise GenrewardError(f"meanstd with per_prompt=true needs one prompt per image: {batch} images, {got}")
        return [str(p) for p in prompts]

    def _all_ranks(self, r: torch.Tensor, keys: list[str], context: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
        """The scores and keys to fold in: the local batch, or every rank's (rank order) when ``gather`` is given."""
        gather, gather_prompts = context.get("gather"), context.get("gather_prompts")
        if gather is None and gather_prompts is None:
            return r, keys
        if gather is None:
            raise GenrewardError("meanstd got gather_prompts but no gather in the call context; pass both (or neither)")
        values = torch.as_tensor(gather(r.reshape(-1))).reshape(-1)
        if not self.per_prompt:
            return values, [""] * values.numel()
        if gather_prompts is None:
            raise GenrewardError("meanstd with per_prompt=true needs gather_prompts next to gather in the call context")
        all_keys = [str(p) for p in gather_prompts(list(keys))]
        if len(all_keys) != values.numel():
            raise GenrewardError(f"meanstd: gather returned {values.numel()} scores but gather_prompts {len(all_keys)} prompts")
        return values, all_keys

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        update = bool(context.get("update_stats", True))
        out = self.inner(images, prompts, **context)
        r = out.scores
        keys = self._keys(prompts, r.shape[0])
        if update:
            values, all_keys = self._all_ranks(r.detach(), keys, context)
            for key in dict.fromkeys(all_keys):
                rows = torch.tensor([k == key for k in all_keys], device=values.device)
                self.stats[key] = merge_moments(self.stats.get(key, (0, 0.0, 0.0)), values[rows])
        pairs = [moments_mean_std(self.stats.get(k, (0, 0.0, 0.0))) for k in keys]
        mean = torch.tensor([p[0] for p in pairs], dtype=torch.float64, device=r.device)
        std = torch.tensor([p[1] for p in pairs], dtype=torch.float64, device=r.device)
        scores = meanstd_normalize(r.double(), mean, std, self.eps).to(torch.float32)
        return RewardOutput(scores=scores, details=self._details(out, mean=mean.float(), std=std.float()))

    def get_stats(self) -> dict[str, dict[str, float]]:
        """Per-key running mean, std and count (for logging); the global key is ''."""
        out = {}
        for key, moments in self.stats.items():
            mean, std = moments_mean_std(moments)
            out[key] = {"mean": mean, "std": std, "count": moments[0]}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "per_prompt": self.per_prompt,
            "stats": {key: [int(c), float(m), float(m2)] for key, (c, m, m2) in self.stats.items()},
            **self._inner_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore running moments; refuses stats saved with the other ``per_prompt`` setting."""
        if bool(state["per_prompt"]) != self.per_prompt:
            raise GenrewardError(
                f"meanstd state was saved with per_prompt={state['per_prompt']} but this reward has per_prompt={self.per_prompt}"
            )
        self.stats = {str(k): (int(v[0]), float(v[1]), float(v[2])) for k, v in state["stats"].items()}
        self._load_inner_state(state)


PAR_MODES = ("sigmoid", "lsc")


@register("par")
class PreferenceAsReward(_Shaping):
    """PAR: the inner reward's preference probability of each image over M reference images.

    References are generated by the frozen reference pipeline (loaded on first use, so ``build`` is cheap)
    for each new prompt, scored by the inner reward once and cached (prompt → M floats, kept for the whole
    run and in :meth:`state_dict`). Reference m of a prompt uses seed :func:`reference_seed`(seed, prompt, m).
    A call may pass ``reference_rewards=[B, M]`` to skip generation. References are scored with
    ``update_stats=False`` (a stateful inner reward keeps only policy samples). ``references=0`` is refused: the PAR
    code silently returns the raw reward then, which would change the reward's scale without notice.
    """

    registered = "par"

    def __init__(
        self,
        reward: Any = None,
        references: int = 1,
        mode: str = "sigmoid",
        scale: float = 1.0,
        pipeline: Any = "tiny:sd",
        num_steps: int = 50,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        negative_prompt: str = "",
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        device: str | torch.device | None = "auto",
        dtype: str = "fp32",
    ):
        super().__init__(reward)
        if isinstance(references, bool) or not isinstance(references, int) or references < 1:
            raise GenrewardError(
                f"par option references must be an integer >= 1, got {references!r} "
                "(M = 0 would fall back to the raw reward; use the inner reward directly instead)"
            )
        if mode not in PAR_MODES:
            raise GenrewardError(f"par option mode must be one of {', '.join(PAR_MODES)}, got {mode!r}")
        self.scale = _number(scale, "par option scale")
        if self.scale <= 0:
            raise GenrewardError(f"par option scale must be > 0 (it is k in sigmoid(k*(r - r_ref))), got {scale!r}")
        for what, value in (("num_steps", num_steps), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenrewardError(f"par option {what} must be an integer >= 1, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise GenrewardError(f"par option seed must be an integer, got {seed!r}")
        self.references = references
        self.mode = mode
        self.num_steps = num_steps
        self.guidance_scale = _number(guidance_scale, "par option guidance_scale")
        self.eta = _number(eta, "par option eta")
        if self.eta < 0:
            raise GenrewardError(f"par option eta must be >= 0, got {eta!r}")
        self.negative_prompt = str(negative_prompt)
        self.height, self.width = height, width
        self.seed = seed
        self.batch_size = batch_size
        self.device, self.dtype = device, dtype
        self._pipeline_spec = pipeline if isinstance(pipeline, str) else None
        self._pipe = None if isinstance(pipeline, str) else pipeline
        self.cache: dict[str, list[float]] = {}
        self.num_generated = 0  # reference images generated so far (for logging and tests)

    @property
    def pipe(self) -> Any:
        """The frozen reference pipeline, loaded on first use."""
        if self._pipe is None:
            from genreward.models.pipeline import load_pipeline

            self._pipe = load_pipeline(self._pipeline_spec, device=self.device, dtype=self.dtype)
        return self._pipe

    def _settings(self) -> dict[str, Any]:
        """What the cached reference rewards depend on; a saved cache is reused only if these match."""
        return {
            "inner": self.inner.name,
            "references": self.references,
            "pipeline": self._pipeline_spec,
            "num_steps": self.num_steps,
            "guidance_scale": self.guidance_scale,
            "eta": self.eta,
            "negative_prompt": self.negative_prompt,
            "height": self.height,
            "width": self.width,
            "seed": self.seed,
        }

    def _generate(self, prompts: list[str], context: dict[str, Any]) -> None:
        """Generate and score M reference images for each new prompt; cache their rewards."""
        from genreward.sampling import sample_trajectories

        flat = [(p, m) for p in prompts for m in range(self.references)]
        scores: list[float] = []
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start : start + self.batch_size]
            texts = [p for p, _ in chunk]
            traj = sample_trajectories(
                self.pipe,
                texts,
                num_steps=self.num_steps,
                guidance_scale=self.guidance_scale,
                eta=self.eta,
                negative_prompt=self.negative_prompt,
                seeds=[reference_seed(self.seed, p, m) for p, m in chunk],
                height=self.height,
                width=self.width,
            )
            ctx = {k: [v[p] for p in texts] for k, v in context.items()}
            # References are not policy samples, and each rank generates them only for prompts new to its own
            # cache (ranks do so at different times): a stateful inner reward must neither fold them into its
            # statistics nor gather (that would desync the ranks' statistics or deadlock the collective).
            with torch.no_grad():
                out = self.inner(traj.images, texts, update_stats=False, **ctx)
            scores.extend(float(s) for s in out.scores.detach().float().cpu())
            self.num_generated += len(chunk)
        for i, prompt in enumerate(prompts):
            self.cache[prompt] = scores[i * self.references : (i + 1) * self.references]

    def reference_rewards(self, prompts: Sequence[str], metadata: Sequence[Any] | None = None) -> torch.Tensor:
        """Cached reference rewards ``[B, M]`` (float32, CPU) of each prompt, generating missing ones."""
        prompts = [str(p) for p in prompts]
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            context: dict[str, Any] = {}
            if metadata is not None and len(metadata) == len(prompts):
                first: dict[str, Any] = {}
                for prompt, meta in zip(prompts, metadata):
                    first.setdefault(prompt, meta)
                context["metadata"] = first  # a reference image shares its prompt's (first) metadata
            self._generate(missing, context)
        return torch.tensor([self.cache[p] for p in prompts], dtype=torch.float32).reshape(len(prompts), -1)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        given = context.pop("reference_rewards", None)
        out = self.inner(images, prompts, **context)
        r = out.scores
        if isinstance(prompts, str) or len(prompts) != r.shape[0]:
            got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise GenrewardError(f"par needs one prompt per image: {r.shape[0]} images, {got}")
        if given is None:
            r_ref = self.reference_rewards(prompts, context.get("metadata"))
        else:
            r_ref = torch.as_tensor(given)
        r_ref = _check_references(r, r_ref).to(device=r.device, dtype=torch.float32)
        shape = par_reward if self.mode == "sigmoid" else lsc_reward
        scores = shape(r.float(), r_ref, self.scale)
        _, ref_mean, _ = _finite_reference_moments(r_ref)
        return RewardOutput(scores=scores, details=self._details(out, reference_mean=ref_mean))

    def state_dict(self) -> dict[str, Any]:
        """The reference cache and the settings it was made with (so a resumed run does not regenerate)."""
        return {"settings": self._settings(), "cache": {p: list(v) for p, v in self.cache.items()}, **self._inner_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Reuse a saved cache only when it was made with the same reference settings; else regenerate."""
        if state.get("settings") == self._settings():
            self.cache = {str(p): [float(x) for x in v] for p, v in state["cache"].items()}
        else:
            log.warning("par: saved reference rewards were made with other settings; they will be regenerated")
            self.cache = {}
        self._load_inner_state(state)


@register("goal_baseline")
class GoalBaseline:
    """VLM-RM's CLIP reward R_α(x) = 1 − ½‖M_α(x − g)‖² (see :func:`goal_baseline_reward`).

    g = mean normalised text embedding of the goal texts (the generation prompt unless
    ``include_prompt=false``, plus ``goals``), b = the same for ``baseline``; in both lists ``{prompt}``
    is replaced by the generation prompt. Not re-normalised after averaging, as in the VLM-RM code.
    α = 0 with the prompt as the only goal is the plain CLIP cosine; α = 1 keeps only the component of
    x − g along the goal–baseline direction. Differentiable w.r.t. the pixels.
    """

    differentiable = True

    def __init__(
        self,
        model: str = "tiny:clip",
        alpha: float = 0.5,
        baseline: Sequence[str] | str = ("a photo",),
        goals: Sequence[str] | str = (),
        include_prompt: bool = True,
        backend: str = "auto",
        device: str | torch.device | None = None,
        dtype: str = "fp32",
    ):
        self.alpha = _number(alpha, "goal_baseline option alpha")
        if not 0.0 <= self.alpha <= 1.0:
            raise GenrewardError(f"goal_baseline option alpha must be in [0, 1], got {alpha!r}")
        self.baseline = self._texts_option(baseline, "baseline")
        self.goals = self._texts_option(goals, "goals")
        if not self.baseline:
            raise GenrewardError("goal_baseline option baseline needs at least one text, e.g. ['a photo']")
        if not isinstance(include_prompt, bool):
            raise GenrewardError(f"goal_baseline option include_prompt must be true or false, got {include_prompt!r}")
        if not include_prompt and not self.goals:
            raise GenrewardError("goal_baseline with include_prompt=false needs at least one text in option goals")
        self.include_prompt = include_prompt
        self.name = "goal_baseline"
        self.clip: ClipModel = load_clip(model, backend=backend, device=device, dtype=dtype)
        self._texts = TextEmbeddingCache(self.clip)

    @staticmethod
    def _texts_option(value: Sequence[str] | str, what: str) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise GenrewardError(f"goal_baseline option {what} must be a list of non-empty strings, got {value!r}")
        return texts

    def goal_and_baseline(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, b) ``[D]`` for one prompt: means of normalised, cached text embeddings."""
        goals = ([prompt] if self.include_prompt else []) + [t.replace("{prompt}", prompt) for t in self.goals]
        baseline = [t.replace("{prompt}", prompt) for t in self.baseline]
        g, b = self._texts(goals).mean(dim=0), self._texts(baseline).mean(dim=0)
        if self.alpha > 0 and torch.linalg.vector_norm(g - b) < 1e-6:
            raise GenrewardError(
                f"goal_baseline: goal and baseline embeddings coincide for prompt {prompt!r}; use another baseline"
            )
        return g, b

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        check_batch("goal_baseline", images, prompts)
        if images.shape[0] == 0:
            return RewardOutput(scores=torch.zeros(0, device=images.device))
        per_prompt = {p: self.goal_and_baseline(p) for p in dict.fromkeys(prompts)}
        g = torch.stack([per_prompt[p][0] for p in prompts])
        b = torch.stack([per_prompt[p][1] for p in prompts])
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            x = self.clip.embed_images(images.to(self.clip.device))
            g, b = g.to(x.device), b.to(x.device)
            scores = goal_baseline_reward(x, g, b, self.alpha).to(device=images.device, dtype=torch.float32)
        cosine = (x.detach() * F.normalize(g, dim=-1)).sum(dim=-1)
        return RewardOutput(scores=scores, details={"goal_cosine": cosine.to(images.device, torch.float32)})


@register("clamp")
class Clamp(_Shaping):
    """min(max(r, low), high): a floor and/or ceiling on the inner reward (the PAR repo's ``reward_ceil``)."""

    registered = "clamp"

    def __init__(self, reward: Any = None, low: float | None = None, high: float | None = None):
        super().__init__(reward)
        self.low = None if low is None else _number(low, "clamp option low")
        self.high = None if high is None else _number(high, "clamp option high")
        if self.low is None and self.high is None:
            raise GenrewardError("clamp needs option low, high or both")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise GenrewardError(f"clamp option low ({low}) must be <= high ({high})")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        out = self.inner(images, prompts, **context)
        raw = out.scores.float()
        scores = clamp_reward(raw, self.low, self.high)
        below = raw.detach() < self.low if self.low is not None else torch.zeros_like(raw, dtype=torch.bool)
        above = raw.detach() > self.high if self.high is not None else torch.zeros_like(raw, dtype=torch.bool)
        clamped = (below | above).float()
        return RewardOutput(scores=scores, details=self._details(out, clamped=clamped))
