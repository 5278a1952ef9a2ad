"""Measure the shapes world's project-trained models against the verifier (the numbers in docs/world.md).

* ``world:shapes-t2i``: verifier pass rate per split and caption type on a fixed, balanced caption set
  (``train_t2i.eval_prompts``), one image per caption, seeds 0…n−1, the model's default sampler settings.
* ``world:shapes-clip`` on *generated* images of held-out captions: (a) how often the true caption scores
  higher than a perturbed one (wrong colour / count / relation), counted on the images the verifier
  passes (on the others the "true" caption is not true); (b) agreement of the thresholded CLIP score with
  the verifier's pass/fail over every (image, true or perturbed caption) pair, the threshold chosen on
  rendered *training* images.

    python -m genreward.world.evaluate_models --out genreward/world/weights/eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from genreward.world import shapes as W
from genreward.world import verifier as V


def t2i_pass_rates(pipe, per_type: int, seed: int = 0, **sampler: Any) -> dict[str, Any]:
    """Verifier pass rates of the pipeline on the fixed evaluation captions (see module docstring)."""
    from genreward.world.train_t2i import eval_prompts, evaluate

    return evaluate(pipe, eval_prompts(per_type), seed=seed, **sampler)


@torch.no_grad()
def clip_scores(clip, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """Cosine similarity of each image with its caption (what ``clip_score`` computes before scaling)."""
    return (clip.embed_images(images) * clip.embed_texts(list(captions))).sum(-1)


def caption_pairs(specs: Sequence[dict[str, Any]], seed: int) -> list[tuple[int, str, str]]:
    """(image index, kind, caption) for the true caption and every applicable perturbation of each spec."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, spec in enumerate(specs):
        rows.append((i, "true", W.caption_of(spec)))
        for kind in ("color", "count", "relation"):
            if kind == "relation" and spec["type"] != "relation":
                continue
            rows.append((i, kind, W.caption_of(W.negative_spec(spec, kind, rng))))
    return rows


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The cosine threshold that maximises agreement with the labels (midpoints between sorted scores)."""
    order = np.sort(scores)
    cands = np.concatenate([[order[0] - 1e-3], (order[1:] + order[:-1]) / 2, [order[-1] + 1e-3]])
    agree = [((scores > c) == labels).mean() for c in cands]
    return float(cands[int(np.argmax(agree))])


def clip_vs_verifier(clip, pipe, per_type: int, seed: int = 0, n_calib: int = 600, **sampler: Any) -> dict[str, Any]:
    """CLIP-vs-verifier numbers on generated held-out images (threshold calibrated on training renders)."""
    from genreward.sampling import sample_trajectories
    from genreward.world.train_t2i import eval_prompts

    # threshold: rendered training images, true and perturbed captions, labels from the verifier
    calib = list(W.dataset(n_calib, seed=20_000 + seed, split="train"))
    pairs = caption_pairs([s.spec for s in calib], seed)
    imgs = torch.stack([calib[i].image for i, _, _ in pairs])
    cal_scores = clip_scores(clip, imgs, [c for _, _, c in pairs]).numpy()
    cal_labels = np.array([V.score(calib[i].image, c)["pass"] for i, _, c in pairs])
    tau = best_threshold(cal_scores, cal_labels)

    rows = [r for r in eval_prompts(per_type) if r["split"] == "holdout"]
    traj = sample_trajectories(pipe, [r["prompt"] for r in rows], seeds=[seed + i for i in range(len(rows))],
                               batch_size=64, **sampler)
    pairs = caption_pairs([r["spec"] for r in rows], seed + 1)
    imgs = traj.images[[i for i, _, _ in pairs]]
    scores = clip_scores(clip, imgs, [c for _, _, c in pairs]).numpy()
    labels = np.array([V.score(traj.images[i], c)["pass"] for i, _, c in pairs])
    kinds = np.array([k for _, k, _ in pairs])
    owner = np.array([i for i, _, _ in pairs])
    types = np.array([rows[i]["type"] for i in owner])
    true_score = {i: s for (i, k, _), s in zip(pairs, scores) if k == "true"}
    true_pass = {i: l for (i, k, _), l in zip(pairs, labels) if k == "true"}
    out: dict[str, Any] = {"threshold": tau, "calibration_agreement": float(((cal_scores > tau) == cal_labels).mean()),
                           "n_images": len(rows), "verifier_pass_true_caption": float(np.mean(list(true_pass.values())))}
    pref: dict[str, Any] = {}
    for kind in ("color", "count", "relation"):
        sel = [j for j in range(len(pairs)) if kinds[j] == kind and true_pass[owner[j]] and not labels[j]]
        if sel:
            wins = np.array([true_score[owner[j]] > scores[j] for j in sel])
            pref[kind] = {"accuracy": float(wins.mean()), "n": len(sel),
                          **{t: float(wins[types[sel] == t].mean()) for t in W.CAPTION_TYPES if (types[sel] == t).any()}}
    out["true_beats_perturbed_on_passing_images"] = pref
    agree = (scores > tau) == labels
    # balanced: the mean of the agreement on verifier-passed and on verifier-failed pairs (fails dominate)
    balanced = float(np.mean([agree[labels == v].mean() for v in (True, False) if (labels == v).any()]))
    out["agreement"] = {"all": float(agree.mean()), "balanced": balanced, "n_pairs": len(pairs),
                        "verifier_pass_fraction": float(labels.mean()),
                        **{t: float(agree[types == t].mean()) for t in W.CAPTION_TYPES}}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the measurements")
    p.add_argument("--per-type", type=int, default=64, help="captions per (split, caption type)")
    p.add_argument("--clip-per-type", type=int, default=64, help="held-out captions per type for the CLIP check")
    p.add_argument("--t2i", default=None, help="t2i folder (default: the shipped world:shapes-t2i)")
    p.add_argument("--clip", default="world:shapes-clip", help="CLIP spec or folder")
    p.add_argument("--skip-clip", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from genreward.models.clip import load_clip
    from genreward.world.models import load_world_clip, load_world_t2i, t2i_defaults

    defaults = t2i_defaults(args.t2i)
    sampler = {k: defaults[k] for k in ("num_steps", "guidance_scale", "eta")}
    pipe = load_world_t2i(args.t2i)
    report: dict[str, Any] = {"sampler": sampler}
    start = time.time()
    report["t2i"] = t2i_pass_rates(pipe, args.per_type, **sampler)
    report["t2i_eta0"] = t2i_pass_rates(pipe, args.per_type, **{**sampler, "eta": 0.0})
    report["t2i_seconds"] = round(time.time() - start, 1)
    print(json.dumps(report, indent=2), flush=True)
    if not args.skip_clip:
        clip = load_clip(args.clip, device="cpu") if args.clip.startswith("world:") else load_world_clip(args.clip)
        report["clip"] = clip_vs_verifier(clip, pipe, args.clip_per_type, **sampler)
        samples = list(W.dataset(600, seed=10_000, split="holdout"))
        from genreward.world.train_clip import pair_accuracy
        from genreward.models.tokenizers import build_clip_tokenizer

        report["clip_holdout_renders"] = pair_accuracy(
            clip.model, build_clip_tokenizer(model_max_length=16), torch.stack([s.image for s in samples]),
            [s.spec for s in samples])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
