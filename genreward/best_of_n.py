"""Best-of-N reference images (RewardDance §3.3.1, docs/algorithms/rewarddance.md §5).

The pairwise RewardDance judge compares a generated image against a reference x_ref of the same prompt;
the paper picks x_ref per prompt as the best of N samples of the SFT model ("Best-of-16 Top-2" is its best
setting). ``genreward best-of-n CONFIG`` samples N images per prompt (through :func:`evaluate`, so seeds
and the candidate run folder are the same as ``genreward eval``'s), ranks them, and keeps the top k.

Rankings:

* ``score`` — by the (weighted sum of the) listed reward(s), highest first; non-finite scores last.
* ``pairwise_wins`` — with one pairwise ``vlm_judge``: every ordered pair (i, j), i ≠ j, of a prompt's
  images is judged with image i as the reference, P = P(j ≻ i). P above the threshold (0.5, or 0 for
  ``log_odds``) is a win for j, below it a win for i, exactly at it half a win each. Images are ranked by
  win count; ties by mean P as the candidate (mean over i of P(j ≻ i)), then by sample index.

Output folder::

    candidates/            the evaluate run folder of all N·prompts images (+ gallery.html)
    references/pPPPP_kK.png  the k-th best image of prompt PPPP (a byte copy of its candidate PNG)
    references.jsonl       one line per prompt: prompt, metadata, images (relative paths), scores, ...
    metrics.jsonl, summary.*, gallery.html   the chosen images as a run folder
    pairwise.jsonl         (pairwise_wins) the P matrix of every prompt, P[i][j] = P(j ≻ i | ref i)
    config.yaml

:func:`load_references` reads ``references.jsonl`` back as ``{prompt: [k,3,H,W] tensor in [0,1]}``,
ready to be passed as the pairwise judge's ``reference_images``.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from genreward.errors import GenrewardError
from genreward.images import load_images
from genreward.jsonl import iter_jsonl
from genreward.rewards.base import Reward, RewardSpec, reward_from_specs
from genreward.schema import ModelConfig, PromptsConfig, SampleConfig

REFERENCES_FILE = "references.jsonl"
CANDIDATES_DIR = "candidates"


@dataclass
class BestOfNConfig:
    """``genreward best-of-n CONFIG``: the top ``top_k`` of ``n`` samples per prompt as reference images."""

    output_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    n: int = 8  # images per prompt
    top_k: int = 1  # references kept per prompt
    seed: int = 0
    reward: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="jpeg_compressibility")])
    ranking: Literal["score", "pairwise_wins"] = "score"

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"key 'n' must be >= 1, got {self.n}")
        if self.top_k < 1:
            raise ValueError(f"key 'top_k' must be >= 1, got {self.top_k}")
        if self.top_k > self.n:
            raise ValueError(f"key 'top_k' ({self.top_k}) must be <= 'n' ({self.n}): cannot keep more images than are sampled")
        if not self.reward:
            raise ValueError("key 'reward' lists no reward; add the ranking reward")
        if self.ranking == "pairwise_wins":
            if self.n < 2:
                raise ValueError(f"ranking 'pairwise_wins' needs n >= 2 images per prompt to compare, got n={self.n}")
            spec = self.reward[0]
            if len(self.reward) != 1 or spec.name != "vlm_judge" or spec.options.get("mode") != "pairwise":
                raise ValueError(
                    "ranking 'pairwise_wins' needs exactly one reward {name: vlm_judge, options: {mode: pairwise, ...}}"
                )


@dataclass
class BestOfNResult:
    references: Path  # references.jsonl
    gallery: Path
    chosen: list[dict]  # metrics records of the chosen images
    output_dir: Path


def rank_by_score(scores: Sequence[float | None]) -> list[int]:
    """Indices by descending score; None/non-finite scores last, ties by index (stable)."""
    def key(i: int) -> tuple[int, float, int]:
        s = scores[i]
        finite = s is not None and math.isfinite(s)
        return (0 if finite else 1, -s if finite else 0.0, i)

    return sorted(range(len(scores)), key=key)


def rank_by_pairwise_wins(probs: torch.Tensor, threshold: float = 0.5) -> tuple[list[int], list[float], list[float]]:
    """Rank N images from ``probs[i, j] = P(j ≻ i)`` (reference i; diagonal ignored).

    Returns (order best first, win counts, mean P as candidate). A pair above ``threshold`` is a win for
    j, below a win for i, equal half a win each; ties in wins go to the higher mean P, then the lower index.
    """
    n = probs.shape[0]
    if probs.shape != (n, n) or n < 2:
        raise GenrewardError(f"pairwise ranking needs an [N,N] probability matrix with N >= 2, got {tuple(probs.shape)}")
    p = probs.double()
    wins = [0.0] * n
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            v = float(p[i, j])
            if v > threshold:
                wins[j] += 1.0
            elif v < threshold:
                wins[i] += 1.0
            else:  # exact tie, or NaN: no information, split the point
                wins[i] += 0.5
                wins[j] += 0.5
    off = ~torch.eye(n, dtype=torch.bool)
    mean_p = [float(p[:, j][off[:, j]].nanmean()) for j in range(n)]
    order = sorted(range(n), key=lambda j: (-wins[j], -(mean_p[j] if math.isfinite(mean_p[j]) else -math.inf), j))
    return order, wins, mean_p


def pairwise_matrix(judge: Reward, images: torch.Tensor, prompt: str, metadata: dict) -> torch.Tensor:
    """``P[i, j]`` = the judge's P(image j ≻ image i) with image i as reference; all pairs in one call."""
    n = images.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    refs = images[[i for i, _ in pairs]]
    cands = images[[j for _, j in pairs]]
    with torch.no_grad():
        out = judge(cands, [prompt] * len(pairs), metadata=[metadata] * len(pairs), reference_images=refs)
    scores = out.scores.detach().float().cpu()
    matrix = torch.full((n, n), float("nan"))
    for (i, j), s in zip(pairs, scores):
        matrix[i, j] = s
    return matrix


