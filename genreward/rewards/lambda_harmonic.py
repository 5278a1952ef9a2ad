"""λ-Harmonic reward of RPO (Miao et al., NeurIPS 2024; docs/algorithms/rpo_lambda_harmonic.md §3).

Subject-driven generation must keep the subject's identity *and* follow the prompt. The reward scores both
with one image–text embedding model and combines them so that neither can be traded away:

* S_I = (mean_m cos(E_I(x), E_I(r_m)) + 1) / 2   — image–image similarity to the reference photos r_m;
* S_T = (cos(E_T(p), E_I(x)) + 1) / 2            — image–text similarity to the prompt;
* R_λ = 1 / (λ / S_I + (1 − λ) / S_T)           — the λ-weighted harmonic mean (R_1 = S_I, R_0 = S_T).

Backbones: ALIGN (transformers ``AlignModel``, the paper's ``kakaobrain/align-base``; ``tiny:align`` is a
random-weight, architecture-faithful ALIGN built offline) or any CLIP that :func:`genreward.models.clip.load_clip`
loads (``tiny:clip``, ``open_clip:...``, hub ids). Both give differentiable scores (gradients reach the pixels).

The reference photos come from the ``references`` option (a folder of images or a tensor) or per call through
the reward context under the shared key ``reference_images=``: a tensor ``[R,3,H,W]`` in [0,1] shared by the
batch, or a list with one such tensor per image. (``references=`` in the call context is refused with a
one-line error; the option keeps that name because it is usually a folder path in a config.)
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from genreward.errors import GenrewardError
from genreward.images import check_images, load_reference_images
from genreward.models.device import resolve_device, resolve_dtype
from genreward.models.hub import from_pretrained_offline_aware
from genreward.rewards.base import RewardOutput, check_batch, register

HARMONIC_EPS = 1e-8  # added to each denominator, as the reference implementation does
TINY_SEED = 1234
ALIGN_HUB_DEFAULT = "kakaobrain/align-base"


# ------------------------------------------------------------------------------------------ pure maths


def map_similarity(cosine: torch.Tensor) -> torch.Tensor:
    """Cosine similarity in [-1, 1] → [0, 1] by (cos + 1)/2, so both terms of the harmonic mean are positive."""
    return (cosine + 1.0) / 2.0


def lambda_harmonic(s_image: torch.Tensor, s_text: torch.Tensor, lam: float) -> torch.Tensor:
    """R_λ = 1 / (λ/S_I + (1−λ)/S_T) (ε in each denominator); λ = 1 returns S_I and λ = 0 returns S_T exactly."""
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise GenrewardError(f"lambda_harmonic: lam must lie in [0, 1], got {lam}")
    if lam == 1.0:
        return s_image
    if lam == 0.0:
        return s_text
    return 1.0 / (lam / (s_image + HARMONIC_EPS) + (1.0 - lam) / (s_text + HARMONIC_EPS))


def image_image_similarity(image_emb: torch.Tensor, reference_emb: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean cosine of each normalised image embedding ``[B,D]`` to its references (``[R,D]`` shared, or one ``[R_b,D]`` each)."""
    if isinstance(reference_emb, torch.Tensor):
        return (image_emb @ reference_emb.to(image_emb).T).mean(dim=1)
    return torch.stack([(image_emb[b : b + 1] @ r.to(image_emb).T).mean() for b, r in enumerate(reference_emb)])


def strip_tokens(prompt: str, tokens: Sequence[str]) -> str:
    """Remove whole-word occurrences of ``tokens`` (e.g. the identifier "sks") and collapse spaces."""
    for tok in tokens:
        if tok:
            prompt = re.sub(rf"(?<!\w){re.escape(tok)}(?!\w)", " ", prompt)
    return " ".join(prompt.split())


# ----------------------------------------------------------------------------------------------- ALIGN


class AlignEmbedder(torch.nn.Module):
    """A frozen ALIGN model with the image processor re-done in torch, so gradients reach the pixels.

    Preprocessing follows the checkpoint's ``EfficientNetImageProcessor`` settings (align-base: resize to
    346×346, centre crop 289, x·2 − 1, no mean/std normalisation). The image embedding is the vision pooler
    output and the text embedding the projected [CLS] state, as ``AlignModel`` computes them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        resize: tuple[int, int],
        crop: tuple[int, int] | None,
        rescale_offset: bool,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        max_length: int = 64,
        spec: str = "",
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.resize, self.crop = tuple(resize), (tuple(crop) if crop else None)
        self.rescale_offset = bool(rescale_offset)
        self.mean, self.std = (tuple(mean) if mean else None), (tuple(std) if std else None)
        self.max_length = int(max_length)
        self.spec = spec

    def train(self, mode: bool = True) -> "AlignEmbedder":
        """Always eval: dropout/batch-norm updates would make a reward noisy."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] → model pixels, differentiable (bilinear resize, centre crop, rescale)."""
        check_images(images)
        x = images.float()
        if tuple(x.shape[-2:]) != self.resize:
            x = F.interpolate(x, size=self.resize, mode="bilinear", antialias=True, align_corners=False)
        if self.crop is not None:
            (h, w), (ch, cw) = x.shape[-2:], self.crop
            top, left = max((h - ch) // 2, 0), max((w - cw) // 2, 0)
            x = x[..., top : top + ch, left : left + cw]
        x = x * 2.0 - 1.0 if self.rescale_offset else x
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] → L2-normalised ALIGN image embeddings ``[B,D]`` float32."""
        pixels = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        out = self.model.get_image_features(pixel_values=pixels)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out.float(), dim=-1)

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts → L2-normalised ALIGN text embeddings ``[B,D]`` float32."""
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.model.get_text_features(**batch)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out.float(), dim=-1)


