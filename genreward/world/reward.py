"""``verifier``: the shapes world's exact programmatic reward (see :mod:`genreward.world.verifier`).

Registered with the rewards' ``@register`` on import; :mod:`genreward.world.plugin` imports this module, and
``genreward.rewards.build("verifier")`` imports that plugin by name on a miss (:func:`genreward.registry.load_plugins`).

The caption spec comes from the prompt set's metadata (``metadata[i]["spec"]``, or the metadata itself
when it is a spec) and otherwise from parsing the prompt; a prompt outside the world's grammar is a
one-line error. Scores are pass/fail (1/0) or, with ``graded: true``, the mean of the applicable checks.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import torch

from genreward.errors import GenrewardError
from genreward.rewards.base import RewardOutput, check_batch, register
from genreward.world import shapes as W
from genreward.world import verifier as V


def spec_for(prompt: str, metadata: Any) -> dict[str, Any]:
    """The spec of one prompt: from its metadata when it carries one, else parsed from the text."""
    if isinstance(metadata, dict):
        if isinstance(metadata.get("spec"), dict):
            return W.validate_spec(metadata["spec"])
        if "type" in metadata and "objects" in metadata:
            return W.validate_spec(metadata)
    return V.parse_caption(prompt)


@register("verifier")
class VerifierReward:
    """Pass/fail (or graded) agreement of each image with its caption, read from the pixels."""

    differentiable = False

    def __init__(self, graded: bool = False, work_size: int = V.WORK_SIZE):
        if not isinstance(graded, bool):
            raise GenrewardError(f"verifier option graded must be true or false, got {graded!r}")
        if isinstance(work_size, bool) or not isinstance(work_size, int) or work_size < V.MIN_SIZE:
            raise GenrewardError(f"verifier option work_size must be an integer ≥ {V.MIN_SIZE}, got {work_size!r}")
        self.graded = graded
        self.work_size = work_size
        self.name = "verifier"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        check_batch(self.name, images, prompts)
        metadata = context.get("metadata") or [None] * len(prompts)
        if len(metadata) != len(prompts):
            raise GenrewardError(f"verifier got {len(metadata)} metadata entries for {len(prompts)} prompts")
        rows = [V.score(img, spec_for(p, m), self.work_size) for img, p, m in zip(images, prompts, metadata)]
        nan = math.nan
        details = {c: torch.tensor([nan if r[c] is None else float(r[c]) for r in rows]) for c in V.CHECKS}
        details["pass"] = torch.tensor([float(r["pass"]) for r in rows])
        details["graded"] = torch.tensor([float(r["graded"]) for r in rows])
        details["n_objects"] = torch.tensor([float(len(r["detections"])) for r in rows])
        scores = details["graded" if self.graded else "pass"].clone()
        return RewardOutput(scores=scores.to(images.device), details={k: v.to(images.device) for k, v in details.items()},
                            verdicts=[verdict(r) for r in rows])


def verdict(result: dict[str, Any]) -> str:
    """One line for a human: pass, or the failed checks and what the verifier saw (e.g. "fail: count · saw 2 red circles")."""
    seen = Counter((d["color"] or "unknown-colour", d["shape"] or "blob") for d in result["detections"])
    saw = ", ".join(f"{n} {color} {shape}{'s' if n > 1 else ''}" for (color, shape), n in sorted(seen.items())) or "nothing"
    if result["pass"]:
        return f"pass · saw {saw}"
    failed = [c for c in V.CHECKS if result[c] is False]
    return f"fail: {', '.join(failed)} · saw {saw}"
