"""The log-prob passes over stored trajectories, as free functions (trainers, benches and tests call them).

* :func:`recompute_log_probs` — log π(x_{t'} | x_t, c) of every stored transition under a model, no graph
  (PRDP's pass 1 and reference pass, ``genreward check``-style diagnostics);
* :func:`backward_weighted` — PRDP's pass 2 (docs/algorithms/prdp.md §4.1): back-propagate
  Σ_{i,t} w[i,t]·log π_θ(i,t) chunk by chunk, so memory is that of one U-Net call of ``chunk_size`` trajectories.

Both go through :func:`genreward.sampling.step_log_prob`, the one implementation of the step density, with the
model family (:func:`genreward.models.families.family_of`) that denoises.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

from genreward.sampling import Trajectory, step_log_prob


def chunks(total: int, chunk_size: int) -> list[slice]:
    """Consecutive slices of at most ``chunk_size`` covering ``range(total)``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(i, min(i + chunk_size, total)) for i in range(0, total, chunk_size)]


@torch.no_grad()
def recompute_log_probs(model: torch.nn.Module, family: Any, traj: Trajectory, chunk_size: int,
                        reduction: str = "mean") -> torch.Tensor:
    """``[B, T]`` log-probs of the stored transitions under ``model`` (call inside the run's autocast); NaN at the
    deterministic steps of a flow trajectory (outside its SDE window), which are not evaluated."""
    out = torch.full((len(traj), traj.num_steps), float("nan"), device=traj.latents.device, dtype=torch.float32)
    for step in stochastic_step_indices(traj):
        for idx in chunks(len(traj), chunk_size):
            out[idx, step] = step_log_prob(model, family, traj, step, idx, reduction)
    return out


def stochastic_step_indices(traj: Trajectory) -> list[int]:
    """The steps that have a density (all of a DDIM trajectory with η > 0; a flow trajectory's SDE window)."""
    return [k for k, s in enumerate(traj.stochastic) if s]


def backward_weighted(model: torch.nn.Module, family: Any, traj: Trajectory, weights: torch.Tensor, chunk_size: int,
                      reduction: str = "mean", accelerator: Any = None, steps: Sequence[int] | None = None) -> None:
    """Accumulate ∇ Σ_{i,t} weights[i,t]·log π_model(i,t) into the trainable parameters' ``.grad``.

    With an accelerator, each chunk runs under its autocast and gradients are all-reduced across processes once,
    at the last chunk (``no_sync`` before it). Without one, plain ``loss.backward()``. ``steps`` restricts the sum
    to those denoising steps (e.g. to split a gradient by timestep range).
    """
    steps = stochastic_step_indices(traj) if steps is None else steps
    jobs = [(step, idx) for step in steps for idx in chunks(len(traj), chunk_size)]
    for n, (step, idx) in enumerate(jobs):
        last = n == len(jobs) - 1
        if accelerator is None:
            lp = step_log_prob(model, family, traj, step, idx, reduction)
            (weights[idx, step].to(lp.dtype).detach() * lp).sum().backward()
            continue
        ctx = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with ctx:
            with accelerator.autocast():
                lp = step_log_prob(model, family, traj, step, idx, reduction)
            accelerator.backward((weights[idx, step].to(lp.dtype).detach() * lp).sum())


class UpdateLog:
    """Running means of a loop's loss statistics, and the first slot's ratio (the on-policy check in metrics)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.first_ratio: float | None = None

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        if self.first_ratio is None and "ratio" in stats:
            self.first_ratio = float(stats["ratio"])
        for key, value in {"loss": loss.detach(), **stats}.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def accumulated_updates(run: Any, slots: Sequence[Any], accumulation: int, slot_loss, log: UpdateLog) -> float:
    """Back-propagate ``slot_loss(slot) -> (loss, stats)`` for every slot (a minibatch × a step), with an optimiser step
    after each ``accumulation`` slots and after the last one; each loss is divided by the size of its own group (the
    last may be shorter), and gradients are all-reduced only at the slot that steps (``no_sync`` before it).
    Returns the last step's pre-clip grad norm (NaN when there was no slot). DDPO's and GRPO's update loop."""
    from trainers.losses import accumulation_divisors

    acc, grad_norm = run.accelerator, float("nan")
    divisors = accumulation_divisors(len(slots), accumulation) if slots else []
    for n, slot in enumerate(slots):
        sync = (n + 1) % accumulation == 0 or n == len(slots) - 1
        with acc.no_sync(run.unet) if not sync else contextlib.nullcontext():
            loss, stats = slot_loss(slot)
            acc.backward(loss / divisors[n])
        log.add(loss, stats)
        if sync:
            grad_norm = run.optimizer_step()
    return grad_norm