def tiny_align_tokenizer():
    """A lower-casing WordPiece (BERT) tokenizer with a character-level vocabulary, built in memory (offline)."""
    from transformers import BertTokenizer

    words = ["a", "an", "the", "of", "photo", "in", "on", "with", "cat", "dog", "painting", "style"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab += [w for w in words if w not in vocab]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def build_tiny_align() -> AlignEmbedder:
    """Random-weight ALIGN (EfficientNet image tower + BERT text tower, 32 px) from a fixed seed, global RNG untouched."""
    from transformers import AlignConfig, AlignModel

    tokenizer = tiny_align_tokenizer()
    image_dim = 80  # EfficientNet top width for width_coefficient 0.25 (= round_filters(320)); checked below
    config = AlignConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64,
        ),
        vision_config=dict(
            image_size=32, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=64,
            num_block_repeats=[1, 1, 1, 1, 1, 1, 1],
        ),
        projection_dim=image_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AlignModel(config)
        # transformers initialises convolutions with std 0.02, under which a random EfficientNet's activations
        # vanish (every embedding ≈ 0); He initialisation, as EfficientNet itself uses, keeps them O(1).
        for module in model.vision_model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    embedder = AlignEmbedder(
        model, tokenizer, resize=(40, 40), crop=(32, 32), rescale_offset=True, mean=None, std=None, spec="tiny:align"
    )
    with torch.no_grad():
        dim = embedder.embed_images(torch.zeros(1, 3, 32, 32)).shape[-1]
    if dim != image_dim:
        raise RuntimeError(f"tiny ALIGN image embedding has {dim} dims, expected {image_dim}")
    return embedder


def load_align(spec: str = ALIGN_HUB_DEFAULT, device: str | torch.device | None = None, dtype: str = "fp32") -> AlignEmbedder:
    """``tiny:align``, a hub id (default ``kakaobrain/align-base``) or a local folder → :class:`AlignEmbedder`."""
    if spec in ("tiny:align", "tiny"):
        embedder = build_tiny_align()
    elif spec.startswith("tiny:"):
        raise GenrewardError(f"unknown tiny ALIGN spec {spec!r}; use tiny:align")
    else:
        from transformers import AlignModel, AutoImageProcessor, AutoTokenizer

        model = from_pretrained_offline_aware(AlignModel.from_pretrained, spec, spec, "ALIGN model")
        tokenizer = from_pretrained_offline_aware(AutoTokenizer.from_pretrained, spec, spec, "ALIGN tokenizer")
        proc = from_pretrained_offline_aware(AutoImageProcessor.from_pretrained, spec, spec, "ALIGN image processor")
        size, crop = _hw(getattr(proc, "size", None)), _hw(getattr(proc, "crop_size", None))
        embedder = AlignEmbedder(
            model,
            tokenizer,
            resize=size or (346, 346),
            crop=crop if getattr(proc, "do_center_crop", True) else None,
            rescale_offset=bool(getattr(proc, "rescale_offset", True)),
            mean=proc.image_mean if getattr(proc, "do_normalize", False) else None,
            std=proc.image_std if getattr(proc, "do_normalize", False) else None,
            max_length=min(int(getattr(tokenizer, "model_max_length", 64) or 64), 512),
            spec=spec,
        )
    return embedder.to(device=resolve_device(device), dtype=resolve_dtype(dtype))


def _hw(size: Any) -> tuple[int, int] | None:
    """An image processor's size (dict or int or object with height/width) as (H, W)."""
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
    if get("height") is not None:
        return (int(get("height")), int(get("width")))
    if get("shortest_edge") is not None:
        return (int(get("shortest_edge")), int(get("shortest_edge")))
    return None


# ---------------------------------------------------------------------------------------------- reward


