"""Generative VLM-judge reward (RewardDance / VLM3D): the judge's probability of answering "Yes".

A frozen VLM (Qwen2-VL, Qwen2.5-VL, LLaVA) is asked a yes/no question about the image(s); the reward is
read from the next-token logits at the *first answer position* — the last token of the chat-templated
prompt, after the assistant generation prefix — so no decoding is needed and the score is
differentiable w.r.t. the pixels (the image preprocessing is done in torch, see
:mod:`genreward.models.vlm`).

Modes:

* ``pointwise`` — one image per prompt: "does the image meet high-quality standards under the criteria?"
* ``pairwise`` — RewardDance's main form: image 1 = ``reference_images`` from the call context
  (``[B,3,H,W]`` in [0,1], detached), image 2 = the generated image; "is image 2 better than image 1?".
  ``position_debias=True`` also asks with the order swapped and returns ½·(P(2≻1) + 1 − P(1≻2)) (for
  ``log_odds``: ½·(L(2≻1) − L(1≻2)), the same thing on the logit scale), so swapping the two images
  gives exactly complementary rewards.
* multi-view — pass images as ``[B,V,3,H,W]``: the V views of one object go into one query as V separate
  images (VLM3D), one score per object (``scores`` is ``[B]``). Pointwise only.

Normalisation of P(yes) (the paper does not fix it): ``full`` = softmax over the vocabulary at that
position (default, the literal reading), ``yes_no`` = σ(ℓ_yes − ℓ_no), ``log_odds`` = ℓ_yes − ℓ_no
(VLM3D's reward). ``details``: ``p_yes`` (full softmax), ``p_yes_no``, ``log_odds`` of the (first)
query, plus ``*_swapped`` with ``position_debias``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

from genreward.errors import GenrewardError
from genreward.models.device import resolve_dtype
from genreward.models.vlm import (
    encode_query,
    llava_pixels,
    load_vlm,
    next_token_logits,
    qwen_image_tokens,
    qwen_patchify,
    qwen_resize_normalise,
    single_token_id,
    tokenizer_of,
)
from genreward.rewards.base import RewardOutput, check_image_range, nan_for_nonfinite_images, register

MODES = ("pointwise", "pairwise")
NORMALIZATIONS = ("full", "yes_no", "log_odds")

DEFAULT_CRITERIA = "every object, count, attribute and spatial relation in the prompt is depicted correctly"
MULTIVIEW_CRITERIA = "no duplicated faces (Janus), broken or intersecting surfaces, or implausible faceting"
POINTWISE_TEMPLATE = (
    'The image was generated for the prompt: "{prompt}".\n'
    "Evaluation criteria: {criteria}.\n"
    'Does the image meet high-quality standards under these criteria? Answer "Yes" or "No" first, then explain why.'
)
PAIRWISE_TEMPLATE = (
    'Two images were generated for the prompt: "{prompt}".\n'
    "Evaluation criteria: {criteria}.\n"
    'Is image 2 better than image 1? Answer "Yes" or "No" first, then explain why.'
)
MULTIVIEW_TEMPLATE = (
    "These images are several views of one 3D object. Considering all views together, does the object "
    '(1) match the description "{prompt}", and (2) look geometrically sound and consistent across views '
    '({criteria})? Answer only "Yes" or "No".'
)


def _check_template(template: str, what: str) -> str:
    if not isinstance(template, str) or "{prompt}" not in template:
        raise GenrewardError(f"vlm_judge {what} must be a string containing {{prompt}}, got {template!r}")
    try:
        template.format(prompt="p", criteria="c")
    except (KeyError, IndexError, ValueError) as exc:
        raise GenrewardError(
            f"vlm_judge {what} may only use the fields {{prompt}} and {{criteria}} (write literal braces as {{{{ }}}}): {exc!r}"
        ) from None
    return template


@register("vlm_judge")
class VLMJudge:
    """P("Yes") of a frozen VLM judge, differentiable w.r.t. the generated pixels."""

    differentiable = True

    def __init__(
        self,
        model: str = "tiny:qwen2-vl",
        mode: str = "pointwise",
        criteria: str | None = None,
        template: str | None = None,
        normalization: str = "full",
        yes_token: str = "Yes",
        no_token: str = "No",
        position_debias: bool = False,
        device: str | torch.device | None = None,
        dtype: str = "fp32",
        batch_size: int = 8,
    ):
        if mode not in MODES:
            raise GenrewardError(f"vlm_judge mode must be one of {', '.join(MODES)}, got {mode!r}")
        if normalization not in NORMALIZATIONS:
            raise GenrewardError(f"vlm_judge normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise GenrewardError(f"vlm_judge batch_size must be a positive integer, got {batch_size!r}")
        if criteria is not None and not isinstance(criteria, str):
            raise GenrewardError(f"vlm_judge criteria must be a string, got {type(criteria).__name__}")
        if position_debias and mode != "pairwise":
            raise GenrewardError("vlm_judge position_debias only applies to mode=pairwise")
        self.name = "vlm_judge"
        self.mode = mode
        self.normalization = normalization
        self.position_debias = bool(position_debias)
        self.batch_size = batch_size
        self.criteria = criteria
        self.template = _check_template(template, "template") if template is not None else None
        self.dtype = resolve_dtype(dtype)
        self.model, self.processor, self.info = load_vlm(model, device=device, dtype=self.dtype)
        if self.template is None and self.info.default_template is not None:
            self.template = _check_template(self.info.default_template, f"template recorded with {model}")
        self.yes_id = single_token_id(self.processor, yes_token, "vlm_judge yes_token")
        self.no_id = single_token_id(self.processor, no_token, "vlm_judge no_token")
        if self.yes_id == self.no_id:
            raise GenrewardError(f"vlm_judge yes_token {yes_token!r} and no_token {no_token!r} are the same token")
        tok = tokenizer_of(self.processor)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ text

    def question(self, prompt: str, multiview: bool = False) -> str:
        """The question text for one prompt (before the chat template)."""
        if self.template is not None:
            template = self.template
        elif multiview:
            template = MULTIVIEW_TEMPLATE
        else:
            template = PAIRWISE_TEMPLATE if self.mode == "pairwise" else POINTWISE_TEMPLATE
        criteria = self.criteria if self.criteria is not None else (MULTIVIEW_CRITERIA if multiview else DEFAULT_CRITERIA)
        return template.format(prompt=prompt, criteria=criteria)

    # ------------------------------------------------------------------ images

    def _image_units(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
        """Per image: (model pixel input, grid row or None, number of image tokens), keeping the graph."""
        if self.info.is_qwen:
            flat, grid = qwen_patchify(qwen_resize_normalise(images.to(self.device), self.info), self.info)
            counts = qwen_image_tokens(grid, self.info)
            patches = flat.split([int(g[1] * g[2]) for g in grid.tolist()])
            return [(p, g, c) for p, g, c in zip(patches, grid, counts)]
        pixels = llava_pixels(images.to(self.device), self.info)
        return [(p[None], None, self.info.image_tokens_per_image) for p in pixels]

    def answer_logits(self, queries: Sequence[tuple[list[tuple[torch.Tensor, Any, int]], str]],
                      positions: Sequence[int] = (-1,),
                      continuations: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Float32 logits ``[Q, len(positions), V]`` for queries ``(image units, question)``; offset −1 is
        the first answer position.

        With ``continuations`` (answer token ids per query, teacher-forced after the assistant prefix) the
        result is ``[Q, L, V]``, L = the longest continuation: row j predicts continuation token j (rows
        past a query's own length repeat its last position; the caller masks them).
        """
        width = max((len(c) for c in continuations), default=1) if continuations is not None else 0
        outs = []
        for start in range(0, len(queries), self.batch_size):
            chunk = queries[start : start + self.batch_size]
            seqs, pixels, grids = [], [], []
            for units, question in chunk:
                seqs.append(encode_query(self.processor, self.info, len(units), question, [u[2] for u in units]))
                pixels.extend(u[0] for u in units)
                grids.extend(u[1] for u in units)
            where: Sequence[int] | torch.Tensor = positions
            if continuations is not None:
                conts = [list(c) for c in continuations[start : start + self.batch_size]]
                where = torch.tensor([[len(s) - 1 + min(j, max(len(c) - 1, 0)) for j in range(max(width, 1))]
                                      for s, c in zip(seqs, conts)])
                seqs = [s + c for s, c in zip(seqs, conts)]
            grid = torch.stack(grids) if self.info.is_qwen else None
            px = torch.cat(pixels).to(next(self.model.parameters()).dtype)
            outs.append(next_token_logits(self.model, self.info, seqs, px, grid, self.pad_id, where))
        return torch.cat(outs)

    # ------------------------------------------------------------------ scoring

    def _check_inputs(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Images as ``[B,V,3,H,W]`` float; a one-line error for anything else."""
        if not isinstance(images, torch.Tensor):
            raise GenrewardError(f"vlm_judge images must be a torch.Tensor [B,3,H,W] or [B,V,3,H,W], got {type(images).__name__}")
        if images.ndim not in (4, 5) or images.shape[-3] != 3:
            raise GenrewardError(
                f"vlm_judge images must have shape [B,3,H,W] (or [B,V,3,H,W] for V views per prompt), got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise GenrewardError(f"vlm_judge images must be a float tensor in [0,1], got dtype {images.dtype}")
        if images.ndim == 5 and images.shape[1] < 1:
            raise GenrewardError("vlm_judge multi-view images need at least one view")
        if images.ndim == 5 and self.mode == "pairwise":
            raise GenrewardError("vlm_judge multi-view images [B,V,3,H,W] are supported in pointwise mode only")
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise GenrewardError(f"vlm_judge needs one prompt per image (or per view group): {images.shape[0]} queries, {got}")
        if any(not isinstance(p, str) for p in prompts):
            raise GenrewardError("vlm_judge prompts must be strings")
        check_image_range("vlm_judge", images)
        return images if images.ndim == 5 else images[:, None]

    def _reference(self, context: dict[str, Any], batch: int) -> torch.Tensor:
        ref = context.get("reference_images")
        if ref is None:
            raise GenrewardError("vlm_judge mode=pairwise needs reference_images=[B,3,H,W] in [0,1] in the call context")
        if not isinstance(ref, torch.Tensor) or ref.ndim != 4 or ref.shape[1] != 3 or not ref.is_floating_point():
            shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise GenrewardError(f"vlm_judge reference_images must be a float tensor [B,3,H,W] in [0,1], got {shape}")
        if ref.shape[0] != batch:
            raise GenrewardError(f"vlm_judge needs one reference image per generated image: {batch} images, {ref.shape[0]} references")
        return ref.detach()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _normalise(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[Q, V]`` logits → the three normalisations of P(yes) at that position."""
        yes, no = logits[:, self.yes_id], logits[:, self.no_id]
        log_odds = yes - no
        return {
            "full": torch.log_softmax(logits, dim=-1)[:, self.yes_id].exp(),
            "yes_no": torch.sigmoid(log_odds),
            "log_odds": log_odds,
        }

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        views = self._check_inputs(images, prompts)
        batch, multiview = views.shape[0], images.ndim == 5
        ref = self._reference(context, batch) if self.mode == "pairwise" else None
        if batch == 0:
            empty = torch.zeros(0, device=images.device)
            return RewardOutput(scores=empty, details={"p_yes": empty, "p_yes_no": empty, "log_odds": empty})
        questions = [self.question(p, multiview) for p in prompts]
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad), self._autocast():
            flat = views.reshape(-1, *views.shape[2:])
            units = self._image_units(flat)
            per_query = [units[i * views.shape[1] : (i + 1) * views.shape[1]] for i in range(batch)]
            if ref is None:
                queries = [(u, q) for u, q in zip(per_query, questions)]
            else:
                ref_units = self._image_units(ref)
                queries = [([r, u[0]], q) for r, u, q in zip(ref_units, per_query, questions)]
                if self.position_debias:
                    queries += [([u[0], r], q) for r, u, q in zip(ref_units, per_query, questions)]
            logits = self.answer_logits(queries)[:, 0]
        forward = self._normalise(logits[:batch])
        scores = forward[self.normalization]
        details = {"p_yes": forward["full"], "p_yes_no": forward["yes_no"], "log_odds": forward["log_odds"]}
        if self.position_debias:
            swapped = self._normalise(logits[batch:])
            if self.normalization == "log_odds":
                scores = 0.5 * (scores - swapped["log_odds"])
            else:
                scores = 0.5 * (scores + 1.0 - swapped[self.normalization])
            details.update(p_yes_swapped=swapped["full"], log_odds_swapped=swapped["log_odds"])
        details = {k: v.detach().to(images.device, torch.float32) for k, v in details.items()}
        scores = nan_for_nonfinite_images(scores.to(device=images.device, dtype=torch.float32), images)
        return RewardOutput(scores=scores, details=details)
