"""Prompt-set evaluation: sample N images per prompt, score them with rewards, write a run folder.

Output layout (what ``genreward gallery`` reads):
``images/pPPPP_sSS.png``, ``metrics.jsonl`` (one object per image), ``summary.csv`` and ``summary.md``
(per prompt and overall mean ± std of each reward) and ``summary.json`` (overall mean per reward name).
"""

from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from genreward.errors import GenrewardError
from genreward.images import save_png
from genreward.prompts import PromptItem
from genreward.rewards.base import Reward
from genreward.sampling import sample_trajectories
from genreward.schema import SampleConfig


@dataclass
class EvalResult:
    records: list[dict]
    summary: dict[str, float]  # overall mean per reward name
    output_dir: Path


def image_seed(base_seed: int, prompt_index: int, sample_index: int, images_per_prompt: int) -> int:
    """Seed of one evaluation image: fixed by its position, so before/after runs share initial noise."""
    return base_seed + prompt_index * images_per_prompt + sample_index


def score_images(rewards: Sequence[Reward], images: torch.Tensor, prompts: list[str], metadata: list[dict],
                 verdicts: dict[str, list[str]] | None = None) -> dict[str, torch.Tensor]:
    """All rewards on one batch → {reward name: scores [B] on CPU}. Non-finite scores are kept as NaN.

    Every reward is called with ``update_stats=False``: scoring held-out images must not move a stateful
    reward's running statistics (e.g. ``meanstd``), which may be the training reward itself. Rewards that
    explain themselves (``RewardOutput.verdicts``) add their per-image texts to ``verdicts``.
    """
    scores = {}
    for reward in rewards:
        with torch.no_grad():
            out = reward(images, prompts, metadata=metadata, update_stats=False)
        scores[reward.name] = out.scores.detach().float().cpu()
        if verdicts is not None and out.verdicts is not None:
            verdicts[reward.name] = list(out.verdicts)
    return scores


def evaluate(
    pipe,
    items: Sequence[PromptItem],
    rewards: Sequence[Reward],
    output_dir: str | Path,
    sample: SampleConfig,
    images_per_prompt: int = 4,
    seed: int = 0,
    eta: float | None = None,
    unet=None,
    progress: bool = True,
) -> EvalResult:
    """Sample ``images_per_prompt`` images for every prompt, score, and write the run folder.

    Rewards leave with the state they came in with: they are called with ``update_stats=False`` and, as a
    guard for stateful rewards that ignore that key (or keep caches, like ``par``'s reference rewards),
    the ``state_dict()`` of every reward that has one is snapshotted first and restored afterwards. The
    training reward may be passed here, and evaluation runs on the main process only, so any state change
    would leak held-out prompts into training and make the ranks' reward states differ.
    """
    if not items:
        raise GenrewardError("evaluation needs at least one prompt")
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise GenrewardError(f"two rewards share a name in {names}; give one a 'label'")
    snapshots = [_snapshot_state(r) for r in rewards]
    try:
        return _evaluate(pipe, items, rewards, names, Path(output_dir), sample, images_per_prompt, seed, eta, unet, progress)
    finally:
        for reward, state in zip(rewards, snapshots):
            if state is not None:
                reward.load_state_dict(state)


def _snapshot_state(reward: Reward) -> dict[str, Any] | None:
    """A deep copy of a stateful reward's ``state_dict()`` (None for stateless ones and torch modules, whose
    state is their frozen weights)."""
    get, load = getattr(reward, "state_dict", None), getattr(reward, "load_state_dict", None)
    if not callable(get) or not callable(load) or isinstance(reward, torch.nn.Module):
        return None
    return copy.deepcopy(get())


def _evaluate(pipe, items: Sequence[PromptItem], rewards: Sequence[Reward], names: list[str], out: Path,
              sample: SampleConfig, images_per_prompt: int, seed: int, eta: float | None, unet, progress: bool) -> EvalResult:
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(i, j) for i in range(len(items)) for j in range(images_per_prompt)]
    records: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="evaluating", unit="img")
    for start in range(0, len(jobs), sample.batch_size):
        batch = jobs[start : start + sample.batch_size]
        prompts = [items[i].prompt for i, _ in batch]
        metadata = [items[i].metadata for i, _ in batch]
        seeds = [image_seed(seed, i, j, images_per_prompt) for i, j in batch]
        traj = sample_trajectories(
            pipe,
            prompts,
            num_steps=sample.num_steps,
            guidance_scale=sample.guidance_scale,
            eta=sample.eta if eta is None else eta,
            negative_prompt=sample.negative_prompt,
            seeds=seeds,
            height=sample.height,
            width=sample.width,
            reduction=sample.logprob_reduction,
            unet=unet,
        )
        verdicts: dict[str, list[str]] = {}
        scores = score_images(rewards, traj.images, prompts, metadata, verdicts)
        for k, (i, j) in enumerate(batch):
            rel = f"images/p{i:04d}_s{j:02d}.png"
            save_png(traj.images[k], out / rel)
            records.append(
                {
                    "prompt_index": i,
                    "prompt": items[i].prompt,
                    "sample_index": j,
                    "seed": seeds[k],
                    "image": rel,
                    "metadata": items[i].metadata,
                    "rewards": {name: _finite_or_none(scores[name][k].item()) for name in names},
                    **({"verdicts": {name: texts[k] for name, texts in verdicts.items()}} if verdicts else {}),
                }
            )
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    summary = write_run_outputs(records, names, out)
    return EvalResult(records=records, summary=summary, output_dir=out)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan"), 0
    t = torch.tensor(vals, dtype=torch.float64)
    std = t.std(unbiased=False).item() if len(vals) > 1 else 0.0
    return t.mean().item(), std, len(vals)


def write_run_outputs(records: list[dict], reward_names: list[str], out: Path) -> dict[str, float]:
    """metrics.jsonl, summary.csv/.md/.json from per-image records; returns overall means."""
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    prompts: dict[int, str] = {}
    for rec in records:
        prompts.setdefault(rec["prompt_index"], rec["prompt"])
    rows = []
    for i, prompt in sorted(prompts.items()):
        row = {"prompt_index": i, "prompt": prompt}
        for name in reward_names:
            m, s, _ = _mean_std([r["rewards"][name] for r in records if r["prompt_index"] == i])
            row[f"{name}_mean"], row[f"{name}_std"] = m, s
        rows.append(row)
    overall = {"prompt_index": "all", "prompt": "(overall)"}
    summary: dict[str, float] = {}
    for name in reward_names:
        m, s, n = _mean_std([r["rewards"][name] for r in records])
        overall[f"{name}_mean"], overall[f"{name}_std"] = m, s
        summary[name] = m
        dropped = len(records) - n
        if dropped:
            overall[f"{name}_nonfinite"] = dropped
    fields = ["prompt_index", "prompt"] + [f"{n}_{s}" for n in reward_names for s in ("mean", "std")]
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows + [overall])
    lines = ["| prompt | " + " | ".join(reward_names) + " |", "|---|" + "---|" * len(reward_names)]
    for row in rows + [overall]:
        cells = [f"{row[f'{n}_mean']:.4g} ± {row[f'{n}_std']:.2g}" for n in reward_names]
        prompt = str(row["prompt"]).replace("|", "\\|")
        lines.append(f"| {'**' + prompt + '**' if row is overall else prompt} | " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "summary.json").write_text(
        json.dumps({k: (v if math.isfinite(v) else None) for k, v in summary.items()}, indent=2) + "\n", encoding="utf-8"
    )
    return summary
