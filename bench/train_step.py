"""PRDP epoch wall time by phase, against the denoiser floor measured in the same run, for any model family.

Runs ``trainers.prdp.train`` for a few epochs (the first is warm-up) and reads the per-phase times it logs
(sampling, reward, reference log-probs, training = K × (pass 1 + pass 2)). Then, in the same process, times
the bare U-Net on the same batches: one CFG forward (no grad) and one CFG forward + backward, and multiplies by
the number of U-Net evaluations each phase needs. Ratios near 1 mean the trainer adds little over the U-Net.

    python bench/train_step.py                                # tiny:sd, CPU, LoRA
    python bench/train_step.py --family sd3                   # tiny:sd3 (flow SDE kernel)
    python bench/train_step.py --full-size --trainable full   # SD-1.5 architecture, random weights, bf16 (GPU)
    python bench/train_step.py --full-size --family flux      # FLUX.1-dev architecture, random weights, LoRA (GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from genreward.config import config_from_dict
from trainers.common import TrainingRun
from trainers.prdp import PRDPConfig, train


FULL_SIZE = {"sd": "random:sd15", "sdxl": "random:sdxl", "sd3": "random:sd35m", "flux": "random:flux-dev"}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def unet_floor(run: TrainingRun, batch: int, reps: int) -> tuple[float, float]:
    """Median seconds of one guided denoiser call (CFG pair, or FLUX's single embedded-guidance call) without grad,
    and of one forward + backward, on ``batch`` stored transitions — through the model family, as training calls it."""
    family = run.family
    traj = run.sample([f"animal {i}" for i in range(batch)], list(range(batch)))
    x_t, t = traj.latents[:, 1], traj.timesteps[1]
    fwd, fwd_bwd = [], []
    for rep in range(reps + 1):
        _sync()
        start = time.perf_counter()
        with torch.no_grad(), run.accelerator.autocast():
            family.denoise(run.unet, x_t, t, traj.cond, traj.uncond, traj.guidance_scale)
        _sync()
        fwd.append(time.perf_counter() - start)
        start = time.perf_counter()
        with run.accelerator.autocast():
            out = family.denoise(run.unet, x_t, t, traj.cond, traj.uncond, traj.guidance_scale)
        run.accelerator.backward(out.float().square().mean())
        _sync()
        fwd_bwd.append(time.perf_counter() - start)
        run.optimizer.zero_grad(set_to_none=True)
    return statistics.median(fwd[1:]), statistics.median(fwd_bwd[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="SD-1.5 architecture with random weights, bf16 (GPU)")
    parser.add_argument("--family", choices=["sd", "sdxl", "sd3", "flux"], default="sd",
                        help="model family: tiny:<family>, or with --full-size random:<full-size spec of the family>")
    parser.add_argument("--trainable", choices=["lora", "full"], default="lora")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=None, help="N prompts per epoch")
    parser.add_argument("--images", type=int, default=4, help="B images per prompt")
    parser.add_argument("--updates", type=int, default=1, help="K updates per epoch")
    parser.add_argument("--batch", type=int, default=None, help="trajectories per U-Net call (sampling and training)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs to run; the first is warm-up")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    full = args.full_size
    steps = args.steps or (20 if full else 10)
    n_prompts = args.prompts or (4 if full else 4)
    batch = args.batch or (8 if full else 16)
    data = {
        "trainer": "prdp",
        "output_dir": tempfile.mkdtemp(prefix="bench-train-"),
        "model": {"pipeline": FULL_SIZE[args.family] if full else f"tiny:{args.family}", "device": "auto"},
        "sample": {"num_steps": steps, "guidance_scale": 3.5 if args.family == "flux" else 5.0, "eta": 1.0,
                   "batch_size": batch},
        "prompts": {"path": "animals"},
        "reward": [{"name": "jpeg_compressibility"}],
        "prdp": {"epochs": args.epochs, "updates_per_epoch": args.updates, "prompts_per_epoch": n_prompts,
                 "images_per_prompt": args.images, "beta": 1e-3, "clip_eps": 1e-3},
        "train": {"trainable": args.trainable, "mixed_precision": "bf16" if full else "no", "chunk_size": batch,
                  "gradient_checkpointing": args.gradient_checkpointing, "optim": {"lr": 1e-5}},
        "checkpoint": {"every": 0},
        "eval": {"enabled": False},
        "logging": {"trackers": []},
    }
    config = config_from_dict(data, PRDPConfig)
    wall = time.perf_counter()
    train(config)
    wall = time.perf_counter() - wall
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    nb = n_prompts * args.images
    print(f"model={data['model']['pipeline']} trainable={args.trainable} device={'cuda' if torch.cuda.is_available() else 'cpu'} "
          f"precision={data['train']['mixed_precision']} T={steps} N={n_prompts} B={args.images} K={args.updates} batch={batch}")
    if torch.cuda.is_available():
        print(f"peak GPU memory during training: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        torch.cuda.reset_peak_memory_stats()

    floor_cfg = config_from_dict(dict(data, output_dir=tempfile.mkdtemp(prefix="bench-floor-")), PRDPConfig)
    run = TrainingRun(floor_cfg, need_reference=False)
    t_fwd, t_fwd_bwd = unet_floor(run, batch, reps=5)
    calls = -(-nb // batch) * steps  # U-Net calls (each a CFG pair) to touch every transition once
    floors = {
        "sampling": calls * t_fwd,
        "reference": calls * t_fwd,
        "training": args.updates * calls * (t_fwd + t_fwd_bwd),
    }
    print(f"denoiser floor per guided call of {batch} trajectories: forward {t_fwd * 1000:.1f} ms, forward+backward {t_fwd_bwd * 1000:.1f} ms")
    print("| phase | measured (s) | U-Net floor (s) | ratio |")
    print("|---|---|---|---|")
    total_measured = total_floor = 0.0
    for phase in ("sampling", "reward", "reference", "training"):
        measured = last.get(f"time_{phase}", 0.0)
        floor = floors.get(phase)
        total_measured += measured
        total_floor += floor or 0.0
        ratio = f"{measured / floor:.3f}" if floor else "—"
        print(f"| {phase} | {measured:.3f} | {floor:.3f} | {ratio} |" if floor else f"| {phase} | {measured:.3f} | — | — |")
    print(f"| epoch | {total_measured:.3f} | {total_floor:.3f} | {total_measured / total_floor:.3f} |")
    print(f"whole run incl. model set-up: {wall:.1f}s for {args.epochs} epochs; peak RSS {last['peak_rss_mb']:.0f} MB")
    print(f"ratio: {total_measured / total_floor:.3f}")


if __name__ == "__main__":
    main()
