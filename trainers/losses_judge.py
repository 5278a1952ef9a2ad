"""Losses for training generative yes/no judges (RewardDance §4), as pure tensor functions.

The judge's reward is read from the answer-token logits at the first answer position, so every loss
here is written in terms of ℓ_yes, ℓ_no (and optionally the log-partition of the full vocabulary, to get
the literal next-token cross-entropy rather than the two-way renormalised one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def yes_no_ce(
    logit_yes: torch.Tensor, logit_no: torch.Tensor, label: torch.Tensor, logsumexp: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of the answer token; ``label`` 1 = "yes", 0 = "no".

    Without ``logsumexp`` it is the two-way CE of σ(ℓ_yes − ℓ_no) (the ``yes_no`` normalisation); with
    ``logsumexp`` = logsumexp of the full-vocabulary logits it is the usual token CE −log softmax(ℓ)[target],
    which also pushes probability mass off all other tokens (the ``full`` normalisation).
    """
    label = label.to(logit_yes.dtype)
    if logsumexp is None:
        return F.binary_cross_entropy_with_logits(logit_yes - logit_no, label)
    target = label * logit_yes + (1.0 - label) * logit_no
    return (logsumexp - target).mean()


def pairwise_judge_loss(
    logits_yes: torch.Tensor, logits_no: torch.Tensor, label: torch.Tensor, logsumexp: torch.Tensor | None = None
) -> torch.Tensor:
    """CE on "is image 2 better than image 1?"; the caller passes both orders of each pair (flipped labels)
    so the judge cannot fit the data by preferring a position (docs/algorithms/rewarddance.md §7.2)."""
    return yes_no_ce(logits_yes, logits_no, label, logsumexp)


def pointwise_bt_loss(
    s_chosen: torch.Tensor, s_rejected: torch.Tensor, ce_weight: float = 0.1, margin: float = 0.0
) -> torch.Tensor:
    """Bradley–Terry −log σ(s_w − s_l − margin) plus ``ce_weight``·(−log σ(s_w) − log σ(−s_l)), s = ℓ_yes − ℓ_no.

    The small CE term anchors the scale so the preferred image is also answered "yes" on its own
    (rewarddance.md §4); with ``ce_weight=0`` and equal scores the loss is log 2.
    """
    bt = F.softplus(-(s_chosen - s_rejected - margin)).mean()
    if ce_weight == 0:
        return bt
    ce = (F.softplus(-s_chosen) + F.softplus(s_rejected)).mean()
    return bt + ce_weight * ce


def answer_tokens_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean token cross-entropy of a teacher-forced answer: ``logits [Q,L,V]`` predict
    ``targets [Q,L]`` where ``mask [Q,L]`` is 1; rows with an empty mask give 0.

    Used for free-form answers ("what colour is the shape?" → "teal") and for rationale tokens after the
    yes/no answer: both supervise what the judge sees rather than only its final verdict.
    """
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    mask = mask.to(logp.dtype)
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
