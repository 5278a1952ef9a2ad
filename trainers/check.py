"""``genreward check CONFIG``: the on-policy self-check (docs/algorithms/flow_grpo.md §8) as a 30-second diagnosis.

It builds the config's training run exactly as ``genreward train`` would (model family, precision, LoRA, batch
layout) in a temporary folder, samples one batch, recomputes every stored step's log-prob the way training does (the
no-grad pass, and the gradient-carrying loss forward of one chunk) and reports the largest |Δ log p|, the importance
ratio range at the first inner step and the fraction of ratios outside the trainer's clip range. Off-policy at the
start — "the ratio is not 1" — is the most common silent failure of these trainers: the sampler and the trainer
disagree about the model (dropout, precision, a different guidance, a different batch composition).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from typing import Any

import torch

from genreward.errors import GenrewardError

# |Δ log p| allowed (per step, the config's log-prob reduction): fp32 differs only by the float rounding of other
# batch shapes; fp16/bf16 by the rounding of the low-precision forward.
TOLERANCE = {"no": 1e-4, "fp16": 5e-2, "bf16": 2e-1}
CLIP_KEYS = {"ddpo": ("ddpo", "clip_range"), "grpo": ("grpo", "clip_range"), "prdp": ("prdp", "clip_eps"),
             "nft": None}


@dataclass
class CheckResult:
    family: str
    precision: str
    samples: int
    steps: int
    max_abs_delta: float
    max_abs_delta_grad: float
    ratio_min: float
    ratio_max: float
    clip_range: float | None
    clip_fraction: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return max(self.max_abs_delta, self.max_abs_delta_grad) <= self.tolerance

    def lines(self) -> list[str]:
        clip = (f"{self.clip_fraction:.1%} of ratios outside 1 ± {self.clip_range:g}" if self.clip_range is not None
                else "no ratio clip in this trainer")
        return [
            f"family {self.family}, precision {self.precision}: {self.samples} samples × {self.steps} stochastic steps",
            f"max |log p recorded − log p recomputed|: {self.max_abs_delta:.3g} (no-grad pass), "
            f"{self.max_abs_delta_grad:.3g} (loss forward)",
            f"first inner step ratio: [{self.ratio_min:.6f}, {self.ratio_max:.6f}]; {clip}",
            ("OK: on-policy within " if self.ok else "FAIL: off-policy beyond ") + f"the {self.precision} tolerance {self.tolerance:g}",
        ]


def check(config: Any, samples: int | None = None) -> CheckResult:
    """Run the self-check for a policy-trainer ``config`` (prdp, ddpo, grpo, nft); nothing is written to its run folder."""
    from genreward.prompts import load_prompts
    from trainers.common import TrainingRun, derived_seed
    from trainers.passes import chunks, stochastic_step_indices

    if not hasattr(config, "sample") or not hasattr(config, "train"):
        raise GenrewardError(f"genreward check needs a policy trainer's config (prdp, ddpo, grpo), got trainer {config.trainer!r}")
    prompts = load_prompts(config.prompts)
    n = samples or config.sample.batch_size
    with tempfile.TemporaryDirectory(prefix="genreward-check-") as tmp:
        probe = replace(config, output_dir=tmp, checkpoint=replace(config.checkpoint, resume_from=None))
        if hasattr(probe, "eval"):
            probe = replace(probe, eval=replace(probe.eval, enabled=False))
        probe = replace(probe, logging=replace(probe.logging, trackers=[]))
        run = TrainingRun(probe, need_reference=False, unit="epoch")
        try:
            texts = [prompts[i % len(prompts)].prompt for i in range(n)]
            seeds = [derived_seed(config.train.seed, 0, 1, i) for i in range(n)]
            traj = run.sample(texts, seeds)
            if traj.log_probs is None:
                raise GenrewardError("the config samples deterministically (sample.eta = 0 or sample.noise_level = 0): "
                                     "there is no log-probability to check")
            steps = stochastic_step_indices(traj)
            recomputed = run.log_probs(traj)
            delta = (recomputed - traj.log_probs)[:, steps]
            # the loss forward: gradient-carrying, in the mode the trainer trains in, chunk by chunk as training does
            from genreward.sampling import step_log_prob

            grad_delta = torch.zeros_like(delta)
            for k, step in enumerate(steps):
                for idx in chunks(len(traj), config.train.chunk_size):
                    with run.accelerator.autocast():
                        lp = step_log_prob(run.unet, run.family, traj, step, idx, config.sample.logprob_reduction)
                    grad_delta[idx, k] = (lp.detach().float() - traj.log_probs[idx, step]).to(grad_delta.device)
        finally:
            run.run_dir.release_signals()
            run.accelerator.end_training()
    ratio = torch.exp(grad_delta.double())
    key = CLIP_KEYS.get(config.trainer)
    clip = float(getattr(getattr(config, key[0]), key[1])) if key else None
    clip_fraction = float(((ratio - 1).abs() > clip).double().mean()) if clip else 0.0
    precision = config.train.mixed_precision
    return CheckResult(family=run.family.name, precision="fp32" if precision == "no" else precision, samples=len(traj),
                       steps=len(steps), max_abs_delta=float(delta.abs().max()), max_abs_delta_grad=float(grad_delta.abs().max()),
                       ratio_min=float(ratio.min()), ratio_max=float(ratio.max()), clip_range=clip, clip_fraction=clip_fraction,
                       tolerance=TOLERANCE[precision])

