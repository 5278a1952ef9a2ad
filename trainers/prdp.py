"""PRDP: Proximal Reward Difference Prediction (Deng et al., CVPR 2024), docs/algorithms/prdp.md.

Each epoch: snapshot θ_old = θ; for N prompts sample B trajectories (DDIM η = 1, CFG); score them; compute
reference log-probs under π_ref; then K times: regress the β-scaled reward differences of every pair
(r_i > r_j) on the differences of the trajectories' log-ratios log π_θ − log π_ref, with each step's
log-ratio clipped to ±ε around its snapshot value (proximal update) and max(clipped, unclipped) loss.

All T steps of every trajectory enter every update through the exact two-pass gradient of §4.1:
pass 1 computes all log-ratios without a graph and turns them into per-step weights ∂L/∂a; pass 2
back-propagates Σ weight·log π_θ chunk by chunk, so memory is that of one U-Net batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from genreward.errors import GenrewardError
from genreward.rewards.base import reward_from_specs
from trainers.common import PolicyConfig, Timer, TrainingRun, derived_seed, eval_reward_list, peak_rss_mb, stateful_objects, training_progress
from trainers.diagnostics import epoch_record
from trainers.losses import rdp_step_weights
from trainers.run_dir import fault_point

log = logging.getLogger("genreward.prdp")


@dataclass
class PRDPSection:
    """PRDP hyperparameters; defaults = the paper's small-scale setting (Table 4)."""

    epochs: int = 100  # E
    updates_per_epoch: int = 10  # K
    prompts_per_epoch: int = 32  # N (split across processes; each prompt's group stays on one process)
    images_per_prompt: int = 16  # B (≥ 2, ≥ 4 recommended so each prompt has several pairs)
    beta: float = 3e-5  # KL weight β (target Δr/β)
    clip_eps: float = 1e-6  # stepwise log-ratio clip ε around the snapshot's value
    logratio_reduction: Literal["mean", "sum"] = "mean"  # over T: App. G uses the mean

    def __post_init__(self) -> None:
        if self.images_per_prompt < 2:
            raise ValueError(f"key 'prdp.images_per_prompt' must be >= 2 (pairs within a prompt), got {self.images_per_prompt}")
        if self.beta <= 0:
            raise ValueError(f"key 'prdp.beta' must be > 0, got {self.beta}")
        if self.clip_eps < 0:
            raise ValueError(f"key 'prdp.clip_eps' must be >= 0, got {self.clip_eps}")
        for name in ("epochs", "updates_per_epoch", "prompts_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"key 'prdp.{name}' must be >= 1, got {getattr(self, name)}")


@dataclass
class PRDPConfig(PolicyConfig):
    """``trainer: prdp``. Checkpoints count epochs: ``checkpoint-<epochs done>``."""

    trainer: Literal["prdp"] = "prdp"
    prdp: PRDPSection = field(default_factory=PRDPSection)


def train(config: PRDPConfig) -> dict:
    """Run PRDP; returns paths and final numbers (also in ``metrics.jsonl``)."""
    p = config.prdp
    # Every input is checked before the run folder is touched.
    prompts = load_checked_prompts(config, p.prompts_per_epoch, "prdp.prompts_per_epoch")
    eval_items = TrainingRun.load_eval_prompts(config)
    reward = reward_from_specs(config.reward)
    eval_rewards = eval_reward_list(config.eval, reward)
    run = TrainingRun(config, need_reference=True, unit="epoch", checkpoint_objects=stateful_objects(reward))
    acc = run.accelerator
    local = run.local_slice(p.prompts_per_epoch, "prdp.prompts_per_epoch")
    if eval_items and run.start == 0:
        run.evaluate("before", eval_items, eval_rewards)
    n_local, b, T = local.stop - local.start, p.images_per_prompt, config.sample.num_steps
    progress = training_progress(acc, run.start, p.epochs)

    for epoch in range(run.start, p.epochs):
        timer = Timer()
        # 1. θ_old ← θ, and N prompts iid from the prompt set (same draw on every process; each takes its share).
        gen = torch.Generator().manual_seed(derived_seed(config.train.seed, epoch, 0))
        chosen = torch.randint(len(prompts), (p.prompts_per_epoch,), generator=gen).tolist()[local]
        items = [prompts[i] for i in chosen]
        flat_prompts = [it.prompt for it in items for _ in range(b)]
        seeds = [derived_seed(config.train.seed, epoch, 1, local.start + n, i) for n in range(n_local) for i in range(b)]
        # 2. B trajectories per prompt from π_θold (stochastic DDIM with CFG), recording every latent.
        with timer("sampling"):
            traj = run.sample(flat_prompts, seeds)
        # 3. Black-box rewards; non-finite ones are excluded from pairs (and counted).
        with timer("reward"), torch.no_grad():
            scores = reward(traj.images, flat_prompts, metadata=[it.metadata for it in items for _ in range(b)],
                            **run.reward_context()).scores
            rewards = scores.detach().float().to(acc.device).view(n_local, b)
        valid = torch.isfinite(rewards)
        # 4. Reference log-probs of every stored transition under π_ref (adapters off / frozen copy).
        with timer("reference"), run.reference() as ref_model:
            ref_lp = run.log_probs(traj, ref_model).view(n_local, b, T)
        # 5. K proximal updates, each on all T steps of all trajectories (exact two-pass gradient).
        with timer("training"):
            old_logratio = None
            for k in range(p.updates_per_epoch):
                logratio = run.log_probs(traj).view(n_local, b, T) - ref_lp  # pass 1 (no graph)
                if old_logratio is None:
                    old_logratio = logratio.clone()  # θ = θ_old at k = 0: the snapshot's log-ratio, exactly
                weights, stats = rdp_step_weights(
                    logratio, old_logratio, rewards, p.beta, p.clip_eps, p.logratio_reduction, valid=valid, return_stats=True
                )
                run.backward_weighted(traj, weights.view(n_local * b, T))  # pass 2 (graph per chunk)
                grad_norm = run.optimizer_step()
                if k == 0:
                    first = {f"{key}_first": float(v) for key, v in stats.items()}
        fault_point("unit")
        record = epoch_record(run, epoch, reward.name, rewards, valid)
        record.update(first)
        record.update({key: float(v) for key, v in stats.items()})
        record.update(grad_norm=grad_norm, lr=config.train.optim.lr, peak_rss_mb=peak_rss_mb())
        record.update({f"time_{k}": round(v, 4) for k, v in timer.seconds.items()})
        run.log_metrics(record)
        progress.update(1)
        progress.set_postfix(reward=f"{record['reward_mean']:.4g}", loss=f"{record['loss']:.3g}")
        stop_without_finite_rewards(run, progress, rewards, epoch, reward.name)
        run.end_of_epoch(epoch, p.epochs, eval_items, eval_rewards)
    progress.close()
    return run.finish(p.epochs, eval_items, eval_rewards)


def load_checked_prompts(config: PolicyConfig, needed: int, key: str) -> list:
    """The training prompt set, refused with one line when it has fewer than ``needed`` prompts."""
    from genreward.prompts import load_prompts

    prompts = load_prompts(config.prompts)
    if len(prompts) < needed:
        raise GenrewardError(
            f"prompt set '{config.prompts.path}' has {len(prompts)} prompts but {key} is {needed}; "
            f"use a larger set or lower {key}"
        )
    return prompts


def stop_without_finite_rewards(run: TrainingRun, progress, rewards: torch.Tensor, epoch: int, name: str) -> None:
    """``run.check_finite_rewards`` with the progress bar closed first, so the error starts its own line."""
    try:
        run.check_finite_rewards(rewards, epoch, name)
    except GenrewardError:
        progress.close()
        raise
