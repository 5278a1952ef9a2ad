"""Train ``world:shapes-clip``, a tiny contrastive CLIP of the shapes world, on a CPU.

The ``clip_score`` reward needs a CLIP that knows the world's words; none can be downloaded here, so this
script trains a transformers ``CLIPModel`` (small vision and text towers, CLIP's offline BPE tokenizer)
from scratch on world image–caption pairs. Besides the usual in-batch contrastive loss, every image
also competes against hard negatives of its own scene — the caption with one object recoloured, with a
wrong count, and (for relations) with the relation reversed (``shapes.negative_spec``) — because those
are exactly the mistakes a reward must catch in generated images.

Preprocessing is the one :class:`genreward.models.clip.ClipModel` applies at load time (32×32 input,
OpenAI mean/std), so the trained model scores images exactly as it was trained. Weights are written as a
transformers folder in fp16 safetensors (loaded back in fp32) with ``world_clip.json`` (recipe, measured
accuracies). ::

    python -m genreward.world.train_clip --out genreward/world/weights/shapes_clip --seed 0
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

from genreward.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from genreward.models.tokenizers import CLIP_TEXT_TOKEN_IDS
from genreward.world import shapes as W

MAX_TOKENS = 16
NEGATIVE_KINDS = ("color", "count", "relation")


def build_clip(seed: int):
    """A fresh small ``CLIPModel``: ViT with 4-px patches on 32×32 images, 2-layer text tower, 64-d joint space."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            **CLIP_TEXT_TOKEN_IDS,
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=4,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
        projection_dim=64,
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """[0,1] images → CLIP-normalised pixels (the same constants ``load_clip`` uses for this model)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def negatives_of(spec: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """One wrong caption per applicable kind (colour, count, and relation for relation captions)."""
    kinds = NEGATIVE_KINDS if spec["type"] == "relation" else NEGATIVE_KINDS[:2]
    return [W.caption_of(W.negative_spec(spec, k, rng)) for k in kinds]


def make_batch(seed: int, start: int, n: int, rng: np.random.Generator, max_noise: float,
               split: str | None = "train") -> tuple[torch.Tensor, list[str], list[list[str]]]:
    """Images (with random pixel noise up to ``max_noise``), true captions and hard-negative captions."""
    images, captions, negs = [], [], []
    for s in W.dataset(n, seed=seed, split=split, start=start):
        img = s.image
        if max_noise > 0:
            img = (img + torch.randn(img.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31)))) * float(rng.uniform(0, max_noise))).clamp(0, 1)
        images.append(img)
        captions.append(s.caption)
        negs.append(negatives_of(s.spec, rng))
    return torch.stack(images), captions, negs


def text_features(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised text embeddings, tokenised exactly as ``ClipModel.encode_text`` does."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    out = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(out, dim=-1)


def image_features(model, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings of [0,1] images."""
    out = model.get_image_features(pixel_values=normalise(images))
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(out, dim=-1)


def clip_loss(model, tokenizer, images: torch.Tensor, captions: Sequence[str], negs: Sequence[Sequence[str]],
              hard_weight: float) -> torch.Tensor:
    """Symmetric in-batch InfoNCE; image→text also sees every image's hard negatives as extra columns.

    Duplicate captions in a batch would be false negatives, so texts are de-duplicated and each image's
    target is its caption's column.
    """
    uniq = list(dict.fromkeys(captions))
    col = {c: i for i, c in enumerate(uniq)}
    flat_negs = [n for ns in negs for n in ns]
    t_all = text_features(model, tokenizer, uniq + flat_negs)
    t_pos, t_neg = t_all[: len(uniq)], t_all[len(uniq) :]
    v = image_features(model, images)
    scale = model.logit_scale.exp().clamp(max=100)
    target = torch.tensor([col[c] for c in captions])
    logits_i = scale * v @ t_pos.T  # [B, U]
    # image → text: all distinct captions of the batch, plus this image's own hard negatives
    owner = torch.tensor([i for i, ns in enumerate(negs) for _ in ns], dtype=torch.long)
    slot = torch.tensor([j for ns in negs for j in range(len(ns))], dtype=torch.long)
    hard_sim = (v[owner] * t_neg).sum(-1)  # [N] similarity of each negative to its own image
    neg_logits = torch.full((len(captions), max(len(n) for n in negs)), -1e4)
    neg_logits = neg_logits.index_put((owner, slot), scale * hard_sim)
    loss_i = F.cross_entropy(torch.cat([logits_i, neg_logits], dim=1), target)
    # text → image: each distinct caption against the images (mean over images that carry it)
    logp_t = F.log_softmax(logits_i.T, dim=1)  # [U, B]
    pos_mask = F.one_hot(target, len(uniq)).T.float()
    loss_t = -(logp_t * pos_mask).sum(1).div(pos_mask.sum(1)).mean()
    # pairwise hard-negative margin: the true caption must beat each perturbed one for the same image
    pos_sim = (v * t_pos[target]).sum(-1)
    loss_h = F.softplus((hard_sim - pos_sim[owner]) * scale).mean()
    return 0.5 * (loss_i + loss_t) + hard_weight * loss_h