@register("lambda_harmonic")
class LambdaHarmonic:
    """λ-weighted harmonic mean of subject similarity and prompt alignment (RPO's reward, §3).

    Details per image: ``image_similarity`` (S_I), ``text_similarity`` (S_T) and the raw cosines
    ``image_cosine`` / ``text_cosine``. ``remove_tokens`` strips words such as the identifier "sks" from the
    prompts before text embedding (RPO's validation does this; its label reward keeps them).
    """

    differentiable = True

    def __init__(
        self,
        lam: float = 0.5,
        backend: str = "align",
        model: str | None = None,
        references: str | torch.Tensor | None = None,
        remove_tokens: Sequence[str] = (),
        device: str | torch.device | None = None,
        dtype: str = "fp32",
        embedder: Any = None,
    ):
        try:
            lam = float(lam)
        except (TypeError, ValueError):
            raise GenrewardError(f"lambda_harmonic option lam must be a number in [0, 1], got {lam!r}") from None
        if not 0.0 <= lam <= 1.0:
            raise GenrewardError(f"lambda_harmonic option lam must lie in [0, 1], got {lam}")
        self.lam = lam
        self.name = "lambda_harmonic"
        self.remove_tokens = [str(t) for t in remove_tokens]
        if embedder is not None:  # share one loaded backbone between several views (λ values)
            self.embedder = embedder
        elif backend == "align":
            self.embedder = load_align(model or ALIGN_HUB_DEFAULT, device=device, dtype=dtype)
        elif backend == "clip":
            from genreward.models.clip import load_clip

            self.embedder = load_clip(model or "openai/clip-vit-base-patch16", device=device, dtype=dtype)
        else:
            raise GenrewardError(f"lambda_harmonic option backend must be 'align' or 'clip', got {backend!r}")
        self.backend = backend
        self.references: torch.Tensor | None = None
        self._ref_cache: tuple[torch.Tensor, int, torch.Tensor] | None = None
        if references is not None:
            self.set_references(references)

    def view(self, lam: float, remove_tokens: Sequence[str] | None = None, name: str | None = None) -> "LambdaHarmonic":
        """Another λ (and prompt clean-up) on the same loaded backbone and references — no second model in memory."""
        other = LambdaHarmonic(lam=lam, embedder=self.embedder, remove_tokens=self.remove_tokens if remove_tokens is None else remove_tokens)
        other.backend, other.references = self.backend, self.references
        other.name = name or self.name
        return other

    def set_references(self, references: str | Path | torch.Tensor) -> None:
        """Bind the subject's reference images (a folder of images or a ``[R,3,H,W]`` tensor in [0,1])."""
        if isinstance(references, (str, Path)):
            references = load_reference_images(references)
        self.references = check_images(references, "lambda_harmonic references")

    @torch.no_grad()
    def _reference_embeddings(self, refs: torch.Tensor) -> torch.Tensor:
        # Cached per tensor object (held, so its id cannot be reused) and its in-place version counter.
        cache = self._ref_cache
        if cache is None or cache[0] is not refs or cache[1] != refs._version:
            cache = self._ref_cache = (refs, refs._version, self.embedder.embed_images(refs.to(self.embedder.device)))
        return cache[2]

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        check_batch(self.name, images, prompts)
        if "references" in context:
            raise GenrewardError("lambda_harmonic: the call context key is reference_images=, not references= (references is the option)")
        refs = context.get("reference_images")
        refs = self.references if refs is None else refs
        if refs is None:
            raise GenrewardError("lambda_harmonic needs the subject's reference images: the references option or reference_images= in the call context")
        if isinstance(refs, torch.Tensor):
            ref_emb: torch.Tensor | list[torch.Tensor] = self._reference_embeddings(check_images(refs, "reference_images"))
        else:
            refs = list(refs)
            if len(refs) != images.shape[0]:
                raise GenrewardError(f"lambda_harmonic: {len(refs)} per-image reference sets for {images.shape[0]} images")
            with torch.no_grad():
                ref_emb = [self.embedder.embed_images(check_images(r, "reference_images").to(self.embedder.device)) for r in refs]
        texts = [strip_tokens(p, self.remove_tokens) for p in prompts]
        with torch.no_grad():
            text_emb = self.embedder.embed_texts(texts)
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            image_emb = self.embedder.embed_images(images.to(self.embedder.device))
            image_cos = image_image_similarity(image_emb, ref_emb)
            text_cos = (image_emb * text_emb.to(image_emb)).sum(dim=-1)
            s_i, s_t = map_similarity(image_cos), map_similarity(text_cos)
            scores = lambda_harmonic(s_i, s_t, self.lam).to(device=images.device, dtype=torch.float32)
        details = {
            "image_similarity": s_i.detach().float().to(images.device),
            "text_similarity": s_t.detach().float().to(images.device),
            "image_cosine": image_cos.detach().float().to(images.device),
            "text_cosine": text_cos.detach().float().to(images.device),
        }
        return RewardOutput(scores=scores, details=details)
