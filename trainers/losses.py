"""Pure tensor losses for reward fine-tuning: PRDP's clipped RDP loss and the DDPO PPO surrogate.

Specs: docs/algorithms/prdp.md §3–4, §8–9 (RDP loss, App. G conventions, two-pass gradient) and
docs/algorithms/ddpo.md §5 (PPO surrogate, per-prompt advantage tracking). Nothing here touches a
model: callers pass per-step log-ratios / log-probs and rewards, so every function can be checked
against autograd and closed forms on small tensors.

Conventions fixed here (documented once, used by every function):

* Ties between branches. The per-pair loss is max(u, v); the clipped branch v is taken only where v > u
  strictly, so a tie goes to the unclipped branch u. At the first gradient step of an epoch a = o, every
  step is strictly inside its clip interval (ε > 0) and u = v exactly, so both branches give the same
  gradient; picking u also keeps the gradient alive in the ε = 0 corner. The autograd loss uses the same
  rule (``torch.where``, not ``torch.maximum``, which would split the gradient on ties).
* Clip interval. A step is "inside" when o − ε < a < o + ε strictly; only inside steps pass gradient
  through the clipped branch (clamp has zero slope outside and we take zero slope on the boundary too).
* Empty groups. A prompt with no ordered pair (all rewards equal, or < 2 valid images) contributes 0 and
  still counts in the mean over the N prompts, as the App. G JAX code (masked mean per prompt, then mean
  over all prompts) does.
* Invalid images. Images with non-finite rewards, or with ``valid`` False, take part in no pair; their
  rewards and log-ratios are replaced by 0 before any arithmetic so NaN/inf cannot leak into the loss or
  its gradient.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal, NamedTuple, Sequence

import numpy as np
import torch

from genreward.errors import GenrewardError
from genreward.sampling import reduce_elements

Reduction = Literal["mean", "sum"]

__all__ = [
    "RDPPairTerms",
    "rdp_pair_terms",
    "rdp_loss",
    "rdp_step_weights",
    "ddpo_loss",
    "PerPromptStatTracker",
    "batch_advantages",
    "logratio_from_means",
]


class RDPPairTerms(NamedTuple):
    """Per-pair quantities of the clipped RDP loss for one batch (shapes for N prompts, B images, T steps).

    ``res_u``/``res_v`` [N, B, B]: residual (A_i − A_j − y_ij) of the unclipped / clipped prediction for the
    ordered pair (i, j); ``pair_mask`` [N, B, B]: True where i, j are valid and r_i > r_j; ``inside`` [N, B, T]:
    step strictly inside its clip interval; ``valid`` [N, B]: image takes part in pairs.
    """

    res_u: torch.Tensor
    res_v: torch.Tensor
    pair_mask: torch.Tensor
    inside: torch.Tensor
    valid: torch.Tensor


def _check_rdp_args(
    logratio: torch.Tensor, old_logratio: torch.Tensor, rewards: torch.Tensor, beta: float, clip_eps: float, reduction: str
) -> None:
    if logratio.ndim != 3:
        raise ValueError(f"logratio must be [N, B, T], got shape {tuple(logratio.shape)}")
    if old_logratio.shape != logratio.shape:
        raise ValueError(f"old_logratio shape {tuple(old_logratio.shape)} != logratio shape {tuple(logratio.shape)}")
    if tuple(rewards.shape) != tuple(logratio.shape[:2]):
        raise ValueError(f"rewards must be [N, B] = {tuple(logratio.shape[:2])}, got {tuple(rewards.shape)}")
    if not (beta > 0 and math.isfinite(beta)):
        raise GenrewardError(f"PRDP beta must be a positive finite number, got {beta}")
    if not clip_eps >= 0:
        raise GenrewardError(f"PRDP clip_eps must be >= 0 (inf disables clipping), got {clip_eps}")
    if reduction not in ("mean", "sum"):
        raise GenrewardError(f"PRDP reduction over timesteps must be 'mean' or 'sum', got '{reduction}'")


def rdp_pair_terms(
    logratio: torch.Tensor,
    old_logratio: torch.Tensor,
    rewards: torch.Tensor | np.ndarray,
    beta: float,
    clip_eps: float,
    reduction: Reduction = "mean",
    valid: torch.Tensor | None = None,
) -> RDPPairTerms:
    """Residuals of both branches for every ordered pair (differentiable in ``logratio``).

    a = ``logratio`` (log π_θ − log π_ref per step), o = ``old_logratio`` (detached), c = clip(a, o−ε, o+ε);
    A, C = mean (App. G) or sum (Eq. 19–21) over T; y_ij = (r_i − r_j)/β; res_u = A_i − A_j − y_ij,
    res_v = C_i − C_j − y_ij. Computed in at least fp32.
    """
    rewards = torch.as_tensor(rewards, device=logratio.device)
    _check_rdp_args(logratio, old_logratio, rewards, beta, clip_eps, reduction)
    dtype = torch.promote_types(logratio.dtype, torch.float32)
    ok = torch.isfinite(rewards)
    if valid is not None:
        ok = ok & torch.as_tensor(valid, device=logratio.device, dtype=torch.bool)
    r = torch.where(ok, rewards.to(dtype), torch.zeros((), dtype=dtype, device=logratio.device))
    keep = ok[..., None]
    zero = torch.zeros((), dtype=dtype, device=logratio.device)
    a = torch.where(keep, logratio.to(dtype), zero)
    o = torch.where(keep, old_logratio.detach().to(dtype), zero)
    lo, hi = o - clip_eps, o + clip_eps
    inside = (a.detach() > lo) & (a.detach() < hi)
    # Clamp with zero slope outside (and on) the interval, identical slope to ``inside`` used analytically.
    c = torch.where(inside, a, torch.minimum(torch.maximum(a.detach(), lo), hi))
    reduce_t = (lambda x: x.mean(dim=-1)) if reduction == "mean" else (lambda x: x.sum(dim=-1))
    big_a, big_c = reduce_t(a), reduce_t(c)
    y = (r[:, :, None] - r[:, None, :]) / beta
    res_u = big_a[:, :, None] - big_a[:, None, :] - y
    res_v = big_c[:, :, None] - big_c[:, None, :] - y
    pair_mask = ok[:, :, None] & ok[:, None, :] & (r[:, :, None] > r[:, None, :])
    return RDPPairTerms(res_u=res_u, res_v=res_v, pair_mask=pair_mask, inside=inside, valid=ok)


def _active_branch(terms: RDPPairTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """(use_v [N,B,B] bool, active residual [N,B,B]): v only where v > u strictly (ties → unclipped u)."""
    use_v = terms.res_v.detach() ** 2 > terms.res_u.detach() ** 2
    return use_v, torch.where(use_v, terms.res_v, terms.res_u)


def _rdp_stats(terms: RDPPairTerms, use_v: torch.Tensor, residual: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached 0-dim diagnostics (no host sync; ``float()`` them to log)."""
    mask = terms.pair_mask
    num_pairs = mask.sum()
    denom = num_pairs.clamp(min=1).to(residual.dtype)
    steps = terms.valid[..., None].expand_as(terms.inside)
    num_steps = steps.sum().clamp(min=1).to(residual.dtype)
    return {
        "loss": loss.detach(),
        "num_pairs": num_pairs,
        "frac_clipped_branch": (use_v & mask).sum().to(residual.dtype) / denom,
        "frac_steps_clipped": (~terms.inside & steps).sum().to(residual.dtype) / num_steps,
        "mean_abs_residual": torch.where(mask, residual.detach().abs(), 0).sum() / denom,
    }


