"""Per-epoch reward statistics and the reward-hacking diagnostics, shared by the policy trainers.

``epoch_record`` gathers an epoch's rewards over all processes and reports their mean/std, how many were
non-finite, and RewardDance's collapse monitors (docs/algorithms/rewarddance.md §5): the mean within-prompt
reward std and the std of ``reward_mean`` over a sliding window of epochs.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch

log = logging.getLogger("genreward.train")

REWARD_WINDOW = 10  # epochs in the sliding window of reward_mean_window_std


def epoch_record(
    run: Any, epoch: int, reward_name: str, rewards: torch.Tensor, valid: torch.Tensor,
    prompts: Sequence[str] | None = None,
) -> dict:
    """Reward statistics of one epoch, gathered over all processes.

    Also the reward-hacking diagnostics of docs/algorithms/rewarddance.md §5: ``reward_std_within_prompt`` (mean over
    prompts of the std of their rewards; groups are the rows of ``rewards``, or, given ``prompts`` — the
    prompt of every gathered reward, in gather order — equal prompt texts) and ``reward_mean_window_std``
    (std of ``reward_mean`` over this and the previous ``REWARD_WINDOW - 1`` epochs; restored on resume).
    A collapsing policy drives both towards 0.
    """
    all_rewards = run.gather_rewards(rewards.reshape(-1))
    all_valid = run.gather_rewards(valid.reshape(-1).float()).bool()
    finite = all_rewards[all_valid]
    nonfinite = int((~all_valid).sum())
    if nonfinite and run.accelerator.is_main_process:
        log.warning("epoch %d: %d of %d rewards were NaN/inf; their pairs were dropped", epoch, nonfinite, all_rewards.numel())
    reward_mean = float(finite.mean()) if finite.numel() else float("nan")
    if prompts is None:
        groups = list(zip(all_rewards.view(-1, rewards.shape[-1]).cpu(), all_valid.view(-1, rewards.shape[-1]).cpu()))
    else:
        if len(prompts) != all_rewards.numel():
            raise ValueError(f"epoch_record: {len(prompts)} prompts for {all_rewards.numel()} gathered rewards")
        index: dict[str, list[int]] = {}
        for i, text in enumerate(prompts):
            index.setdefault(text, []).append(i)
        flat, flat_valid = all_rewards.cpu(), all_valid.cpu()
        groups = [(flat[idx], flat_valid[idx]) for idx in index.values()]
    return {
        "epoch": epoch,
        "reward_name": reward_name,
        "reward_mean": reward_mean,
        "reward_std": float(finite.std(unbiased=False)) if finite.numel() > 1 else 0.0,
        "reward_std_within_prompt": within_group_std(groups),
        "reward_mean_window_std": window_std(run.reward_means + [reward_mean], REWARD_WINDOW),
        "reward_nonfinite": nonfinite,
        "num_samples": int(all_rewards.numel()),
    }


def within_group_std(groups: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean over groups (values, valid mask) of the population std of the finite values.

    Groups with fewer than two finite values carry no spread information and are skipped (NaN if all are).
    """
    stds = [float(v[m].double().std(unbiased=False)) for v, m in groups if int(m.sum()) >= 2]
    return sum(stds) / len(stds) if stds else float("nan")


def window_std(values: Sequence[float], window: int = REWARD_WINDOW) -> float:
    """Population std of the finite values among the last ``window`` entries (0 for one value, NaN for none)."""
    recent = [float(v) for v in list(values)[-window:] if v is not None and math.isfinite(v)]
    if not recent:
        return float("nan")
    return float(torch.tensor(recent, dtype=torch.float64).std(unbiased=False)) if len(recent) > 1 else 0.0
