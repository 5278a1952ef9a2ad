"""RPO's losses and preference labels as pure tensor functions (docs/algorithms/rpo_lambda_harmonic.md §4, §6, §7).

Kept free of models so every property the algorithm page lists (§11 items 4–6, 8) is testable on plain tensors:

* Bradley–Terry: P(r ≻ g) = σ(R(r) − R(g)); labels y ~ Bernoulli(P), re-drawn at every use (no argmax).
* per-image error e(x) = mean over C,H,W of (target − prediction)²  (target = ε, or the velocity v);
* implicit reward difference s = [e_ref(r) − e_θ(r)] − [e_ref(g) − e_θ(g)];
* L_pref = −[y log σ(βs) + (1 − y) log σ(−βs)]  (β = 1 is the released code, which never applies β);
* L_sim = e_θ(r)  (DreamBooth reconstruction without prior preservation);  L = L_sim + L_pref.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def bradley_terry_probability(reward_a: torch.Tensor, reward_b: torch.Tensor) -> torch.Tensor:
    """P(a ≻ b) = σ(R(a) − R(b)); no temperature, as in the reference implementation."""
    return torch.sigmoid(reward_a - reward_b)


def sample_preference_labels(probability: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """y ~ Bernoulli(P(r ≻ g)) per pair (1 = the reference image is preferred); stochastic on purpose (§10.3)."""
    p = probability.detach().float().cpu().clamp(0.0, 1.0)
    return torch.bernoulli(p, generator=generator).to(probability.device)


def per_image_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """e = ‖target − prediction‖² averaged over every non-batch dimension → ``[B]`` (computed in fp32)."""
    diff = (prediction.float() - target.float()) ** 2
    return diff.mean(dim=tuple(range(1, diff.ndim)))


def implicit_reward_difference(
    err_policy_ref_img: torch.Tensor,
    err_frozen_ref_img: torch.Tensor,
    err_policy_gen_img: torch.Tensor,
    err_frozen_gen_img: torch.Tensor,
) -> torch.Tensor:
    """s = [e_ref(r) − e_θ(r)] − [e_ref(g) − e_θ(g)] ("kl_diff"): > 0 when θ improves more on r than on g."""
    return (err_frozen_ref_img - err_policy_ref_img) - (err_frozen_gen_img - err_policy_gen_img)


def preference_loss(s: torch.Tensor, labels: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Per-pair logistic loss −[y log σ(βs) + (1−y) log σ(−βs)] (numerically stable form) → ``[B]``."""
    z = beta * s
    y = labels.to(z.dtype)
    return -(y * F.logsigmoid(z) + (1.0 - y) * F.logsigmoid(-z))


def rpo_loss(
    err_policy_ref_img: torch.Tensor,
    err_frozen_ref_img: torch.Tensor,
    err_policy_gen_img: torch.Tensor,
    err_frozen_gen_img: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 1.0,
    preference_weight: float = 1.0,
    similarity_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = w_sim·mean L_sim + w_pref·mean L_pref over the batch (weights 1 and 1 in the paper's code).

    The frozen errors are detached here as well, so no gradient can reach ε_ref whatever the caller did.
    Returns (loss, stats) with detached per-batch means of every term for logging.
    """
    err_frozen_ref_img, err_frozen_gen_img = err_frozen_ref_img.detach(), err_frozen_gen_img.detach()
    s = implicit_reward_difference(err_policy_ref_img, err_frozen_ref_img, err_policy_gen_img, err_frozen_gen_img)
    l_pref = preference_loss(s, labels, beta).mean()
    l_sim = err_policy_ref_img.mean()
    loss = similarity_weight * l_sim + preference_weight * l_pref
    stats = {
        "loss": loss.detach(),
        "loss_sim": l_sim.detach(),
        "loss_pref": l_pref.detach(),
        "implicit_reward_diff": s.detach().mean(),
        "label_mean": labels.detach().float().mean(),
        "err_policy_gen": err_policy_gen_img.detach().mean(),
    }
    return loss, stats


def select_best(history: Sequence[tuple[int, float]]) -> tuple[int, float] | None:
    """Keep-best model selection (§7): the (step, value) with the largest finite validation value; ties → earliest."""
    best: tuple[int, float] | None = None
    for step, value in history:
        if value is None or value != value or value in (float("inf"), float("-inf")):
            continue
        if best is None or value > best[1]:
            best = (int(step), float(value))
    return best
