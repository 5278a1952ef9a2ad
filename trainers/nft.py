"""DiffusionNFT: negative-aware fine-tuning on the forward process (NVlabs/DiffusionNFT), docs/algorithms/diffusion_nft.md.

For the SD-family U-Nets (ε- or v-prediction, VP schedule): every network output is turned into a clean-sample
prediction x̂0 and the official loss is applied in x̂0 space (§6), which is the same loss for flow models.

Each epoch (the algorithm box of §5):

1. θ_old samples K images for each of N prompts with the configured sampler (deterministic DDIM η = 0 by default,
   any η works; no CFG by default); only the final latents x0 and the sampler's timestep grid are kept;
2. rewards → per-prompt-centred, globally scaled advantages A → optimality probability r = clamp(½ + A/2C, 0, 1);
3. every sample is re-noised on the *forward* process at int(0.99·N) distinct grid timesteps (fresh ε each), and
   θ is fitted with the NFT loss (implicit positive policy β·θ + (1−β)·θ_old weighted by r, negative policy
   (1+β)·θ_old − β·θ weighted by 1 − r, x0-space adaptive weights) + λ_KL·KL to the base model, conditional
   embeddings only (CFG-free training); the epoch's samples make ``steps_per_epoch`` optimiser steps;
4. the evaluation EMA follows θ after every optimiser step; θ_old ← η·θ_old + (1−η)·θ after the epoch.

θ_old and the EMA are copies of the trainable tensors (the LoRA weights, or the whole U-Net for full fine-tuning),
swapped into the policy for sampling and for the θ_old forward; they are written into every checkpoint
(``nft_policies.safetensors``) so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from genreward.errors import GenrewardError
from genreward.rewards.base import reward_from_specs
from genreward.schema import SampleConfig
from trainers.common import (
    LoraSection,
    OptimSection,
    PolicyConfig,
    Timer,
    TrainingRun,
    TrainSection,
    derived_seed,
    eval_reward_list,
    peak_rss_mb,
    save_unet_weights,
    stateful_objects,
    training_progress,
)
from trainers.diagnostics import epoch_record
from trainers.losses import nft_advantages, nft_clean_prediction, nft_flow_velocity, nft_kl, nft_loss, optimality_probability
from trainers.prdp import load_checked_prompts, stop_without_finite_rewards
from trainers.run_dir import fault_point, load_tree, save_tree

log = logging.getLogger("genreward.nft")

POLICIES_FILE = "nft_policies.safetensors"  # θ_old and the eval EMA, in every checkpoint
EMA_FOLDER = "ema"  # the eval-EMA weights in diffusers LoRA format (checkpoint-N/ema/pytorch_lora_weights.safetensors)
SUPPORTED_PREDICTIONS = ("epsilon", "v_prediction", "sample")


# ----------------------------------------------------------------------------------------------- config


@dataclass
class NFTSection:
    """DiffusionNFT hyperparameters; defaults = the official SD3.5-M recipe where it transfers (§8)."""

    epochs: int = 100
    prompts_per_epoch: int = 48  # N groups (split across processes; a prompt's group stays on one process)
    images_per_prompt: int = 24  # K, the group size (>= 2: advantages are centred per prompt)
    beta: float = 1.0  # β, mixing strength of the implicit policies (0.1 in the OCR / multi-reward recipes)
    adaptive_weighting: bool = True  # x0-space adaptive weights (official); False = the paper's plain form
    adv_clip_max: float = 5.0  # C: advantages clipped to ±C, r = clamp(½ + A/2C, 0, 1), loss × C
    kl_weight: float = 1.0e-4  # λ_KL on mean (û_θ − û_ref)² in flow-velocity units; 0 = no base-model pass
    timestep_fraction: float = 0.99  # train on int(fraction · N) distinct sampler timesteps per sample
    steps_per_epoch: int = 1  # optimiser steps per pass over the epoch's samples (official: 1; OCR: 2)
    inner_epochs: int = 1  # passes over the epoch's samples (fresh timesteps and noise each)
    old_decay_type: Literal[0, 1, 2] = 1  # θ_old soft update η(s): 0 → 0; 1 → min(0.001 s, 0.5); 2 → OCR schedule
    eval_ema: bool = True  # evaluate (and export to checkpoint-N/ema/) the EMA δ_k = min((1+k)/(10+k), 0.9)
    train_guidance_scale: float = 1.0  # training is CFG-free; only 1.0 is supported (diffusion_nft.md §10.6)

    def __post_init__(self) -> None:
        for name in ("epochs", "prompts_per_epoch", "steps_per_epoch", "inner_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"key 'nft.{name}' must be >= 1, got {getattr(self, name)}")
        if self.images_per_prompt < 2:
            raise ValueError(f"key 'nft.images_per_prompt' must be >= 2 (advantages are centred per prompt), got {self.images_per_prompt}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"key 'nft.beta' must be > 0, got {self.beta}")
        if not (math.isfinite(self.adv_clip_max) and self.adv_clip_max > 0):
            raise ValueError(f"key 'nft.adv_clip_max' must be > 0, got {self.adv_clip_max}")
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ValueError(f"key 'nft.kl_weight' must be >= 0, got {self.kl_weight}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"key 'nft.timestep_fraction' must be in (0, 1], got {self.timestep_fraction}")
        if self.train_guidance_scale != 1.0:
            raise ValueError(f"key 'nft.train_guidance_scale' must be 1.0: NFT trains the conditional model without "
                             f"classifier-free guidance (guided training is not supported), got {self.train_guidance_scale}")


def _nft_train() -> TrainSection:
    return TrainSection(lora=LoraSection(rank=32, alpha=64), optim=OptimSection(lr=3e-4, weight_decay=1e-4, max_grad_norm=1.0))


@dataclass
class NFTConfig(PolicyConfig):
    """``trainer: nft``. Checkpoints count epochs: ``checkpoint-<epochs done>``. Sampling defaults to CFG-free
    deterministic DDIM (guidance 1, η = 0) with 10 steps, as the official data collection (a DDIM, not DPM-Solver)."""

    trainer: Literal["nft"] = "nft"
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(num_steps=10, guidance_scale=1.0, eta=0.0))
    train: TrainSection = field(default_factory=_nft_train)
    nft: NFTSection = field(default_factory=NFTSection)


# ------------------------------------------------------------------------------------ schedules and plans


def old_policy_decay(step: int, kind: int) -> float:
    """η of the soft update θ_old ← η·θ_old + (1−η)·θ after ``step`` optimiser steps (§5.8).

    0: η = 0 (θ_old = θ after every epoch); 1 (default): min(0.001·s, 0.5); 2 (OCR): 0 for s < 75, then
    min(0.0075·(s − 75), 0.999).
    """
    if kind == 0:
        return 0.0
    if kind == 1:
        return min(0.001 * step, 0.5)
    if kind == 2:
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    raise GenrewardError(f"nft.old_decay_type must be 0, 1 or 2, got {kind!r}")


def eval_ema_decay(k: int) -> float:
    """δ_k = min((1 + k)/(10 + k), 0.9) after optimiser step k ≥ 1: EMA ← EMA + (1 − δ_k)(θ − EMA) (§5.7)."""
    return min((1 + k) / (10 + k), 0.9)


def timestep_plan(num_samples: int, grid_size: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """``[num_samples, max(1, int(fraction·grid_size))]`` grid indices: per sample the first entries of an
    independent random permutation of the sampler's grid, so each sample trains on distinct timesteps, each once."""
    count = max(1, int(fraction * grid_size))
    keys = torch.rand(num_samples, grid_size, generator=generator)
    return torch.argsort(keys, dim=1)[:, :count]