def run_best_of_n(config: BestOfNConfig, pipe=None, progress: bool = True) -> BestOfNResult:
    """Sample, rank and write the reference folder (``pipe`` overrides ``config.model``, e.g. in tests)."""
    from genreward.config import save_config
    from genreward.evaluation import evaluate, write_run_outputs
    from genreward.gallery import write_gallery
    from genreward.prompts import load_prompts

    out = Path(config.output_dir)
    save_config(config, out)
    items = load_prompts(config.prompts)
    reward = reward_from_specs(config.reward, name="best_of_n")
    pairwise = config.ranking == "pairwise_wins"
    if pairwise and getattr(reward, "mode", None) != "pairwise":
        raise GenrewardError("ranking 'pairwise_wins' needs a vlm_judge reward with mode: pairwise")
    if pipe is None:
        from genreward.models import load_pipeline

        m = config.model
        pipe = load_pipeline(m.pipeline, device=m.device, dtype=m.dtype, lora=m.lora, unet=m.unet)
    cand_dir = out / CANDIDATES_DIR
    # The pairwise judge needs a reference per call, so evaluate only samples; ranking happens below.
    result = evaluate(
        pipe, items, [] if pairwise else [reward], cand_dir, config.sample,
        images_per_prompt=config.n, seed=config.seed, progress=progress,
    )
    by_prompt: dict[int, list[dict]] = {}
    for rec in result.records:
        by_prompt.setdefault(rec["prompt_index"], []).append(rec)

    threshold = 0.0 if getattr(reward, "normalization", None) == "log_odds" else 0.5
    ref_dir = out / "references"
    ref_dir.mkdir(parents=True, exist_ok=True)
    chosen: list[dict] = []
    lines: list[dict] = []
    matrices: list[dict] = []
    for p_index, recs in sorted(by_prompt.items()):
        recs.sort(key=lambda r: r["sample_index"])
        prompt, metadata = recs[0]["prompt"], recs[0]["metadata"]
        if pairwise:
            # Judge the saved PNGs: exactly the pixels a trainer will load back as references.
            images = load_images([cand_dir / r["image"] for r in recs])
            matrix = pairwise_matrix(reward, images, prompt, metadata)
            order, wins, mean_p = rank_by_pairwise_wins(matrix, threshold)
            for r, w, mp in zip(recs, wins, mean_p):
                r["rewards"] = {"wins": w, "mean_p": mp if math.isfinite(mp) else None}
            matrices.append({"prompt_index": p_index, "prompt": prompt, "p": [[_num(v) for v in row] for row in matrix.tolist()]})
            score_of = list(wins)
        else:
            score_of = [r["rewards"][reward.name] for r in recs]
            order = rank_by_score(score_of)
        top = order[: config.top_k]
        paths, scores = [], []
        for k, j in enumerate(top):
            rel = f"references/p{p_index:04d}_k{k}.png"
            shutil.copyfile(cand_dir / recs[j]["image"], out / rel)
            paths.append(rel)
            scores.append(score_of[j])
            chosen.append(
                {
                    "prompt_index": p_index,
                    "prompt": prompt,
                    "sample_index": k,  # rank, so the gallery shows the best first
                    "candidate": recs[j]["sample_index"],
                    "seed": recs[j]["seed"],
                    "image": rel,
                    "metadata": metadata,
                    "rewards": dict(recs[j]["rewards"]),
                }
            )
        lines.append(
            {
                "prompt_index": p_index,
                "prompt": prompt,
                "metadata": metadata,
                "images": paths,
                "scores": scores,
                "score_name": "wins" if pairwise else reward.name,
                "candidates": [recs[j]["sample_index"] for j in top],
                "seeds": [recs[j]["seed"] for j in top],
                "ranking": config.ranking,
            }
        )
    names = ["wins", "mean_p"] if pairwise else [reward.name]
    if pairwise:  # the candidate gallery shows every image's wins and mean P
        write_run_outputs(result.records, names, cand_dir)
        _write_jsonl(out / "pairwise.jsonl", matrices)
    write_gallery(cand_dir)
    refs = _write_jsonl(out / REFERENCES_FILE, lines)
    write_run_outputs(chosen, names, out)
    gallery = write_gallery(out, title=f"genreward best-of-{config.n} top-{config.top_k}: {out.name}")
    return BestOfNResult(references=refs, gallery=gallery, chosen=chosen, output_dir=out)