def rdp_loss(
    logratio: torch.Tensor,
    old_logratio: torch.Tensor,
    rewards: torch.Tensor | np.ndarray,
    beta: float,
    clip_eps: float,
    reduction: Reduction = "mean",
    valid: torch.Tensor | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PRDP's clipped RDP loss (prdp.md §3–4, App. G), differentiable in ``logratio``.

    Per pair (i, j) with r_i > r_j of the same prompt: l = max((A_i−A_j−y)², (C_i−C_j−y)²), y = (r_i−r_j)/β.
    Loss = mean over the N prompts of each prompt's mean over its pairs (a pairless prompt gives 0 and still
    counts). ``return_stats`` adds a dict: loss, num_pairs, frac_clipped_branch (pairs with v > u),
    frac_steps_clipped (valid steps not strictly inside [o−ε, o+ε]), mean_abs_residual (active branch).
    """
    terms = rdp_pair_terms(logratio, old_logratio, rewards, beta, clip_eps, reduction, valid)
    use_v, residual = _active_branch(terms)
    per_pair = torch.where(terms.pair_mask, residual**2, 0)
    pairs_per_prompt = terms.pair_mask.sum(dim=(1, 2)).clamp(min=1).to(per_pair.dtype)
    loss = (per_pair.sum(dim=(1, 2)) / pairs_per_prompt).mean()
    if return_stats:
        return loss, _rdp_stats(terms, use_v, residual, loss)
    return loss


@torch.no_grad()
def rdp_step_weights(
    logratio: torch.Tensor,
    old_logratio: torch.Tensor,
    rewards: torch.Tensor | np.ndarray,
    beta: float,
    clip_eps: float,
    reduction: Reduction = "mean",
    valid: torch.Tensor | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """g = ∂ rdp_loss / ∂ logratio [N, B, T], analytically and without a graph (prdp.md §4.1).

    Pass 1 of the memory-feasible exact gradient: with g from no-grad log-ratios, backpropagating
    Σ g·log π_θ chunk by chunk over timesteps (pass 2) reproduces the one-graph gradient exactly. Per pair,
    2ρ/(P_n·N) (ρ = active residual, P_n = pairs of the prompt) goes to i and its negative to j, scaled by
    1/T (mean) or 1 (sum); on the clipped branch only steps strictly inside their interval receive it.
    ``return_stats`` adds the same diagnostics as :func:`rdp_loss`.
    """
    terms = rdp_pair_terms(logratio.detach(), old_logratio, rewards, beta, clip_eps, reduction, valid)
    use_v, residual = _active_branch(terms)
    mask = terms.pair_mask
    num_prompts = logratio.shape[0]
    pairs_per_prompt = mask.sum(dim=(1, 2)).clamp(min=1).to(residual.dtype)
    coef = torch.where(mask, 2 * residual, 0) / (pairs_per_prompt[:, None, None] * num_prompts)
    coef_u = torch.where(use_v, 0, coef)
    coef_v = torch.where(use_v, coef, 0)
    # ∂l/∂A_i = +coef over pairs where i is the winner, −coef where it is the loser.
    grad_a = coef_u.sum(dim=2) - coef_u.sum(dim=1)
    grad_c = coef_v.sum(dim=2) - coef_v.sum(dim=1)
    per_step = 1.0 / logratio.shape[-1] if reduction == "mean" else 1.0
    weights = (grad_a[..., None] + grad_c[..., None] * terms.inside.to(coef.dtype)) * per_step
    if return_stats:
        per_pair = torch.where(mask, residual**2, 0)
        loss = (per_pair.sum(dim=(1, 2)) / pairs_per_prompt).mean()
        return weights, _rdp_stats(terms, use_v, residual, loss)
    return weights


def logratio_from_means(
    x_next: torch.Tensor,
    mean_theta: torch.Tensor,
    mean_ref: torch.Tensor,
    std: torch.Tensor,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Per-sample log N(x; μ_θ, σ²) − log N(x; μ_ref, σ²) without forming either density (prdp.md §7).

    a = (‖x − μ_ref‖² − ‖x − μ_θ‖²)/(2σ²), reduced over non-batch dims by mean (÷D) or sum, in at least fp32. It is
    evaluated as (μ_θ − μ_ref)·(2x − μ_θ − μ_ref)/(2σ²), which is exactly 0 when μ_θ = μ_ref and avoids the
    cancellation of two large squared distances. ``x_next`` and ``mean_ref`` are constants (detached).
    """
    dtype = torch.promote_types(mean_theta.dtype, torch.float32)
    x = x_next.detach().to(dtype)
    mu = mean_theta.to(dtype)
    mu_ref = mean_ref.detach().to(dtype)
    var2 = 2 * std.detach().to(dtype) ** 2
    elem = (mu - mu_ref) * (2 * x - mu - mu_ref) / var2
    return reduce_elements(elem, reduction)