@torch.no_grad()
def pair_accuracy(model, tokenizer, images: torch.Tensor, specs: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """How often the true caption scores higher than each kind of perturbed caption, per caption type."""
    rng = np.random.default_rng(seed)
    v = image_features(model, images)
    t_true = text_features(model, tokenizer, [W.caption_of(s) for s in specs])
    s_true = (v * t_true).sum(-1)
    out: dict[str, Any] = {}
    for kind in NEGATIVE_KINDS:
        sel = [i for i, s in enumerate(specs) if kind != "relation" or s["type"] == "relation"]
        if not sel:
            continue
        negs = [W.caption_of(W.negative_spec(specs[i], kind, rng)) for i in sel]
        s_neg = (v[sel] * text_features(model, tokenizer, negs)).sum(-1)
        wins = (s_true[sel] > s_neg).float()
        out[kind] = {"accuracy": float(wins.mean()), "n": len(sel)}
        for ctype in W.CAPTION_TYPES:
            sub = [k for k, i in enumerate(sel) if specs[i]["type"] == ctype]
            if sub:
                out[kind][ctype] = float(wins[sub].mean())
    return out


def save_clip(model, out: Path, meta: dict[str, Any]) -> None:
    """transformers folder in fp16 safetensors + ``world_clip.json``."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    (out / "world_clip.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (transformers CLIPModel + world_clip.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hard-weight", type=float, default=2.0, help="weight of the hard-negative margin loss")
    p.add_argument("--max-noise", type=float, default=0.06, help="random pixel-noise σ up to this (robustness)")
    p.add_argument("--eval-n", type=int, default=600, help="held-out renders for the accuracy report (0 skips)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)

    from genreward.models.tokenizers import build_clip_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    rng = np.random.default_rng(args.seed)
    tokenizer = build_clip_tokenizer(model_max_length=MAX_TOKENS)
    model = build_clip(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, min(200, args.steps // 10))
    model.train()
    loss_avg = float("nan")
    bar = tqdm(range(args.steps), desc="clip", mininterval=10)
    for step in bar:
        frac = step / max(1, args.steps)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
        images, captions, negs = make_batch(args.seed, step * args.batch, args.batch, rng, args.max_noise)
        loss = clip_loss(model, tokenizer, images, captions, negs, args.hard_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_avg:.3f}")
    model.eval()
    train_s = time.time() - start
    meta: dict[str, Any] = {
        "spec": "world:shapes-clip",
        "training": {**{k: v for k, v in vars(args).items() if k != "out"}, "wall_time_s": round(train_s, 1),
                     "final_loss": round(loss_avg, 4),
                     "data": "genreward.world.shapes.dataset(steps*batch, seed, split='train'), a fresh image every item"},
    }
    out = Path(args.out)
    save_clip(model, out, meta)
    print(f"saved to {out} after {train_s / 60:.1f} min", flush=True)
    if args.eval_n > 0:
        from genreward.world.models import load_world_clip

        clip = load_world_clip(out)  # the written fp16 weights, through the loader of world:shapes-clip
        samples = list(W.dataset(args.eval_n, seed=10_000 + args.seed, split="holdout"))
        images = torch.stack([s.image for s in samples])
        meta["eval_holdout_renders"] = pair_accuracy(clip.model, tokenizer, images, [s.spec for s in samples])
        (out / "world_clip.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(json.dumps(meta["eval_holdout_renders"], indent=2), flush=True)


if __name__ == "__main__":
    main()
