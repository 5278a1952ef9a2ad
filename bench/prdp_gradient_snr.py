"""How much of one PRDP gradient is signal? Cosine between gradients from independent batches, in one run.

For a PRDP config, fixes N prompts, samples ``--batches`` independent sets of B trajectories per prompt from the
initial model (θ = θ_ref), scores them with the config's reward, and computes each set's exact PRDP gradient at
initialisation (all T steps, docs/algorithms/prdp.md §4.1) with respect to every U-Net parameter. If a batch gradient is
signal s plus independent noise of variance σ²/n (n = N·B trajectories), the expected cosine between two such
gradients is ρ = |s|² / (|s|² + σ²/n), so the trajectories needed for a gradient whose noise equals its
signal (ρ = 0.5) are n* = n·(1/ρ − 1). Printed per parameter group and for the sum over timestep ranges.

    python bench/prdp_gradient_snr.py configs/prdp_world_judge.yaml [--batches 3] [--threads 2]

A ρ near 0 means the policy gradient is mostly noise at this batch size: learning then needs many more
trajectories (or many small steps whose noise averages out), whatever the learning rate.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from genreward.config import load_config
from genreward.models.families import family_of
from genreward.models.pipeline import load_pipeline
from genreward.prompts import load_prompts
from genreward.rewards.base import reward_from_specs
from genreward.sampling import sample_trajectories
from trainers.losses import rdp_step_weights
from trainers.passes import backward_weighted
from trainers.prdp import PRDPConfig

GROUPS = {
    "cross-attention": lambda n: ".attn2." in n,
    "self-attention": lambda n: ".attn1." in n,
    "feed-forward": lambda n: ".ff." in n,
    "resnet convs": lambda n: "resnets" in n and "conv" in n,
    "time embedding": lambda n: "time_emb" in n,
    "all parameters": lambda n: True,
}


def batch_gradient(pipe, cfg: PRDPConfig, reward, items, seed0: int, step_ranges) -> tuple[dict, list[dict], float]:
    """The PRDP gradient at θ_ref of one batch (per parameter), the same split by timestep range, and the mean reward."""
    b, s = cfg.prdp.images_per_prompt, cfg.sample
    prompts = [it.prompt for it in items for _ in range(b)]
    with torch.no_grad():
        traj = sample_trajectories(pipe, prompts, num_steps=s.num_steps, guidance_scale=s.guidance_scale, eta=s.eta,
                                   negative_prompt=s.negative_prompt, seeds=list(range(seed0, seed0 + len(prompts))),
                                   batch_size=s.batch_size, height=s.height, width=s.width, reduction=s.logprob_reduction)
        scores = reward(traj.images, prompts, metadata=[it.metadata for it in items for _ in range(b)]).scores
    rewards = scores.float().view(len(items), b)
    zero = torch.zeros(len(items), b, s.num_steps, device=rewards.device)  # θ = θ_old = θ_ref: every log-ratio is 0
    weights = rdp_step_weights(zero, zero, rewards, cfg.prdp.beta, cfg.prdp.clip_eps, cfg.prdp.logratio_reduction)
    weights = weights.view(len(prompts), s.num_steps)
    per_range = []
    for steps in step_ranges:
        pipe.unet.zero_grad(set_to_none=True)
        backward_weighted(pipe.unet, family_of(pipe), traj, weights, s.batch_size, s.logprob_reduction, steps=steps)
        per_range.append({n: p.grad.detach().clone() for n, p in pipe.unet.named_parameters()})
    total = {n: sum(g[n] for g in per_range) for n in per_range[0]}
    return total, per_range, float(rewards.mean())


def mean_cosine(grads: list[dict], keep) -> tuple[float, float]:
    """Mean pairwise cosine of the selected parameters' gradients, and the mean gradient norm."""
    flat = [torch.cat([g[n].flatten() for n in g if keep(n)]) for g in grads]
    cos = [float(a @ b / (a.norm() * b.norm())) for a, b in itertools.combinations(flat, 2)]
    return sum(cos) / len(cos), float(sum(f.norm() for f in flat) / len(flat))


def needed(rho: float, n: int) -> str:
    return f"{n * (1 / rho - 1):,.0f}" if rho > 0 else "∞ (ρ ≤ 0)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a PRDP config (model, sample, prompts, reward and prdp.{prompts_per_epoch,images_per_prompt,beta})")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, as for genreward train")
    ap.add_argument("--batches", type=int, default=3, help="independent batches (≥ 2)")
    ap.add_argument("--seed", type=int, default=0, help="which prompts are drawn")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    args = ap.parse_args(argv)
    if args.batches < 2:
        ap.error("--batches must be >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, PRDPConfig, args.overrides)
    pipe = load_pipeline(cfg.model.pipeline, device=cfg.model.device, dtype=cfg.model.dtype)
    pipe.unet.requires_grad_(True)
    reward = reward_from_specs(cfg.reward)
    items = load_prompts(cfg.prompts)
    pick = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed))[: cfg.prdp.prompts_per_epoch]
    items = [items[i] for i in pick.tolist()]
    t_steps = cfg.sample.num_steps
    thirds = [range(i * t_steps // 3, (i + 1) * t_steps // 3) for i in range(3)]
    start = time.perf_counter()
    results = [batch_gradient(pipe, cfg, reward, items, 100_000 * (k + 1), thirds) for k in range(args.batches)]
    wall = time.perf_counter() - start
    n = len(items) * cfg.prdp.images_per_prompt
    print(f"{args.config}: {len(items)} prompts × {cfg.prdp.images_per_prompt} images = {n} trajectories per batch, "
          f"T = {t_steps}, {args.batches} batches, mean reward {[round(r[2], 3) for r in results]}, {wall:.0f} s")
    print(f"{'parameters':<26}{'count':>11}{'cosine ρ':>10}{'|g|':>10}{'n for ρ=0.5':>14}")
    for name, keep in GROUPS.items():
        count = sum(p.numel() for pn, p in pipe.unet.named_parameters() if keep(pn))
        rho, norm = mean_cosine([r[0] for r in results], keep)
        print(f"{name:<26}{count:>11,}{rho:>10.3f}{norm:>10.3g}{needed(rho, n):>14}")
    for i, steps in enumerate(thirds):
        rho, norm = mean_cosine([r[1][i] for r in results], GROUPS["all parameters"])
        label = f"steps {steps.start}-{steps.stop - 1} only"
        print(f"{label:<26}{'':>11}{rho:>10.3f}{norm:>10.3g}{needed(rho, n):>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