# --------------------------------------------------------------------------------------------- DDPO


def ddpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO's clipped PPO surrogate for one timestep slot (ddpo.md §5.4).

    loss = mean(max(−A·ρ, −A·clamp(ρ, 1−ε, 1+ε))) with A clamped to ±adv_clip_max and ρ = exp(log p − log p_old).
    Stats (detached): approx_kl = ½·mean((log p − log p_old)²), clipfrac = mean(|ρ − 1| > ε), ratio (mean ρ).
    """
    return clipped_surrogate(log_prob, old_log_prob, advantages, clip_range, adv_clip_max, "DDPO")


def clipped_surrogate(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
    adv_clip_max: float, name: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO-clipped surrogate DDPO and GRPO share: loss = mean(max(−A·ρ, −A·clamp(ρ, 1−ε, 1+ε))), in at least fp32,
    with A clamped to ±adv_clip_max, ρ = exp(log p − log p_old) (old detached), and detached stats approx_kl,
    clipfrac, ratio. ``name`` labels the errors."""
    if log_prob.shape != old_log_prob.shape or log_prob.shape != advantages.shape:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and advantages "
            f"{tuple(advantages.shape)} must have the same shape"
        )
    if not clip_range >= 0:
        raise GenrewardError(f"{name} clip_range must be >= 0, got {clip_range}")
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    adv = advantages.detach().to(dtype).clamp(-adv_clip_max, adv_clip_max)
    diff = log_prob.to(dtype) - old_log_prob.detach().to(dtype)
    ratio = torch.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "approx_kl": 0.5 * (diff.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).to(dtype).mean(),
        "ratio": ratio.detach().mean(),
    }
    return loss, stats


