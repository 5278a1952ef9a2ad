"""Helpers on judge training rows (``{"prompt", "image", "label"}`` JSONL rows), shared by the dataset
converters here and the judge trainer (``trainers.reward_model``)."""

from __future__ import annotations

from collections import Counter, defaultdict


def majority_baseline(train_rows: list[dict], eval_rows: list[dict]) -> float:
    """Accuracy on ``eval_rows`` of answering each question text with its most frequent training answer
    (overall majority for unseen questions): what a judge that ignores the image can reach."""
    per_q: dict[str, Counter] = defaultdict(Counter)
    for r in train_rows:
        per_q[r["prompt"]][r["label"]] += 1
    overall = Counter(r["label"] for r in train_rows).most_common(1)[0][0]
    hits = [(per_q[r["prompt"]].most_common(1)[0][0] if r["prompt"] in per_q else overall) == r["label"] for r in eval_rows]
    return sum(hits) / len(hits)