# ------------------------------------------------------------------------------- θ_old and the eval EMA


@contextlib.contextmanager
def swapped_weights(params: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run with ``tensors`` copied into ``params``; the previous values come back exactly afterwards."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, t in zip(params, tensors):
            p.copy_(t)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)


class NFTPolicies:
    """θ_old and the eval EMA as copies of the trainable tensors, plus the optimiser-step counter.

    A checkpoint object (``state_dict`` is JSON: the counter); the tensors go into ``nft_policies.safetensors``
    through :meth:`write` and come back with :meth:`load` from the checkpoint a run resumes from.
    """

    def __init__(self, params: Sequence[torch.Tensor] | None = None, eval_ema: bool = True) -> None:
        self.global_step = 0
        self.params: list[torch.Tensor] = []
        self.old: list[torch.Tensor] = []
        self.ema: list[torch.Tensor] | None = None
        self.eval_ema = eval_ema
        if params is not None:
            self.attach(params)

    def attach(self, params: Sequence[torch.Tensor]) -> None:
        """θ_old = EMA = θ (the start of a fresh run; a resumed run then loads both)."""
        self.params = list(params)
        self.old = [p.detach().clone() for p in self.params]
        self.ema = [p.detach().clone() for p in self.params] if self.eval_ema else None

    # JSON part (a TrainingRun checkpoint object)
    def state_dict(self) -> dict:
        return {"global_step": int(self.global_step)}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])

    def old_policy(self):
        return swapped_weights(self.params, self.old)

    def ema_policy(self):
        return swapped_weights(self.params, self.ema) if self.ema is not None else contextlib.nullcontext()

    @torch.no_grad()
    def after_optimizer_step(self) -> float:
        """Count the step; EMA ← EMA + (1 − δ_k)(θ − EMA). Returns δ_k (NaN without an EMA)."""
        self.global_step += 1
        if self.ema is None:
            return float("nan")
        delta = eval_ema_decay(self.global_step)
        for e, p in zip(self.ema, self.params):
            e.add_(p.detach() - e, alpha=1.0 - delta)
        return delta

    @torch.no_grad()
    def update_old(self, kind: int) -> float:
        """θ_old ← η·θ_old + (1 − η)·θ with η = old_policy_decay(global_step); returns η."""
        eta = old_policy_decay(self.global_step, kind)
        for o, p in zip(self.old, self.params):
            if eta == 0.0:
                o.copy_(p.detach())
            else:
                o.mul_(eta).add_(p.detach(), alpha=1.0 - eta)
        return eta

    def write(self, folder: Path, policy: torch.nn.Module | None = None, trainable: str = "lora") -> None:
        """``nft_policies.safetensors`` (θ_old, EMA) and, for LoRA with an EMA, ``ema/`` in diffusers format."""
        save_tree({"old": list(self.old), "ema": None if self.ema is None else list(self.ema)}, Path(folder) / POLICIES_FILE)
        if policy is not None and self.ema is not None and trainable == "lora":
            with self.ema_policy():
                save_unet_weights(policy, Path(folder) / EMA_FOLDER, trainable)

    def load(self, folder: Path) -> None:
        path = Path(folder) / POLICIES_FILE
        if not path.is_file():
            raise GenrewardError(f"{path} is missing: resume an nft run from a checkpoint the nft trainer wrote")
        tree = load_tree(path)
        for name in ("old", "ema"):
            saved, mine = tree.get(name), getattr(self, name)
            if mine is None:
                continue
            if saved is None:  # eval_ema switched on for a run saved without it: start the EMA from θ
                log.warning("%s holds no eval EMA; it restarts from the current weights", path)
                continue
            if len(saved) != len(mine) or any(s.shape != m.shape for s, m in zip(saved, mine)):
                raise GenrewardError(f"{path} does not fit this run ({name}: other trainable parameters)")
            with torch.no_grad():
                for m, s in zip(mine, saved):
                    m.copy_(s.to(device=m.device, dtype=m.dtype))


