"""Train ``world:shapes-t2i``, a tiny Stable-Diffusion-family text-to-image model of the shapes world, on a CPU.

No pretrained text-to-image model can be downloaded where genreward is developed, so reward fine-tuning
needs a base model trained here. This script builds it from the same diffusers / transformers classes as
SD-1.x (``AutoencoderKL``, ``UNet2DConditionModel``, ``CLIPTextModel`` + CLIP's offline BPE tokenizer,
``DDIMScheduler``), so the project's sampler, trainers and LoRA work on it unchanged. Two phases:

1. the VAE (32×32 RGB ↔ 16×16×12 latents) as an autoencoder with a tiny KL term; the latent scaling
   factor is then set to 1/std of the training latents, as SD does. 12 channels = 2×2×3, so the latent
   can hold every pixel. The decoder is trained on posterior means (what the U-Net is trained on);
   decoding posterior samples, as SD's VAE training does, left short CPU runs too blurry for the verifier;
2. the U-Net and the text encoder jointly from scratch on (latent, caption) pairs, ε-prediction, with
   caption dropout so classifier-free guidance works.

Two follow-up modes work on a finished ``--out`` folder: ``--refine-decoder`` trains the VAE decoder
alone on the frozen encoder's latents (the U-Net's latent space does not move), and ``--resume`` trains
the U-Net and text encoder for more steps. The shipped model used all three (see its README.md).

Data: ``shapes.dataset(n, seed, split="train")`` — training captions only, caption types balanced
(single, count, relation in turn). The result is written as component folders (``vae/``, ``unet/``,
``text_encoder/``, ``scheduler/``) plus ``world_model.json`` (tokenizer length and sampling defaults),
then measured with the project's DDIM sampler and the ``verifier`` reward (see :func:`evaluate`).

    python -m genreward.world.train_t2i --out genreward/world/weights/shapes_t2i --seed 0 --threads 1
    python -m genreward.world.train_t2i --refine-decoder --out genreward/world/weights/shapes_t2i --seed 0 --decoder-steps 1500 --threads 1
    python -m genreward.world.train_t2i --resume --out genreward/world/weights/shapes_t2i --seed 0 --steps 1400 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from genreward.models.tokenizers import CLIP_TEXT_TOKEN_IDS
from genreward.world import shapes as W

LATENT_CHANNELS = 12  # 16×16×12 latents hold 32×32×3 pixels exactly (see the module docstring)
MAX_TOKENS = 16  # the longest world caption is 11 CLIP tokens with BOS/EOS
DEFAULTS = {"num_steps": 20, "guidance_scale": 4.0, "eta": 1.0, "height": 32, "width": 32}


def build_components(seed: int) -> tuple[Any, Any, Any]:
    """Fresh (vae, unet, text_encoder) of the world model's architecture, initialised from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,  # flat shapes need no global attention; saves most of the VAE's cost
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **CLIP_TEXT_TOKEN_IDS,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
        )
    )
    return vae, unet, text_encoder