def _to_numpy_rewards(rewards: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(rewards, torch.Tensor):
        return rewards.detach().cpu().double().numpy().reshape(-1)
    return np.asarray(rewards, dtype=np.float64).reshape(-1)


def _like_input(values: np.ndarray, rewards: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor | np.ndarray:
    """Return advantages in the caller's container: a tensor (same device, float dtype) or float64 array."""
    if isinstance(rewards, torch.Tensor):
        dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
        return torch.as_tensor(values, device=rewards.device).to(dtype).reshape(rewards.shape)
    return values


def accumulation_divisors(num_slots: int, accumulation: int) -> list[int]:
    """For each of ``num_slots`` consecutive backward passes, the size of its gradient-accumulation group.

    Groups hold ``accumulation`` passes, the last one possibly fewer; dividing each pass's loss by its own group's
    size makes every optimiser step use the mean over the passes it actually accumulated (dividing the short last
    group by the full count would shrink that step).
    """
    if num_slots < 0 or accumulation < 1:
        raise ValueError(f"accumulation_divisors: need num_slots >= 0 and accumulation >= 1, got {num_slots}, {accumulation}")
    out = []
    for start in range(0, num_slots, accumulation):
        size = min(accumulation, num_slots - start)
        out.extend([size] * size)
    return out


def batch_advantages(rewards: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor | np.ndarray:
    """Advantages with per-prompt tracking off: (r − mean)/(std + 1e-8) over the batch (population std).

    Non-finite rewards are left out of the statistics and get advantage 0 (one bad reward must not turn the
    whole batch into NaN).
    """
    r = _to_numpy_rewards(rewards)
    finite = np.isfinite(r)
    out = np.zeros_like(r)
    if finite.any():
        mean, std = r[finite].mean(), r[finite].std()
        out[finite] = (r[finite] - mean) / (std + 1e-8)
    return _like_input(out, rewards)


class PerPromptStatTracker:
    """ddpo-pytorch's per-prompt reward normalisation (ddpo.md §5.2).

    Each prompt keeps a deque of its ``buffer_size`` most recent rewards. After this batch's rewards are
    appended, a prompt whose deque holds fewer than ``min_count`` values is normalised with the mean/std of
    all rewards in the current batch, otherwise with its deque's mean/std: A = (r − mean)/(std + 1e-6)
    (population std, as numpy's default). Non-finite rewards are neither stored nor used in statistics and
    get advantage 0 (otherwise a single NaN would poison the prompt's buffer for ``buffer_size`` updates).
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 0:
            raise GenrewardError(f"per-prompt tracker needs buffer_size >= 1 and min_count >= 0, got {buffer_size}, {min_count}")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.stats: dict[str, deque[float]] = {}

    def update(
        self, prompts: Sequence[str], rewards: torch.Tensor | np.ndarray | Sequence[float]
    ) -> torch.Tensor | np.ndarray:
        """Append the batch's rewards and return their advantages (same container as ``rewards``)."""
        r = _to_numpy_rewards(rewards)
        prompts = [str(p) for p in prompts]  # plain str keys (numpy str_ would not survive a safe checkpoint load)
        if len(prompts) != r.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {r.shape[0]} rewards")
        finite = np.isfinite(r)
        batch_mean = r[finite].mean() if finite.any() else 0.0
        batch_std = r[finite].std() if finite.any() else 0.0
        prompt_array = np.asarray(prompts, dtype=object)
        advantages = np.zeros_like(r)
        for prompt in dict.fromkeys(prompts):
            rows = (prompt_array == prompt) & finite
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(r[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = np.asarray(buffer, dtype=np.float64)
                mean, std = values.mean(), values.std()
            advantages[rows] = (r[rows] - mean) / (std + 1e-6)
        return _like_input(advantages, rewards)

    def get_stats(self) -> dict[str, dict[str, float]]:
        """Per-prompt buffer mean, std and count (for logging)."""
        return {
            prompt: {
                "mean": float(np.mean(buffer)) if buffer else float("nan"),
                "std": float(np.std(buffer)) if buffer else float("nan"),
                "count": len(buffer),
            }
            for prompt, buffer in self.stats.items()
        }

    def state_dict(self) -> dict:
        """Plain-Python state (ints, floats, lists) so it can go into a checkpoint."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "stats": {str(prompt): [float(v) for v in buffer] for prompt, buffer in self.stats.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore buffers saved by :meth:`state_dict` (the saved sizes win over the constructor's)."""
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.stats = {
            str(prompt): deque((float(v) for v in values), maxlen=self.buffer_size) for prompt, values in state["stats"].items()
        }


# --------------------------------------------------------------------------------------------- Flow-GRPO
# Spec: docs/algorithms/flow_grpo.md §6 (group advantages, clipped ratio loss, KL to the base model).

__all__ += ["group_advantages", "nonzero_advantage_mask", "grpo_loss", "flow_kl"]


def group_advantages(
    rewards: torch.Tensor | np.ndarray | Sequence[float],
    group_ids: Sequence | torch.Tensor | np.ndarray | None,
    global_std: bool = False,
    eps: float = 1e-4,
    clip: float | None = 5.0,
) -> torch.Tensor | np.ndarray:
    """Flow-GRPO advantages A = (r − mean_group)/(std + eps), clipped to ±``clip`` (flow_grpo.md §6.1).

    ``group_ids`` (one hashable per reward: prompt text or an id; None = one group) defines the groups, gathered
    over every rank. std is the population std of the group, or of all of the epoch's rewards with
    ``global_std`` (the SD3 configs). A group whose rewards are all equal gets A = 0 exactly (so it can be
    filtered by :func:`nonzero_advantage_mask`), also under ``global_std``. Non-finite rewards are left out of
    every statistic and get A = 0. Statistics in float64; returned in the caller's container.
    """
    r = _to_numpy_rewards(rewards)
    if group_ids is None:
        keys: list = [0] * r.shape[0]
    elif isinstance(group_ids, (torch.Tensor, np.ndarray)):
        keys = np.asarray(group_ids.detach().cpu() if isinstance(group_ids, torch.Tensor) else group_ids).reshape(-1).tolist()
    else:
        keys = list(group_ids)
    if len(keys) != r.shape[0]:
        raise ValueError(f"got {len(keys)} group ids for {r.shape[0]} rewards")
    if not eps > 0:
        raise GenrewardError(f"advantage eps must be > 0, got {eps}")
    finite = np.isfinite(r)
    out = np.zeros_like(r)
    if not finite.any():
        return _like_input(out, rewards)
    epoch_std = r[finite].std()
    rows_of: dict = {}
    for k, key in enumerate(keys):
        if finite[k]:
            rows_of.setdefault(key, []).append(k)
    for rows in rows_of.values():
        values = r[rows]
        if values.max() == values.min():
            continue  # constant group (or a single sample): no signal, exactly 0
        std = epoch_std if global_std else values.std()
        out[rows] = (values - values.mean()) / (std + eps)
    if clip is not None:
        out = np.clip(out, -clip, clip)
    return _like_input(out, rewards)


def nonzero_advantage_mask(
    advantages: torch.Tensor, num_batches: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Flow-GRPO's sample filter (flow_grpo.md §6.2): keep samples whose advantage is not exactly 0 (over all
    steps for [B, T]); if the kept count is not a multiple of ``num_batches``, re-add randomly chosen dropped
    samples until it is (when enough were dropped). Returns a bool mask [B]."""
    adv = torch.as_tensor(advantages)
    keep = adv.reshape(adv.shape[0], -1).abs().sum(dim=1) != 0
    count = int(keep.sum())
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    if count % num_batches:
        dropped = torch.nonzero(~keep).reshape(-1)
        missing = num_batches - count % num_batches
        if dropped.numel() >= missing:
            pick = torch.randperm(dropped.numel(), generator=generator)[:missing].to(dropped.device)
            keep[dropped[pick]] = True
    return keep


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-GRPO's clipped policy loss for one trained step (flow_grpo.md §6.3).

    ρ = exp(log p − log p_old) (old detached), A clamped to ±``adv_clip_max``;
    loss = mean_b max(−A·ρ, −A·clamp(ρ, 1−ε, 1+ε)) in at least fp32. Stats (detached, 0-dim): approx_kl =
    ½·mean((log p − log p_old)²), clipfrac = mean(|ρ − 1| > ε), ratio = mean ρ.
    """
    return clipped_surrogate(log_prob, old_log_prob, advantages, clip_range, adv_clip_max, "GRPO")


def flow_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """Flow-GRPO's KL term (flow_grpo.md §6.4): mean_b [ mean_d (μ_θ − μ_ref)² / (2 s²) ].

    ``std`` is the std the step returned (per sample [B, 1, …] or [B], or a scalar): s_i for the 'sde' kernel,
    so the term is |Δ_i| times the exact Gaussian KL per element. ``mean_ref`` is detached; at least fp32.
    """
    if mean.shape != mean_ref.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and mean_ref {tuple(mean_ref.shape)} must have the same shape")
    dtype = torch.promote_types(mean.dtype, torch.float32)
    diff = mean.to(dtype) - mean_ref.detach().to(dtype)
    per_sample = reduce_elements(diff**2, "mean")
    s = torch.as_tensor(std, device=mean.device).detach().to(dtype).reshape(-1)
    if s.numel() not in (1, mean.shape[0]):
        raise ValueError(f"std must be a scalar or per sample ({mean.shape[0]}), got shape {tuple(s.shape)}")
    return (per_sample / (2 * s**2)).mean()


# --------------------------------------------------------------------------------------------- DiffusionNFT
# Spec: docs/algorithms/diffusion_nft.md §2–§4 (optimality probability, the implicit positive/negative policy loss
# in clean-sample space, the KL to the base model, conversions between ε-, v-, flow- and x0-parametrisations).

__all__ += ["nft_advantages", "optimality_probability", "nft_clean_prediction", "nft_flow_velocity", "nft_loss", "nft_kl"]


def nft_advantages(
    rewards: torch.Tensor | np.ndarray | Sequence[float],
    group_ids: Sequence | torch.Tensor | np.ndarray | None,
    eps: float = 1e-4,
) -> torch.Tensor | np.ndarray:
    """DiffusionNFT advantages (diffusion_nft.md §3.1): A = (R − mean of the prompt's rewards this epoch) /
    (population std of *all* the epoch's rewards + ``eps``), not clipped here (the loss side clips).

    This is :func:`group_advantages` with ``global_std=True`` and no clip: a group whose rewards are all equal
    (or that has one finite reward) gets A = 0 exactly; non-finite rewards get A = 0 and stay out of every
    statistic (callers must also keep them out of the loss).
    """
    return group_advantages(rewards, group_ids, global_std=True, eps=eps, clip=None)


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float = 5.0) -> torch.Tensor:
    """r = clamp((clamp(A, −C, C)/C)/2 + ½, 0, 1) with C = ``adv_clip_max`` (diffusion_nft.md §3.1).

    r ∈ [0, 1] is the probability that a sample is "optimal": A = 0 ↦ ½, A ≥ C ↦ 1, A ≤ −C ↦ 0. At least fp32;
    detached (r is data for the loss). Non-finite advantages are an error: drop those samples first.
    """
    if not adv_clip_max > 0:
        raise GenrewardError(f"NFT adv_clip_max must be > 0, got {adv_clip_max}")
    adv = torch.as_tensor(advantages).detach()
    adv = adv.to(torch.promote_types(adv.dtype, torch.float32))
    if not torch.isfinite(adv).all():
        raise GenrewardError("optimality_probability: advantages must be finite (leave samples with NaN rewards out)")
    c = float(adv_clip_max)
    return ((adv.clamp(-c, c) / c) / 2 + 0.5).clamp(0.0, 1.0)


def _per_sample_view(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Scalar or [B] → broadcastable [B, 1, …, 1] against ``like`` (same device and dtype)."""
    t = torch.as_tensor(x, device=like.device, dtype=like.dtype)
    if t.ndim == 0 or t.numel() == 1:
        return t.reshape([1] * like.ndim)
    if t.shape[0] != like.shape[0]:
        raise ValueError(f"per-sample value of shape {tuple(t.shape)} does not match a batch of {like.shape[0]}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def nft_clean_prediction(
    output: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor | float,
    sigma: torch.Tensor | float,
    prediction_type: Literal["epsilon", "v_prediction", "flow", "sample"],
) -> torch.Tensor:
    """The network output as a clean-sample prediction x̂0 (diffusion_nft.md §6), in at least fp32.

    ``x_t = alpha·x0 + sigma·ε`` (``alpha``, ``sigma`` scalars or per sample [B]): VP models have α = √ᾱ_t, σ = √(1−ᾱ_t);
    flow models α = 1 − t, σ = t. ε-prediction: x̂0 = (x_t − σ ε̂)/α; v-prediction (diffusers, v = α ε − σ x0):
    x̂0 = α x_t − σ v̂ (needs α² + σ² = 1); flow (v = ε − x0): x̂0 = x_t − σ v̂; sample: x̂0 = output. Every map is
    affine in ``output``, so mixtures with coefficients summing to 1 commute with it.
    """
    dtype = torch.promote_types(output.dtype, torch.float32)
    out, x = output.to(dtype), x_t.to(dtype)
    a, s = _per_sample_view(alpha, out), _per_sample_view(sigma, out)
    if prediction_type == "epsilon":
        return (x - s * out) / a
    if prediction_type == "v_prediction":
        return a * x - s * out
    if prediction_type == "flow":
        return x - s * out
    if prediction_type == "sample":
        return out
    raise GenrewardError(f"NFT supports epsilon, v_prediction, flow and sample outputs, not prediction_type={prediction_type!r}")


def nft_flow_velocity(x0_pred: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float) -> torch.Tensor:
    """Flow-equivalent velocity û = ε̂ − x̂0 with ε̂ = (x_t − α x̂0)/σ (diffusion_nft.md §6); for a flow model û = v̂.

    û − u = −((α+σ)/σ)(x̂0 − x0) for the true u = ε − x0: the KL and the diagnostics use this scale, so their
    values mean the same for ε-, v- and flow models.
    """
    dtype = torch.promote_types(x0_pred.dtype, torch.float32)
    x0p, x = x0_pred.to(dtype), x_t.to(dtype)
    a, s = _per_sample_view(alpha, x0p), _per_sample_view(sigma, x0p)
    return (x - a * x0p) / s - x0p


def nft_loss(
    x0_pred: torch.Tensor,
    x0_pred_old: torch.Tensor,
    x0: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    adaptive: bool = True,
    adv_clip_max: float = 5.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """DiffusionNFT's policy loss for one micro-batch and training timestep (diffusion_nft.md §3, on x̂0 per §6).

    Implicit policies (old detached): x̂0⁺ = β x̂0_θ + (1−β) x̂0_old, x̂0⁻ = (1+β) x̂0_old − β x̂0_θ.
    ``adaptive`` (the official form): w± = max(mean_d |x̂0± − x0|, 1e-5), detached, in float64;
    ℓ± = mean_d (x̂0± − x0)² / w±. Plain form (``adaptive=False``): ℓ± = mean_d (x̂0± − x0)².
    L = C · mean_b [ weight_b · (r_b ℓ⁺_b + (1 − r_b) ℓ⁻_b) / β ], C = ``adv_clip_max``.

    ``x0`` (the sampled clean latents), ``r`` [B] (:func:`optimality_probability`) and ``weight`` [B] (per-sample
    loss weights, e.g. 0 for samples left out, or ((α+σ)/σ)² to put the plain form in velocity space; default 1)
    are data (detached). β must be > 0. The KL to the base model is not included (:func:`nft_kl`).
    Returns a 0-dim tensor in at least fp32 (float64 when the weights made it so).
    """
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise GenrewardError(f"NFT beta must be a finite number > 0, got {beta!r}")
    if x0_pred.shape != x0_pred_old.shape or x0_pred.shape != x0.shape:
        raise ValueError(
            f"x0_pred {tuple(x0_pred.shape)}, x0_pred_old {tuple(x0_pred_old.shape)} and x0 {tuple(x0.shape)} must have the same shape"
        )
    batch = x0_pred.shape[0]
    dtype = torch.promote_types(x0_pred.dtype, torch.float32)
    theta = x0_pred.to(dtype)
    old = x0_pred_old.detach().to(dtype)
    target = x0.detach().to(dtype)
    rr = torch.as_tensor(r, device=theta.device).detach().to(dtype).reshape(-1)
    if rr.numel() != batch:
        raise ValueError(f"r has {rr.numel()} values for a batch of {batch}")
    b = float(beta)
    err_pos = b * theta + (1.0 - b) * old - target
    err_neg = (1.0 + b) * old - b * theta - target
    dims = tuple(range(1, theta.ndim))
    loss_pos = (err_pos**2).mean(dim=dims) if dims else err_pos**2
    loss_neg = (err_neg**2).mean(dim=dims) if dims else err_neg**2
    if adaptive:
        w_pos = (err_pos.detach().double().abs().mean(dim=dims) if dims else err_pos.detach().double().abs()).clamp(min=1e-5)
        w_neg = (err_neg.detach().double().abs().mean(dim=dims) if dims else err_neg.detach().double().abs()).clamp(min=1e-5)
        loss_pos, loss_neg = loss_pos / w_pos, loss_neg / w_neg
    per_sample = (rr.to(loss_pos.dtype) * loss_pos + (1.0 - rr.to(loss_pos.dtype)) * loss_neg) / b
    if weight is not None:
        w = torch.as_tensor(weight, device=theta.device).detach().reshape(-1)
        if w.numel() != batch:
            raise ValueError(f"weight has {w.numel()} values for a batch of {batch}")
        per_sample = per_sample * w.to(per_sample.dtype)
    return float(adv_clip_max) * per_sample.mean()


def nft_kl(velocity: torch.Tensor, velocity_ref: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL-to-base term of DiffusionNFT (diffusion_nft.md §3.7): mean_b [weight_b · mean_d (v_θ − v_ref)²].

    Pass flow-equivalent velocities (:func:`nft_flow_velocity`) to match the official velocity-space scale. On v_θ
    (not on v⁺); ``velocity_ref`` is detached; the gradient is 2(v_θ − v_ref)/(B·D). The trainer multiplies by λ_KL.
    """
    if velocity.shape != velocity_ref.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} and velocity_ref {tuple(velocity_ref.shape)} must have the same shape")
    dtype = torch.promote_types(velocity.dtype, torch.float32)
    diff = velocity.to(dtype) - velocity_ref.detach().to(dtype)
    per_sample = reduce_elements(diff**2, "mean") if diff.ndim > 1 else diff**2
    if weight is not None:
        w = torch.as_tensor(weight, device=diff.device).detach().reshape(-1)
        if w.numel() != diff.shape[0]:
            raise ValueError(f"weight has {w.numel()} values for a batch of {diff.shape[0]}")
        per_sample = per_sample * w.to(dtype)
    return per_sample.mean()