# --------------------------------------------------------------------------------------------- train


def train(config: NFTConfig) -> dict:
    """Run DiffusionNFT; returns paths and final numbers (also in ``metrics.jsonl``)."""
    n = config.nft
    # Every input is checked before the run folder is touched.
    prompts = load_checked_prompts(config, n.prompts_per_epoch, "nft.prompts_per_epoch")
    eval_items = TrainingRun.load_eval_prompts(config)
    reward = reward_from_specs(config.reward)
    eval_rewards = eval_reward_list(config.eval, reward)
    policies = NFTPolicies(eval_ema=n.eval_ema)
    run = TrainingRun(config, need_reference=n.kl_weight > 0, unit="epoch", families=("sd",),
                 checkpoint_objects={**stateful_objects(reward), "nft": policies})
    acc = run.accelerator
    kind = run.pipe.scheduler.config.prediction_type
    if kind not in SUPPORTED_PREDICTIONS:
        raise GenrewardError(f"nft supports epsilon, v_prediction and sample U-Nets, not prediction_type={kind!r}")
    policies.attach(run.trainable_params)  # θ_old = EMA = θ; the step counter was restored with the checkpoint objects
    if run.resume_path is not None:
        policies.load(run.resume_path)
    run.extra_checkpoint_writers = [lambda folder: policies.write(folder, run.policy, config.train.trainable)]
    run.eval_weights = policies.ema_policy
    local = run.local_slice(n.prompts_per_epoch, "nft.prompts_per_epoch")
    if eval_items and run.start == 0:
        run.evaluate("before", eval_items, eval_rewards)
    n_local, k = local.stop - local.start, n.images_per_prompt
    progress = training_progress(acc, run.start, n.epochs)

    for epoch in range(run.start, n.epochs):
        timer = Timer()
        # 1. N distinct prompts (same draw on every process; each takes its share), K images each from θ_old.
        gen = torch.Generator().manual_seed(derived_seed(config.train.seed, epoch, 0))
        chosen = torch.randperm(len(prompts), generator=gen)[: n.prompts_per_epoch].tolist()[local]
        items = [prompts[i] for i in chosen]
        flat_prompts = [it.prompt for it in items for _ in range(k)]
        seeds = [derived_seed(config.train.seed, epoch, 1, local.start + p, i) for p in range(n_local) for i in range(k)]
        with timer("sampling"), policies.old_policy():
            traj = run.sample(flat_prompts, seeds)
        # 2. Rewards → advantages (per prompt, global std, over every process) → optimality probability r.
        with timer("reward"), torch.no_grad():
            scores = reward(traj.images, flat_prompts, metadata=[it.metadata for it in items for _ in range(k)],
                            **run.reward_context()).scores
            rewards = scores.detach().float().to(acc.device).view(n_local, k)
        valid = torch.isfinite(rewards)
        all_rewards = run.gather_rewards(rewards.reshape(-1)).view(-1, k).cpu()  # [N, K] in prompt-slot order
        groups = all_rewards.shape[0]
        group_ids = torch.arange(groups).repeat_interleave(k)
        adv_all = nft_advantages(all_rewards.reshape(-1).double(), group_ids).view(groups, k)
        no_signal = int(sum(1 for row in all_rewards if _without_signal(row)))
        adv = adv_all[local].reshape(-1).to(acc.device)
        r = optimality_probability(adv, n.adv_clip_max)
        skip = no_signal == groups
        if no_signal and acc.is_main_process:
            log.warning("epoch %d: %d of %d prompt groups have no reward signal (all K rewards equal, or fewer than two "
                        "finite ones)%s", epoch, no_signal, groups,
                        ": nothing to learn, this epoch's update is skipped" if skip else
                        "; they get r = 0.5, which only pulls towards the old policy")
        # 3. Forward-process training on the clean latents, CFG-free.
        stats: dict[str, float] = {}
        with timer("training"):
            if not skip:
                stats = train_epoch(run, config, policies, traj, r, valid.reshape(-1), epoch)
        # 4. θ_old ← η·θ_old + (1−η)·θ, once per epoch after training.
        eta = policies.update_old(n.old_decay_type)
        fault_point("unit")
        record = epoch_record(run, epoch, reward.name, rewards, valid)
        x0 = traj.latents[:, -1].float()
        record.update(
            loss=stats.get("loss", float("nan")), kl=stats.get("kl", float("nan")),
            old_deviate=stats.get("old_deviate", float("nan")), grad_norm=stats.get("grad_norm", float("nan")),
            x0_norm=float(_global_mean(run, (x0**2).flatten(1).mean(dim=1))),
            r_mean=float(_global_mean(run, r)), adv_abs_mean=float(_global_mean(run, adv.abs().float())),
            groups=groups, groups_without_signal=no_signal, update_skipped=int(skip),
            optimizer_steps=policies.global_step, old_decay=eta, ema_decay=stats.get("ema_decay", float("nan")),
            lr=config.train.optim.lr, peak_rss_mb=peak_rss_mb(),
        )
        record.update({f"time_{name}": round(v, 4) for name, v in timer.seconds.items()})
        run.log_metrics(record)
        progress.update(1)
        progress.set_postfix(reward=f"{record['reward_mean']:.4g}", loss=f"{record['loss']:.3g}")
        stop_without_finite_rewards(run, progress, rewards, epoch, reward.name)
        run.end_of_epoch(epoch, n.epochs, eval_items, eval_rewards)
    progress.close()
    return run.finish(n.epochs, eval_items, eval_rewards)