def render_data(n: int, seed: int, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    """``n`` world images as uint8 ``[n,3,32,32]`` (compact in memory) and their captions."""
    images = torch.empty(n, 3, 32, 32, dtype=torch.uint8)
    captions: list[str] = []
    for i, s in enumerate(tqdm(W.dataset(n, seed=seed, split=split), total=n, desc="render", mininterval=5)):
        images[i] = (s.image * 255).round().to(torch.uint8)
        captions.append(s.caption)
    return images, captions


def to_model_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images → float in [-1, 1], the VAE's input range."""
    return batch.float() / 127.5 - 1.0


def _fit_reconstruction(vae, params, images: torch.Tensor, steps: int, batch_size: int, lr: float,
                        rng: np.random.Generator, kl_weight: float | None, desc: str) -> float:
    """Fit ``params`` to reconstruct world images from the posterior mean: L1 + MSE, cosine-decayed lr.

    With ``kl_weight`` the encoder trains too (plus a tiny KL term that keeps latents bounded); without it
    the encoder is frozen and only the decoder side learns.
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vae.train()
    loss_avg = float("nan")
    bar = tqdm(range(steps), desc=desc, mininterval=10)
    for step in bar:
        for group in opt.param_groups:  # cosine decay: sharper reconstructions at the end
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = to_model_range(images[rng.integers(0, len(images), batch_size)])
        with torch.set_grad_enabled(kl_weight is not None):
            post = vae.encode(x).latent_dist
        # Decode the posterior mean: the U-Net is trained on means, and decoding samples (σ ≈ 1 at
        # initialisation) kept a 450-step CPU run blurry (47 % verifier pass on reconstructions).
        rec = vae.decode(post.mean).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        if kl_weight is not None:
            loss = loss + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_avg = loss.item() if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_avg:.4f}")
    vae.eval()
    return loss_avg


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float,
              rng: np.random.Generator) -> float:
    """Autoencoder phase: encoder and decoder together."""
    return _fit_reconstruction(vae, list(vae.parameters()), images, steps, batch_size, lr, rng, kl_weight, "vae")


def refine_decoder(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, rng: np.random.Generator) -> float:
    """Train the decoder alone on the frozen encoder's posterior means.

    The U-Net was trained on exactly these latents, so a sharper decoder improves the finished model
    without retraining anything else; short VAE phases leave edges too soft for the verifier.
    """
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    try:
        return _fit_reconstruction(vae, params, images, steps, batch_size, lr, rng, None, "decoder")
    finally:
        vae.requires_grad_(True)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of all images (unscaled), ``[n,12,16,16]``: the U-Net phase never runs the encoder again."""
    out = [vae.encode(to_model_range(images[i : i + batch_size])).latent_dist.mean for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def vae_reconstruction_pass(vae, images: torch.Tensor, captions: Sequence[str]) -> float:
    """Fraction of reconstructions the verifier still accepts (an upper bound for the whole model)."""
    from genreward.world import verifier as V

    rec = vae.decode(vae.encode(to_model_range(images)).latent_dist.mean).sample
    rec = (rec / 2 + 0.5).clamp(0, 1)
    return float(np.mean([V.score(r, c)["pass"] for r, c in zip(rec, captions)]))


class Ema:
    """Exponential moving average of parameters: short CPU runs give much cleaner samples from it."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, [p.detach() for p in self.params], alpha=1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def train_denoiser(unet, text_encoder, tokenizer, scheduler, latents: torch.Tensor, captions: Sequence[str],
                   steps: int, batch_size: int, lr: float, cond_drop: float, ema_decay: float,
                   rng: np.random.Generator) -> float:
    """U-Net + text encoder phase (ε-prediction MSE); the EMA weights are copied in at the end."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = Ema(params, ema_decay)
    unet.train()
    text_encoder.train()
    warmup = max(1, min(200, steps // 10))
    alphas = scheduler.alphas_cumprod
    loss_avg = float("nan")
    bar = tqdm(range(steps), desc="unet", mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        idx = rng.integers(0, len(latents), batch_size)
        prompts = ["" if rng.random() < cond_drop else captions[i] for i in idx]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = text_encoder(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        loss_avg = loss.item() if math.isnan(loss_avg) else 0.99 * loss_avg + 0.01 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_avg:.4f}")
    ema.copy_to()
    unet.eval()
    text_encoder.eval()
    return loss_avg


def save_model(out: Path, vae, unet, text_encoder, scheduler, meta: dict[str, Any]) -> None:
    """Component folders in fp16 safetensors (loaded back as fp32) + ``world_model.json``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        module.to(torch.float16).save_pretrained(out / name, safe_serialization=True)
        module.to(torch.float32)
    scheduler.save_pretrained(out / "scheduler")
    (out / "world_model.json").write_text(json.dumps(meta, indent=2) + "\n")


def eval_prompts(per_type: int, seed: int = 1000) -> list[dict[str, Any]]:
    """A fixed, balanced evaluation set: ``per_type`` captions of each type from each split (seeded)."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for split in ("train", "holdout"):
        for ctype in W.CAPTION_TYPES:
            pool = [s for s in W.all_specs((ctype,)) if W.split_of(s) == split]
            for k in range(per_type):
                spec = pool[int(rng.integers(len(pool)))]
                rows.append({"prompt": W.caption_of(spec), "type": ctype, "split": split, "spec": spec})
    return rows


@torch.no_grad()
def evaluate(pipe, rows: Sequence[dict[str, Any]], seed: int = 0, num_steps: int = DEFAULTS["num_steps"],
             guidance_scale: float = DEFAULTS["guidance_scale"], eta: float = DEFAULTS["eta"],
             batch_size: int = 64) -> dict[str, Any]:
    """Verifier pass rate per (split, caption type): one image per row, seeds ``seed + i``."""
    from genreward.rewards import build
    from genreward.sampling import sample_trajectories

    reward = build("verifier")
    prompts = [r["prompt"] for r in rows]
    traj = sample_trajectories(pipe, prompts, num_steps=num_steps, guidance_scale=guidance_scale, eta=eta,
                               seeds=[seed + i for i in range(len(rows))], batch_size=batch_size)
    passed = reward(traj.images, prompts, metadata=[{"spec": r["spec"]} for r in rows]).scores
    out: dict[str, Any] = {}
    for key in sorted({(r["split"], r["type"]) for r in rows}):
        sel = [i for i, r in enumerate(rows) if (r["split"], r["type"]) == key]
        out[f"{key[0]}/{key[1]}"] = {"pass_rate": float(passed[sel].mean()), "n": len(sel)}
    out["all"] = {"pass_rate": float(passed.mean()), "n": len(rows)}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (component folders + world_model.json)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the initialisation and the training order")
    p.add_argument("--n-train", type=int, default=24_000, help="rendered training images (balanced caption types)")
    p.add_argument("--vae-steps", type=int, default=350)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--steps", type=int, default=1600, help="U-Net + text-encoder steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cond-drop", type=float, default=0.1, help="caption dropout, for classifier-free guidance")
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--eval-per-type", type=int, default=32, help="eval captions per (split, type); 0 skips the eval")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--refine-decoder", action="store_true",
                   help="phase 3 on an existing --out: train the VAE decoder alone on the frozen encoder's latents")
    p.add_argument("--resume", action="store_true",
                   help="continue the U-Net + text-encoder phase of an existing --out for --steps more steps")
    p.add_argument("--decoder-steps", type=int, default=600)
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    if args.refine_decoder:
        return refine_main(args)
    if args.resume:
        return resume_main(args)

    from diffusers import DDIMScheduler

    from genreward.models.tiny import tiny_scheduler_config
    from genreward.models.tokenizers import build_clip_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.out)
    rng = np.random.default_rng(args.seed)
    vae, unet, text_encoder = build_components(args.seed)
    tokenizer = build_clip_tokenizer(model_max_length=MAX_TOKENS)
    scheduler = DDIMScheduler(**tiny_scheduler_config("epsilon"))

    images, captions = render_data(args.n_train, args.seed)
    vae_loss = train_vae(vae, images, args.vae_steps, args.vae_batch, args.vae_lr, args.kl_weight, rng)
    recon_pass = vae_reconstruction_pass(vae, images[:300], captions[:300])
    raw = encode_latents(vae, images)
    scaling = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scaling)
    print(f"vae: loss {vae_loss:.4f}, verifier pass on reconstructions {recon_pass:.3f}, scaling_factor {scaling:.4f}", flush=True)
    del images
    unet_loss = train_denoiser(unet, text_encoder, tokenizer, scheduler, raw * scaling, captions, args.steps,
                               args.batch, args.lr, args.cond_drop, args.ema, rng)
    train_s = time.time() - start
    meta: dict[str, Any] = {
        "spec": "world:shapes-t2i",
        "tokenizer": {"kind": "clip-bpe (genreward.models.tokenizers)", "model_max_length": MAX_TOKENS},
        "defaults": DEFAULTS,
        "training": {**{k: v for k, v in vars(args).items() if k != "out"}, "wall_time_s": round(train_s, 1),
                     "vae_final_loss": round(vae_loss, 5), "vae_reconstruction_pass": recon_pass,
                     "unet_final_loss": round(unet_loss, 5),
                     "data": "genreward.world.shapes.dataset(n_train, seed, size=32, split='train'), types balanced"},
    }
    save_model(out, vae, unet, text_encoder, scheduler, meta)
    print(f"saved to {out} after {train_s / 60:.1f} min", flush=True)
    if args.eval_per_type > 0:
        from genreward.world.models import load_world_t2i

        pipe = load_world_t2i(out)  # measure the shipped (fp16-stored) weights, not the in-memory ones
        rows = eval_prompts(args.eval_per_type)
        meta["eval"] = {"seed": 0, "per_type": args.eval_per_type, **evaluate(pipe, rows)}
        (out / "world_model.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(json.dumps(meta["eval"], indent=2), flush=True)


def resume_main(args: argparse.Namespace) -> None:
    """``--resume``: more U-Net + text-encoder steps on a trained model (VAE untouched), then re-measure.

    The data are rendered and encoded as in the first run; the batch order comes from ``seed + 2 + k``
    (k = number of earlier resumes), so a resume never replays the first run's batches.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from genreward.models.tokenizers import build_clip_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.out)
    meta = json.loads((out / "world_model.json").read_text())
    f32 = torch.float32
    vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=f32).eval()
    unet = UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=f32)
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder", torch_dtype=f32)
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
    tokenizer = build_clip_tokenizer(model_max_length=int(meta["tokenizer"]["model_max_length"]))
    images, captions = render_data(args.n_train, args.seed)
    latents = encode_latents(vae, images) * float(vae.config.scaling_factor)
    del images
    resumes = meta.setdefault("resumes", [])
    rng = np.random.default_rng(args.seed + 2 + len(resumes))
    loss = train_denoiser(unet, text_encoder, tokenizer, scheduler, latents, captions, args.steps, args.batch,
                          args.lr, args.cond_drop, args.ema, rng)
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        module.to(torch.float16).save_pretrained(out / name, safe_serialization=True)
    resumes.append({"steps": args.steps, "batch": args.batch, "lr": args.lr, "ema": args.ema, "seed": args.seed,
                    "n_train": args.n_train, "wall_time_s": round(time.time() - start, 1), "unet_final_loss": round(loss, 5)})
    meta.pop("eval", None)
    (out / "world_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"resumed {args.steps} steps in {(time.time() - start) / 60:.1f} min, loss {loss:.4f}", flush=True)
    if args.eval_per_type > 0:
        from genreward.world.models import load_world_t2i

        rows = eval_prompts(args.eval_per_type)
        meta["eval"] = {"seed": 0, "per_type": args.eval_per_type, **evaluate(load_world_t2i(out), rows)}
        (out / "world_model.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(json.dumps(meta["eval"], indent=2), flush=True)


def refine_main(args: argparse.Namespace) -> None:
    """Phase 3 (``--refine-decoder``): sharpen the decoder of a trained model in place, then re-measure."""
    from diffusers import AutoencoderKL

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.out)
    meta = json.loads((out / "world_model.json").read_text())
    vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32)
    images, captions = render_data(args.n_train, args.seed)
    before = vae_reconstruction_pass(vae, images[:300], captions[:300])
    loss = refine_decoder(vae, images, args.decoder_steps, args.vae_batch, args.decoder_lr, np.random.default_rng(args.seed + 1))
    after = vae_reconstruction_pass(vae, images[:300], captions[:300])
    print(f"decoder: loss {loss:.4f}, verifier pass on reconstructions {before:.3f} -> {after:.3f}", flush=True)
    vae.to(torch.float16).save_pretrained(out / "vae", safe_serialization=True)
    meta["decoder_refinement"] = {"decoder_steps": args.decoder_steps, "decoder_lr": args.decoder_lr, "batch": args.vae_batch,
                                  "seed": args.seed, "n_train": args.n_train, "wall_time_s": round(time.time() - start, 1),
                                  "final_loss": round(loss, 5), "reconstruction_pass_before": before,
                                  "reconstruction_pass_after": after}
    meta.pop("eval", None)
    (out / "world_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    if args.eval_per_type > 0:
        from genreward.world.models import load_world_t2i

        rows = eval_prompts(args.eval_per_type)
        meta["eval"] = {"seed": 0, "per_type": args.eval_per_type, **evaluate(load_world_t2i(out), rows)}
        (out / "world_model.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(json.dumps(meta["eval"], indent=2), flush=True)


if __name__ == "__main__":
    main()
