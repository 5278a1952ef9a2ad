"""Direct reward back-propagation (DRaFT-K) in the shapes world: a low-variance comparison point for PRDP.

PRDP only sees the reward's value, so its gradient is a score-function estimate (mostly noise at small batch
sizes; bench/prdp_gradient_snr.py). A differentiable reward such as the world judge allows the pathwise
gradient instead: sample with the same stochastic DDIM sampler (η, guidance) but with the step noise held
fixed, keep the graph through the last K denoising steps and the VAE decoder, and ascend the judge's score.
This script runs that loop (LoRA on the U-Net's attention, as PRDP's shipped configs) for a wall-clock budget
and evaluates the held-out verifier pass rate before and after on fixed seeds — the same measurement as
docs/world.md's PRDP table. It is an experiment for comparison, not a genreward trainer.

    python experiments/world_reward_backprop.py --minutes 15 [--lr 1e-3] [--backprop-steps 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from genreward.models.pipeline import load_pipeline
from genreward.prompts import load_prompt_set, select_prompts
from genreward.rewards.base import build
from genreward.sampling import (
    ddim_mean_std,
    decode_latents,
    encode_prompts,
    guided_model_output,
    initial_latents,
    make_generators,
    randn_like_per_sample,
    sample_trajectories,
)

STEPS, GUIDANCE, ETA = 10, 4.0, 1.0  # the world configs' sampler


def sample_with_grad(pipe, prompts: list[str], seeds: list[int], backprop_steps: int) -> torch.Tensor:
    """Images from the stochastic DDIM sampler with fixed noise; the graph is kept through the last K steps."""
    gens = make_generators(seeds)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with torch.no_grad():
        cond, uncond = encode_prompts(pipe, prompts)
    pipe.scheduler.set_timesteps(STEPS)
    x = initial_latents(pipe, len(prompts), size, size, gens)
    for i, t in enumerate(pipe.scheduler.timesteps):
        with torch.set_grad_enabled(i >= STEPS - backprop_steps):
            out = guided_model_output(pipe.unet, pipe.scheduler.scale_model_input(x, t), t, cond, uncond, GUIDANCE)
            mean, std, _ = ddim_mean_std(pipe.scheduler, out, t, x, ETA)
            x = mean + std * randn_like_per_sample(mean, gens)
    return decode_latents(pipe, x)


def evaluate(pipe, items, verifier, judge, images_per_prompt: int) -> tuple[float, float]:
    """Verifier pass rate and mean judge score on fixed seeds (the same images before and after when θ is unchanged)."""
    prompts = [it.prompt for it in items for _ in range(images_per_prompt)]
    meta = [it.metadata for it in items for _ in range(images_per_prompt)]
    with torch.no_grad():
        traj = sample_trajectories(pipe, prompts, num_steps=STEPS, guidance_scale=GUIDANCE, eta=ETA,
                                   seeds=[10_000 + i for i in range(len(prompts))], batch_size=64)
        return (float(verifier(traj.images, prompts, metadata=meta).scores.mean()),
                float(judge(traj.images, prompts, metadata=meta).scores.mean()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="world:shapes-t2i")
    ap.add_argument("--judge", default="world:shapes-judge")
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget for training (evaluation not counted)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many updates (0 = only the budget)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--backprop-steps", type=int, default=1, help="K: denoising steps kept in the graph")
    ap.add_argument("--eval-images", type=int, default=8, help="images per held-out caption")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if not 1 <= args.backprop_steps <= STEPS:
        ap.error(f"--backprop-steps must be in 1..{STEPS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = load_pipeline(args.pipeline, device="cpu")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    from peft import LoraConfig

    pipe.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    judge = build("vlm_judge", model=args.judge, normalization="yes_no")
    judge.model.requires_grad_(False)
    verifier = build("verifier")
    where = {"type": ["single", "count"]}
    train_items = select_prompts(load_prompt_set("shapes_train"), where)
    eval_items = select_prompts(load_prompt_set("shapes_holdout"), where)

    before = evaluate(pipe, eval_items, verifier, judge, args.eval_images)
    print(f"before: held-out verifier pass {before[0]:.4f}, judge {before[1]:.4f} ({len(eval_items)} captions × {args.eval_images})")
    gen = torch.Generator().manual_seed(0)
    start, step, recent = time.perf_counter(), 0, []
    while time.perf_counter() - start < 60 * args.minutes and (not args.max_steps or step < args.max_steps):
        chosen = torch.randint(len(train_items), (args.prompts_per_step,), generator=gen).tolist()
        prompts = [train_items[i].prompt for i in chosen for _ in range(args.images_per_prompt)]
        seeds = torch.randint(2**31 - 1, (len(prompts),), generator=gen).tolist()
        images = sample_with_grad(pipe, prompts, seeds, args.backprop_steps)
        score = judge(images, prompts).scores
        loss = -score.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        recent.append(float(score.detach().mean()))
        if step % 25 == 0:
            print(f"step {step}: training judge score (last 25) {sum(recent[-25:]) / len(recent[-25:]):.4f}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    wall = time.perf_counter() - start
    after = evaluate(pipe, eval_items, verifier, judge, args.eval_images)
    print(f"after {step} updates in {wall:.0f} s: held-out verifier pass {after[0]:.4f}, judge {after[1]:.4f}")
    print(f"verifier gain {100 * (after[0] - before[0]):+.1f} points; judge gain {100 * (after[1] - before[1]):+.1f}; "
          f"hacking gap {100 * ((after[1] - before[1]) - (after[0] - before[0])):+.1f} points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