def _without_signal(row: torch.Tensor) -> bool:
    finite = row[torch.isfinite(row)]
    return finite.numel() < 2 or bool(finite.max() == finite.min())


def _global_mean(run: TrainingRun, values: torch.Tensor) -> float:
    gathered = run.gather_rewards(values.detach().float().reshape(-1).to(run.accelerator.device))
    return float(gathered.mean()) if gathered.numel() else float("nan")


def train_epoch(run: TrainingRun, config: NFTConfig, policies: NFTPolicies, traj, r: torch.Tensor, valid: torch.Tensor,
                epoch: int) -> dict[str, float]:
    """The epoch's optimiser steps on this process's samples (diffusion_nft.md §5.5–§5.7); returns epoch means.

    Samples are shuffled and split into ``steps_per_epoch`` groups; each group is one optimiser step whose gradient is
    the mean over its valid samples (on every process) and its training timesteps, accumulated micro-batch by
    micro-batch (``train.chunk_size`` samples per U-Net call). Samples with a non-finite reward have loss weight 0.
    """
    n, acc = config.nft, run.accelerator
    device, world, rank, seed = acc.device, acc.num_processes, acc.process_index, config.train.seed
    policy, pred_type = run.policy, run.pipe.scheduler.config.prediction_type
    alphas_cumprod = run.pipe.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    x0_all = traj.latents[:, -1].to(device).float()  # the model-space clean latents (no VAE round trip)
    cond_all = traj.prompt_embeds.to(device)  # conditional embeddings only: CFG-free training
    grid = traj.timesteps.to(device)
    samples = x0_all.shape[0]
    valid = valid.to(device)
    sums = {"loss": 0.0, "kl": 0.0, "old_deviate": 0.0}
    steps, grad_norm, ema_decay = 0, float("nan"), float("nan")

    def forward(model, x_t, t, cond):
        out = model(x_t.to(model.dtype), t, encoder_hidden_states=cond.to(model.dtype)).sample
        return out.float()

    for inner in range(n.inner_epochs):
        gen = torch.Generator().manual_seed(derived_seed(seed, epoch, 2, inner, rank))
        order = torch.randperm(samples, generator=gen)
        plan = timestep_plan(samples, grid.numel(), n.timestep_fraction, gen)  # [B, T] grid indices
        slots = plan.shape[1]
        for g, ids in enumerate(torch.tensor_split(order, n.steps_per_epoch)):
            count = acc.gather(valid[ids.to(device)].sum().reshape(1).float()).sum()
            if float(count) == 0:
                continue  # nothing valid anywhere in this group (every process sees the same count)
            scale = world / float(count)  # DDP averages over processes: this makes the step a global per-sample mean
            chunks = ids.split(config.train.chunk_size)
            for m, mb in enumerate(chunks):
                mbd = mb.to(device)
                x0, cond = x0_all[mbd], cond_all[mbd]
                noise_gen = torch.Generator().manual_seed(derived_seed(seed, epoch, 3, inner, g, m, rank))
                noise = torch.randn((slots, len(mb), *x0.shape[1:]), generator=noise_gen).to(device)
                t_all = grid[plan[mb].to(device)]  # [b, T] timesteps from the sampler's grid
                abar = alphas_cumprod[t_all]
                alpha, sigma = abar.sqrt(), (1 - abar).sqrt()  # [b, T]
                x_ts = [alpha[:, j].view(-1, 1, 1, 1) * x0 + sigma[:, j].view(-1, 1, 1, 1) * noise[j] for j in range(slots)]
                weight = valid[mbd].float() * len(mb) * scale
                with torch.no_grad(), acc.autocast(), policies.old_policy():
                    old = [nft_clean_prediction(forward(policy, x_ts[j], t_all[:, j], cond), x_ts[j], alpha[:, j], sigma[:, j], pred_type)
                           for j in range(slots)]
                ref = None
                if n.kl_weight > 0:
                    with torch.no_grad(), acc.autocast(), run.reference() as ref_model:
                        ref = [nft_clean_prediction(forward(ref_model, x_ts[j], t_all[:, j], cond), x_ts[j], alpha[:, j], sigma[:, j], pred_type)
                               for j in range(slots)]
                for j in range(slots):
                    last = m == len(chunks) - 1 and j == slots - 1
                    ctx = contextlib.nullcontext() if last else acc.no_sync(run.unet)
                    a_j, s_j = alpha[:, j], sigma[:, j]
                    with ctx:
                        with acc.autocast():
                            out = forward(run.unet, x_ts[j], t_all[:, j], cond)
                        x0_theta = nft_clean_prediction(out, x_ts[j], a_j, s_j, pred_type)
                        w = weight if n.adaptive_weighting else weight * ((a_j + s_j) / s_j) ** 2  # plain form in velocity units
                        loss = nft_loss(x0_theta, old[j], x0, r[mbd], n.beta, n.adaptive_weighting, n.adv_clip_max, weight=w)
                        total = loss
                        v_theta = nft_flow_velocity(x0_theta, x_ts[j], a_j, s_j)
                        if ref is not None:
                            kl = nft_kl(v_theta, nft_flow_velocity(ref[j], x_ts[j], a_j, s_j), weight)
                            total = loss + n.kl_weight * kl
                            sums["kl"] += float(kl.detach()) / slots
                        acc.backward(total / slots)
                    with torch.no_grad():
                        sums["loss"] += float(loss.detach()) / slots
                        sums["old_deviate"] += float(nft_kl(v_theta, nft_flow_velocity(old[j], x_ts[j], a_j, s_j), weight)) / slots
            grad_norm = run.optimizer_step()
            ema_decay = policies.after_optimizer_step()
            steps += 1
    out = {"grad_norm": grad_norm, "ema_decay": ema_decay, "steps": steps}
    for name, value in sums.items():  # per-process sums of globally scaled terms → mean over processes and steps
        total = float(acc.gather(torch.tensor([value], device=device)).mean())
        out[name] = total / steps if steps else float("nan")
    if n.kl_weight == 0:
        out["kl"] = float("nan")
    return out
