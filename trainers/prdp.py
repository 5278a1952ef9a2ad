"""PRDP: Proximal Reward Difference Prediction (Deng et al., CVPR 2024), specs/prdp.md.

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
import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from genreward.errors import GenrewardError
from genreward.rewards.base import RewardSpec, reward_from_specs
from genreward.sampling import sample_trajectories
from genreward.schema import ModelConfig, PromptsConfig, SampleConfig
from trainers.common import (
    CheckpointSection,
    LoggingSection,
    Timer,
    TrainEvalSection,
    TrainingRun,
    TrainSection,
    derived_seed,
    peak_rss_mb,
    eval_reward_list,
    stateful,
    training_progress,
)
from trainers.losses import rdp_step_weights

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
class PRDPConfig:
    output_dir: str
    trainer: Literal["prdp"] = "prdp"
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    reward: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="jpeg_compressibility")])
    prdp: PRDPSection = field(default_factory=PRDPSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: TrainEvalSection = field(default_factory=TrainEvalSection)


def train(config: PRDPConfig) -> dict:
    """Run PRDP; returns paths and final numbers (also in ``metrics.jsonl``)."""
    p = config.prdp
    reward = reward_from_specs(config.reward)
    run = TrainingRun(
        config, config.model, config.train, config.checkpoint, config.logging, config.eval, config.sample,
        need_reference=True, checkpoint_objects=stateful(reward),
    )
    acc = run.accelerator
    prompts = run.load_prompts(config.prompts)
    if len(prompts) < p.prompts_per_epoch:
        raise GenrewardError(
            f"prompt set '{config.prompts.path}' has {len(prompts)} prompts but prdp.prompts_per_epoch is {p.prompts_per_epoch}; "
            "use a larger set or lower prdp.prompts_per_epoch"
        )
    local = run.local_slice(p.prompts_per_epoch, "prdp.prompts_per_epoch")
    eval_items = run.load_prompts(config.eval.prompts) if config.eval.enabled else []
    eval_rewards = eval_reward_list(config.eval, reward)
    if eval_items and run.start_epoch == 0:
        run.evaluate("before", eval_items, eval_rewards)
    n_local, b, T = local.stop - local.start, p.images_per_prompt, config.sample.num_steps
    progress = training_progress(acc, run.start_epoch, p.epochs)

    for epoch in range(run.start_epoch, p.epochs):
        timer = Timer()
        # 1. θ_old ← θ, and N prompts iid from the prompt set (same draw on every process; each takes its share).
        gen = torch.Generator().manual_seed(derived_seed(config.train.seed, epoch, 0))
        chosen = torch.randint(len(prompts), (p.prompts_per_epoch,), generator=gen).tolist()[local]
        items = [prompts[i] for i in chosen]
        flat_prompts = [it.prompt for it in items for _ in range(b)]
        seeds = [derived_seed(config.train.seed, epoch, 1, local.start + n, i) for n in range(n_local) for i in range(b)]
        # 2. B trajectories per prompt from π_θold (stochastic DDIM with CFG), recording every latent.
        with timer("sampling"), acc.autocast():
            traj = sample_trajectories(
                run.pipe, flat_prompts, num_steps=T, guidance_scale=config.sample.guidance_scale, eta=config.sample.eta,
                negative_prompt=config.sample.negative_prompt, seeds=seeds, batch_size=config.sample.batch_size,
                height=config.sample.height, width=config.sample.width, reduction=config.sample.logprob_reduction,
                unet=run.policy,
            )
        # 3. Black-box rewards; non-finite ones are excluded from pairs (and counted).
        with timer("reward"), torch.no_grad():
            scores = reward(traj.images, flat_prompts, metadata=[it.metadata for it in items for _ in range(b)]).scores
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
        record = epoch_record(run, epoch, reward.name, rewards, valid)
        record.update(first)
        record.update({key: float(v) for key, v in stats.items()})
        record.update(grad_norm=grad_norm, lr=config.train.optim.lr, peak_rss_mb=peak_rss_mb())
        record.update({f"time_{k}": round(v, 4) for k, v in timer.seconds.items()})
        run.log_metrics(record)
        progress.update(1)
        progress.set_postfix(reward=f"{record['reward_mean']:.4g}", loss=f"{record['loss']:.3g}")
        run.end_of_epoch(epoch, p.epochs, eval_items, eval_rewards)
    progress.close()
    return run.finish(p.epochs - 1, eval_items, eval_rewards)


REWARD_WINDOW = 10  # epochs in the sliding window of reward_mean_window_std


def epoch_record(
    run: TrainingRun, epoch: int, reward_name: str, rewards: torch.Tensor, valid: torch.Tensor,
    prompts: Sequence[str] | None = None,
) -> dict:
    """Reward statistics of one epoch, gathered over all processes.

    Also the reward-hacking diagnostics of specs/rewarddance.md §5: ``reward_std_within_prompt`` (mean over
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
