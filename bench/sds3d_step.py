"""Where an sds3d step spends its time: render, VAE encode, U-Net, SDS backward, VLM forward/backward.

All parts are measured side by side in one run with the trainer's own step (``SDS3DSystem.step``), so the
shares are comparable. Default: tiny models on CPU (tiny:sd + tiny:qwen2-vl, 32 px). ``--full-size``: the
SD-2.1-base architecture (865M U-Net, 512 px latents, OpenCLIP-H-sized text encoder) with random weights
plus the ``random:qwen2.5-vl-3b`` judge in bf16 — for a GPU.

    python bench/sds3d_step.py [--steps 10] [--warmup 2] [--full-size]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from genreward.config import load_config
from trainers.sds3d import SDS3DConfig, SDS3DSystem

TINY = Path(__file__).resolve().parents[1] / "configs" / "sds3d_tiny.yaml"


def build_random_sd21(device: torch.device, dtype: torch.dtype):
    """SD-2.1-base architecture with random weights (no download): linear-projection attention, 1024-d text."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from genreward.models.tiny import tiny_scheduler_config
    from genreward.models.tokenizers import build_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                    use_linear_projection=True)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_clip_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(**tiny_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(device, dtype)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    return pipe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--full-size", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = ["output_dir=outputs/bench_sds3d", f"train.steps={args.steps + args.warmup}",
                 "vlm.stop_step=100000", "loss.lambda_vlm=1.0"]
    guidance = None
    if args.full_size:
        if not torch.cuda.is_available():
            print("--full-size needs a CUDA GPU", file=sys.stderr)
            return 2
        overrides += ["train.device=cuda", "grid.resolution=64", "render.resolution=64", "render.num_samples=64",
                      "vlm.model=random:qwen2.5-vl-3b", "vlm.dtype=bf16", "vlm.image_size=256", "vlm.render_resolution=64",
                      "guidance.dtype=fp16", "loss.lambda_sds=0.0"]  # λ_sds 0: the bench passes its own SD-2.1 guidance
    config = load_config(TINY, SDS3DConfig, overrides)
    if args.full_size:
        from trainers.sds3d.guidance import SDSGuidance

        g = config.guidance
        pipe = build_random_sd21(torch.device("cuda"), torch.float16)
        guidance = SDSGuidance(pipe, g.guidance_scale, g.cfg_convention, g.weighting, g.min_step_percent, g.max_step_percent)
        config.loss.lambda_sds = 1.0
    system = SDS3DSystem(config, guidance=guidance)
    for _ in range(args.warmup):
        system.step()
    system.timer.seconds.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        system.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    parts = dict(system.timer.seconds)
    parts["other"] = max(0.0, wall - sum(parts.values()))
    device = torch.cuda.get_device_name() if config.train.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"sds3d step on {device}: {'full size (random SD-2.1-base + random:qwen2.5-vl-3b bf16)' if args.full_size else 'tiny (tiny:sd + tiny:qwen2-vl)'}")
    print(f"render {config.render.resolution}px x {config.camera.batch_size} view(s) + VLM {config.vlm.num_views} views, "
          f"grid {config.grid.resolution}^3, {config.render.num_samples} samples/ray; {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'part':<16}{'s/step':>10}{'share':>9}")
    for name, sec in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"{name:<16}{sec / args.steps:>10.4f}{100 * sec / wall:>8.1f}%")
    print(f"{'total':<16}{wall / args.steps:>10.4f}{100.0:>8.1f}%   -> {args.steps / wall:.3f} it/s")
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
