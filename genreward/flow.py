"""Stochastic flow-matching steps with log-probabilities (Flow-GRPO, CPS, DanceGRPO) and their schedules.

Spec: docs/algorithms/flow_grpo.md §3–5. Everything here is a pure function of tensors (no pipeline, no
scheduler state): the step takes the scheduler's sigma table and an explicit step index, so a trainer that
stores step indices can recompute a log-prob whatever ``set_timesteps`` was called in between.

``flow_step_with_logprob`` is the policy π_θ(x_{i+1} | x_i, c) of one denoising step for a velocity model
(dx/dσ convention, x = (1−σ)x_0 + σε); ``flow_sigmas`` / ``scheduler_sigmas`` give the tables diffusers'
``FlowMatchEulerDiscreteScheduler`` produces for SD3.5 (static shift) and FLUX (dynamic shift);
``stochastic_steps``, ``fast_window``, ``mixgrpo_window`` and ``trained_steps`` say which steps are
stochastic and which are trained; ``flow_rollout`` runs a whole trajectory for a velocity callable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from genreward.errors import GenrewardError
from genreward.sampling import (  # the step kernels live beside the DDIM step; re-exported here
    KINDS,
    FlowKind,
    Reduction,
    euler_step,
    flow_mean_std,
    flow_step_with_logprob,
)


__all__ = [
    "KINDS",
    "FlowRollout",
    "dance_sigmas",
    "euler_step",
    "fast_window",
    "flow_mean_std",
    "flow_rollout",
    "flow_sigmas",
    "flow_step_with_logprob",
    "flow_timesteps",
    "flux_image_seq_len",
    "flux_mu",
    "mixgrpo_window",
    "noise_levels",
    "scheduler_sigmas",
    "stochastic_steps",
    "trained_steps",
]


# ------------------------------------------------------------------------------------------ the schedules


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift μ = m·L + b, linear through (base_seq_len, base_shift) and
    (max_seq_len, max_shift); the same line as the FLUX pipeline's ``calculate_shift``. μ = 0.63 at L = 1024."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flux_image_seq_len(height: int, width: int, vae_scale_factor: int = 8, patch_size: int = 2) -> int:
    """Packed FLUX image tokens L = (H / 16)·(W / 16) for the default VAE (×8) and 2×2 packing."""
    step = vae_scale_factor * patch_size
    return (int(height) // step) * (int(width) // step)


def scheduler_sigmas(
    scheduler,
    num_steps: int,
    image_seq_len: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The sigma table (N+1 entries, last 0, float32) a flow-matching scheduler produces for ``num_steps``.

    Uses a fresh copy built from ``scheduler.config`` (the caller's scheduler keeps its state), and calls
    ``set_timesteps`` the way the SD3 / FLUX pipelines do: static shift → ``set_timesteps(N)`` (diffusers
    shifts the already-shifted σ_min again, so SD3's last σ is 0.0089286); dynamic shift → explicit
    sigmas linspace(1, 1/N, N) with μ from :func:`flux_mu` and the config's base/max shift and seq lens
    (``image_seq_len`` is then required).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    fresh = type(scheduler).from_config(scheduler.config)
    cfg = fresh.config
    if getattr(cfg, "use_dynamic_shifting", False):
        if image_seq_len is None:
            raise GenrewardError("a dynamically shifted schedule (FLUX) needs image_seq_len = (H/16)·(W/16)")
        mu = flux_mu(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        fresh.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu, device=device)
    else:
        fresh.set_timesteps(num_steps, device=device)
    return fresh.sigmas.to(torch.float32).clone()


_DYNAMIC_KEYS = {"image_seq_len", "base_seq_len", "max_seq_len", "base_shift", "max_shift"}


def flow_sigmas(num_steps: int, shift: float = 3.0, dynamic: Mapping[str, float] | None = None) -> torch.Tensor:
    """The scheduler sigma table for SD3.5 (``dynamic`` None: static ``shift``, SD3.5-M uses 3.0) or FLUX
    (``dynamic`` = dict(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15);
    ``shift`` is then unused). Built with diffusers' ``FlowMatchEulerDiscreteScheduler`` itself, see
    :func:`scheduler_sigmas`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic is None:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        return scheduler_sigmas(scheduler, num_steps)
    unknown = set(dynamic) - _DYNAMIC_KEYS
    if unknown or "image_seq_len" not in dynamic:
        raise GenrewardError(
            f"dynamic shift takes image_seq_len (required) and {sorted(_DYNAMIC_KEYS - {'image_seq_len'})}; "
            f"got {sorted(dynamic)}"
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=shift,
        use_dynamic_shifting=True,
        base_shift=float(dynamic.get("base_shift", 0.5)),
        max_shift=float(dynamic.get("max_shift", 1.15)),
        base_image_seq_len=int(dynamic.get("base_seq_len", 256)),
        max_image_seq_len=int(dynamic.get("max_seq_len", 4096)),
    )
    return scheduler_sigmas(scheduler, num_steps, image_seq_len=int(dynamic["image_seq_len"]))