def _num(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def load_references(path: str | Path, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """``references.jsonl`` (or the folder holding it) → ``{prompt: [k,3,H,W] float in [0,1]}``.

    Image paths are relative to the file's folder. A prompt listed on several lines gets all their
    images (concatenated in file order). ``size=(H, W)`` resizes every image.
    """
    path = Path(path)
    if path.is_dir():
        path = path / REFERENCES_FILE
    if not path.is_file():
        raise GenrewardError(f"references file not found: {path}")
    refs: dict[str, torch.Tensor] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, rec in iter_jsonl(fh, path):
            where = f"{path}:{lineno}"
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise GenrewardError(f"{where}: expected an object with a string 'prompt'")
            images = rec.get("images")
            if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
                raise GenrewardError(f"{where}: 'images' must be a non-empty list of paths, got {images!r}")
            tensor = load_images([path.parent / p for p in images], size=size)
            prompt = rec["prompt"]
            if prompt in refs:
                if refs[prompt].shape[-2:] != tensor.shape[-2:]:
                    raise GenrewardError(f"{where}: images of prompt {prompt!r} differ in size from earlier lines; pass size=(H, W)")
                tensor = torch.cat([refs[prompt], tensor])
            refs[prompt] = tensor
    if not refs:
        raise GenrewardError(f"references file {path} has no entries")
    return refs