def dance_sigmas(num_steps: int, shift: float = 3.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DanceGRPO's table: the static shift S·u/(1+(S−1)u) applied once to u = linspace(1, 0, N+1)
    (also for FLUX; no dynamic shift). The Gaussian toy of flow_grpo.md §9.7 uses the same grid."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)
    return shift * u / (1 + (shift - 1) * u)


def flow_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """Model timesteps t_i = 1000·σ_i for the N steps (SD3 takes them as is; FLUX pipelines pass t_i/1000)."""
    return torch.as_tensor(sigmas)[:-1] * 1000


# -------------------------------------------------------------------- which steps are stochastic / trained


def stochastic_steps(num_steps: int, window: tuple[int, int] | None = None) -> list[bool]:
    """For each of the N steps, whether it is stochastic (noise level a) or an exact Euler step (a = 0).

    ``window`` None: all N (Flow-GRPO). ``(start, size)``: steps start ≤ i < start + size (Flow-GRPO-Fast,
    MixGRPO); ``size`` 0 means all but the last step (the Fast code's w = 0), whatever ``start``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if window is None:
        return [True] * num_steps
    start, size = int(window[0]), int(window[1])
    if size == 0:
        start, size = 0, num_steps - 1
    if start < 0 or size < 0 or start + size > num_steps:
        raise ValueError(f"window (start={start}, size={size}) does not fit {num_steps} steps")
    return [start <= i < start + size for i in range(num_steps)]


def noise_levels(num_steps: int, noise_level: float, window: tuple[int, int] | None = None) -> list[float]:
    """Per-step noise level: ``noise_level`` on the stochastic steps of :func:`stochastic_steps`, 0 elsewhere."""
    return [float(noise_level) if s else 0.0 for s in stochastic_steps(num_steps, window)]


def fast_window(
    num_steps: int,
    window_size: int,
    window_range: tuple[int, int] = (0, 5),
    rng: random.Random | None = None,
) -> tuple[int, int]:
    """Flow-GRPO-Fast's window as (start, size): start ~ UniformInt[lo, hi − w] (both ends included), drawn
    from ``rng`` (``random`` module state if None). w = 0 gives (0, N − 1): all but the last step.

    The official code draws once per sampling call on each process; pass one ``random.Random`` seeded per
    prompt group to give every member of a group the same window.
    """
    w = int(window_size)
    if w == 0:
        return 0, num_steps - 1
    lo, hi = int(window_range[0]), int(window_range[1])
    if w < 0 or lo < 0 or hi - w < lo or hi > num_steps:
        raise ValueError(f"window size {w} does not fit range ({lo}, {hi}) of {num_steps} steps")
    start = (rng or random).randint(lo, hi - w)
    return start, w


def mixgrpo_window(iteration: int, num_steps: int, size: int = 4, shift_every: int = 25) -> list[int]:
    """MixGRPO's progressive window at training ``iteration`` (0-based): [c, c + size) ∩ [0, N − 2) with
    c = 0 at the start, +1 every ``shift_every`` iterations, back to 0 once it would pass N − 3."""
    limit = num_steps - 2
    if limit < 1 or size < 1 or shift_every < 1 or iteration < 0:
        raise ValueError(f"mixgrpo_window: bad arguments iteration={iteration}, num_steps={num_steps}, size={size}")
    start = (iteration // shift_every) % limit
    return list(range(start, min(start + size, limit)))


def trained_steps(num_steps: int, fraction: float = 1.0) -> list[int]:
    """Flow-GRPO's trained steps: j = 0 … int(N·fraction) − 1 in order (N = 10, fraction 0.99 → 0–8; the
    official int() truncation is kept, so fraction 1.0 trains the last step too)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"timestep fraction must be in (0, 1], got {fraction}")
    return list(range(int(num_steps * fraction)))


# ----------------------------------------------------------------------------------------------- rollout


@dataclass
class FlowRollout:
    """One sampled batch: ``latents[:, k]`` is the latent entering stored step ``steps[k]`` (and
    ``latents[:, -1]`` the one after the last stored step); ``log_probs[:, k]`` is log π of that transition."""

    latents: torch.Tensor  # [B, K+1, ...] in the sample dtype
    log_probs: torch.Tensor  # [B, K]
    steps: list[int]  # the K stored step indices (consecutive)
    final: torch.Tensor  # x_N in the sample dtype


@torch.no_grad()
def flow_rollout(
    velocity: Callable[[torch.Tensor, int], torch.Tensor],
    sample: torch.Tensor,
    sigmas: torch.Tensor,
    noise_level: float,
    kind: FlowKind = "sde",
    window: tuple[int, int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    reduction: Reduction = "mean",
) -> FlowRollout:
    """Run all N steps from x_0 = ``sample`` with ``velocity(x, i)``; steps in ``window`` use ``noise_level``,
    the others are exact Euler steps (:func:`euler_step`). Stores every latent and log-prob for ``window`` None (Flow-GRPO), or
    the latent entering the window, the w after it and w log-probs (Flow-GRPO-Fast)."""
    num_steps = int(torch.as_tensor(sigmas).numel()) - 1
    flags = stochastic_steps(num_steps, window)
    steps = [i for i, s in enumerate(flags) if s]
    x = sample
    latents, log_probs = [], []
    for i in range(num_steps):
        if i in steps and not latents:
            latents.append(x)
        if not flags[i]:
            x = euler_step(sigmas, velocity(x, i), x, i)
            continue
        x, log_prob, _, _ = flow_step_with_logprob(
            sigmas, velocity(x, i), x, i, noise_level, kind=kind, reduction=reduction, generator=generator
        )
        latents.append(x)
        log_probs.append(log_prob)
    batch = sample.shape[0]
    return FlowRollout(
        latents=torch.stack(latents, dim=1) if latents else sample.new_zeros((batch, 0, *sample.shape[1:])),
        log_probs=torch.stack(log_probs, dim=1) if log_probs else torch.zeros(batch, 0),
        steps=steps,
        final=x,
    )
