"""CLIP image/text encoders behind one small, differentiable interface.

Rewards (CLIPScore, image–image similarity, aesthetic heads) need the same three things from CLIP,
whichever library holds the weights: a preprocessing of ``[B,3,H,W]`` images in [0,1] that keeps
gradients, an image encoder and a text encoder. :class:`ClipModel` gives exactly that for a
transformers ``CLIPModel`` or an open_clip model, and :func:`load_clip` builds one from a spec string:

* ``tiny:clip`` / ``tiny:open_clip`` — tiny random-weight models (fixed seed) for tests and demos;
* ``world:shapes-clip`` — the shapes world's project-trained CLIP, shipped in the package (docs/world.md);
* ``open_clip:<arch>/<pretrained tag>`` (e.g. ``open_clip:ViT-H-14/laion2b_s32b_b79k``),
  ``open_clip:<arch>/<checkpoint file>``, ``open_clip:hf-hub:<org/repo>``, ``open_clip:local-dir:<folder>``;
* a transformers hub id (``openai/clip-vit-large-patch14``) or a local folder (transformers
  ``config.json`` or open_clip ``open_clip_config.json``).

Hub downloads are tried only after the local cache, and never when ``HF_HUB_OFFLINE`` /
``TRANSFORMERS_OFFLINE`` is set (read at call time, so setting it after import also counts). A model
that cannot be found raises :class:`OfflineModelError` as one line that says how to pass a local path.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from genreward.errors import GenrewardError
from genreward.models.device import resolve_device, resolve_dtype
from genreward.models.hub import from_pretrained_offline_aware, hub_unavailable, offline_error, quiet_hub
from genreward.images import check_images
from genreward.models.tokenizers import CLIP_TEXT_TOKEN_IDS
from genreward.registry import find_spec_loader, register_spec

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BACKENDS = ("auto", "transformers", "open_clip")
TINY_SEED = 1234  # fixed so that tiny models are identical in every process
RESIZE_MODES = ("shortest", "squash", "longest")


class ClipModel(torch.nn.Module):
    """A frozen CLIP model (transformers or open_clip) with differentiable torch preprocessing.

    ``encode_image`` / ``encode_text`` return the *unnormalised* projected embeddings ``[B, D]`` in
    float32 (the raw model outputs, as both libraries return them); ``embed_images`` / ``embed_texts``
    return L2-normalised ones, which is what cosine-similarity rewards want.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[..., Any],
        backend: str,
        image_size: int,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        context_length: int = 77,
        resize_mode: str = "shortest",
        spec: str = "",
    ):
        super().__init__()
        if backend not in ("transformers", "open_clip"):
            raise ValueError(f"unknown CLIP backend {backend!r}")
        if resize_mode not in RESIZE_MODES:
            raise GenrewardError(f"CLIP model {spec!r} uses resize mode {resize_mode!r}; supported: {', '.join(RESIZE_MODES)}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.backend = backend
        self.spec = spec
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.context_length = int(context_length)
        self.resize_mode = resize_mode
        self.eval()

    def train(self, mode: bool = True) -> "ClipModel":
        """The scorer stays in eval mode: dropout in a reward would make scores noisy."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def logit_scale(self) -> float | None:
        """``exp(logit_scale)`` (≈100 for trained CLIPs), or None if the model has none."""
        scale = getattr(self.model, "logit_scale", None)
        if not isinstance(scale, torch.Tensor):
            return None
        return float(scale.detach().float().exp().reshape(-1)[0])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] → normalised ``[B,3,S,S]`` float32, differentiable w.r.t. the pixels.

        Same steps as CLIP's PIL pipeline (bicubic antialiased resize of the shorter side to S, centre
        crop, mean/std normalisation) but in torch, so reward gradients reach the generator. Values are
        not clamped after the bicubic resize (like torchvision on float tensors), keeping gradients everywhere.
        """
        check_images(images)
        x = images.float()
        size = self.image_size
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            target = (size, size)
        elif self.resize_mode == "shortest":
            short, long = min(h, w), max(h, w)
            other = int(size * long / short)
            target = (size, other) if h <= w else (other, size)
        else:  # longest: fit inside S×S, pad the rest with black (open_clip's fill_color 0)
            short, long = min(h, w), max(h, w)
            other = int(size * short / long)
            target = (other, size) if h <= w else (size, other)
        if (h, w) != target:
            x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
        x = _centre_crop_or_pad(x, size)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B,3,S,S]`` (from :meth:`preprocess`) → unnormalised embeddings ``[B,D]`` float32."""
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if self.backend == "open_clip":
            out = self.model.encode_image(pixels, normalize=False)
        else:
            out = _pooled(self.model.get_image_features(pixel_values=pixels))
        return out.float()

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts → unnormalised text embeddings ``[B,D]`` float32 (long prompts are truncated to the context)."""
        prompts = _check_prompts(prompts)
        if self.backend == "open_clip":
            tokens = self.tokenizer(prompts).to(self.device)
            out = self.model.encode_text(tokens, normalize=False)
        else:
            batch = self.tokenizer(
                prompts, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
            )
            out = _pooled(
                self.model.get_text_features(
                    input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
                )
            )
        return out.float()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B,3,H,W]`` in [0,1] → L2-normalised embeddings ``[B,D]`` float32 (differentiable)."""
        return F.normalize(self.encode_image(self.preprocess(images)), dim=-1)

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts → L2-normalised text embeddings ``[B,D]`` float32."""
        return F.normalize(self.encode_text(prompts), dim=-1)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, backend={self.backend}, image_size={self.image_size}, resize_mode={self.resize_mode}"


def _centre_crop_or_pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop (torchvision's rounding) or zero-pad to ``size × size``."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        h, w = x.shape[-2:]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def _pooled(out: Any) -> torch.Tensor:
    """transformers ≥5 returns a ModelOutput whose ``pooler_output`` is the projection; older ones a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    """A list of strings; a bare string would silently be split into characters by some tokenizers."""
    if isinstance(prompts, str):
        raise GenrewardError("prompts must be a list of strings, got a single string")
    prompts = list(prompts)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise GenrewardError(f"prompts must be strings, got {bad[0]}")
    return prompts


# --------------------------------------------------------------------------------------------- loading


def _hub_file(repo: str, filenames: Sequence[str], spec: str) -> str:
    """Local path of the first of ``filenames`` in hub ``repo``: cache first, then the hub unless offline."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    last: BaseException | None = None
    for name in filenames:
        try:
            with quiet_hub():
                return hf_hub_download(repo, name, local_files_only=True)
        except (EntryNotFoundError, OSError, ValueError) as exc:
            last = exc
    if hub_unavailable():  # switched off or no connection: fail now, not after the client's retries
        raise offline_error(spec, "CLIP model", last)
    for name in filenames:
        try:
            with quiet_hub():
                return hf_hub_download(repo, name)
        except RepositoryNotFoundError:
            raise GenrewardError(f"CLIP model {spec!r}: repository {repo!r} does not exist on the hub (or is private)") from None
        except EntryNotFoundError as exc:  # this file is not in the repo (remote answer); try the next name
            if isinstance(exc, FileNotFoundError):  # LocalEntryNotFoundError: the hub was not reachable
                raise offline_error(spec, "CLIP model", exc) from None
            last = exc
        except Exception as exc:  # network failure: stop rather than retry every file name
            raise offline_error(spec, "CLIP model", exc) from None
    raise GenrewardError(f"CLIP model {spec!r}: none of {', '.join(filenames)} is in hub repository {repo!r}")


def load_clip(
    spec: str,
    backend: str = "auto",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "fp32",
) -> ClipModel:
    """Build a frozen :class:`ClipModel` from a spec string (see the module docstring for the forms)."""
    if not isinstance(spec, str) or not spec.strip():
        raise GenrewardError(f"CLIP model spec must be a non-empty string, got {spec!r}")
    if backend not in BACKENDS:
        raise GenrewardError(f"unknown CLIP backend {backend!r}; use one of {', '.join(BACKENDS)}")
    spec = spec.strip()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)

    loader = find_spec_loader("clip", spec, what="CLIP model")
    if loader is not None:
        return loader(spec, backend=backend, device=dev, dtype=torch_dtype)

    path = Path(spec).expanduser()
    if path.is_dir():
        has_open_clip = (path / "open_clip_config.json").is_file()
        has_transformers = (path / "config.json").is_file()
        use = backend
        if use == "auto":
            use = "open_clip" if has_open_clip and not has_transformers else "transformers"
        if use == "open_clip":
            return _load_open_clip(spec, f"local-dir:{path}", dev, torch_dtype)
        return _load_transformers(spec, str(path), dev, torch_dtype)
    if path.exists():
        raise GenrewardError(
            f"CLIP model {spec!r} is a file; pass a folder, or an open_clip checkpoint as open_clip:<arch>/{spec}"
        )
    if spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1:
        raise GenrewardError(f"CLIP model folder not found: {spec}")
    if backend == "open_clip":
        return _load_open_clip(spec, f"hf-hub:{spec}", dev, torch_dtype)
    return _load_transformers(spec, spec, dev, torch_dtype)


def check_backend(spec: str, backend: str, wanted: str) -> None:
    """One-line error unless ``backend`` is ``auto`` or the one the spec's weights need (for spec loaders)."""
    if backend not in ("auto", wanted):
        raise GenrewardError(f"CLIP model {spec!r} needs backend {wanted!r}, but backend={backend!r} was given")


# Registered spec loaders (genreward.registry, kind "clip"): loader(spec, backend=, device=, dtype=) → a ClipModel
# on that device in that dtype. ``world:`` specs are registered by the genreward.world.plugin plugin.


@register_spec("clip", "tiny", "tiny:clip", "tiny:open_clip", "tiny:")  # the prefix entry catches unknown tiny: names
def _tiny_spec(spec: str, backend: str, device: torch.device, dtype: torch.dtype) -> ClipModel:
    kind = spec.partition(":")[2] or ("open_clip" if backend == "open_clip" else "clip")
    if kind not in ("clip", "open_clip"):
        raise GenrewardError(f"unknown tiny CLIP {spec!r}; use tiny:clip (transformers) or tiny:open_clip")
    check_backend(spec, backend, "transformers" if kind == "clip" else "open_clip")
    model = _tiny_transformers() if kind == "clip" else _tiny_open_clip()
    return model.to(device=device, dtype=dtype)


@register_spec("clip", "open_clip:")
def _open_clip_spec(spec: str, backend: str, device: torch.device, dtype: torch.dtype) -> ClipModel:
    check_backend(spec, backend, "open_clip")
    return _load_open_clip(spec, spec[len("open_clip:") :], device, dtype)


# ----------------------------------------------------------------------------------------- tiny models


def _tiny_transformers() -> ClipModel:
    """A 2-layer transformers CLIP with CLIP's real tokenizer; same weights every time, global RNG untouched."""
    from transformers import CLIPConfig, CLIPModel

    from genreward.models.tokenizers import build_clip_tokenizer

    config = CLIPConfig(
        text_config=dict(
            **CLIP_TEXT_TOKEN_IDS,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = CLIPModel(config)
    return ClipModel(
        model,
        build_clip_tokenizer(),
        backend="transformers",
        image_size=32,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        context_length=77,
        spec="tiny:clip",
    )


def _tiny_open_clip() -> ClipModel:
    """A 2-layer open_clip CLIP built from its config dataclasses (open_clip 3.3's ``create_model`` only
    takes registered names or folders, so a direct construction avoids touching its global registry)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)
    return ClipModel(
        model,
        open_clip.SimpleTokenizer(context_length=77),
        backend="open_clip",
        image_size=32,
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
        context_length=77,
        spec="tiny:open_clip",
    )


# ------------------------------------------------------------------------------------ real checkpoints


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def _load_transformers(spec: str, source: str, device: torch.device, dtype: torch.dtype) -> ClipModel:
    """transformers ``CLIPModel`` + tokenizer (+ preprocessing constants when a processor config exists)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    from genreward.models.tokenizers import build_clip_tokenizer

    def load_model(src: str, local_files_only: bool) -> Any:
        return CLIPModel.from_pretrained(src, local_files_only=local_files_only)

    def load_tokenizer(src: str, local_files_only: bool) -> Any:
        return AutoTokenizer.from_pretrained(src, local_files_only=local_files_only)

    def load_processor(src: str, local_files_only: bool) -> Any:
        return CLIPImageProcessor.from_pretrained(src, local_files_only=local_files_only)

    model = from_pretrained_offline_aware(load_model, source, spec, "CLIP model")
    text_cfg = model.config.text_config
    vision_cfg = model.config.vision_config
    tokenizer = None
    # A local folder without tokenizer files: transformers would build a tokenizer with an empty vocabulary
    # from config.json alone, so it is not asked at all.
    folder = Path(source)
    if not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES):
        try:
            tokenizer = from_pretrained_offline_aware(load_tokenizer, source, spec, "CLIP tokenizer")
        except GenrewardError:
            tokenizer = None  # no tokenizer to be had: CLIP's own BPE below
    if tokenizer is None:
        if text_cfg.vocab_size != 49408:
            raise GenrewardError(f"CLIP model {spec!r} has no tokenizer files and a non-CLIP vocabulary")
        # every OpenAI/LAION CLIP uses this exact BPE vocabulary
        tokenizer = build_clip_tokenizer(model_max_length=int(text_cfg.max_position_embeddings))
    image_size, mean, std = int(vision_cfg.image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    try:
        processor = from_pretrained_offline_aware(load_processor, source, spec, "CLIP image processor", allow_hub=False)
        crop = getattr(processor, "crop_size", None) or {}
        image_size = int(crop.get("height", image_size)) if isinstance(crop, dict) else int(crop)
        mean = tuple(processor.image_mean or mean)
        std = tuple(processor.image_std or std)
    except (GenrewardError, OSError, ValueError, TypeError, AttributeError):
        pass  # no preprocessor config: CLIP's standard constants at the vision tower's resolution
    context = min(int(text_cfg.max_position_embeddings), int(getattr(tokenizer, "model_max_length", 77) or 77))
    clip = ClipModel(model, tokenizer, "transformers", image_size, mean, std, context_length=context, spec=spec)
    return clip.to(device=device, dtype=dtype)


def _load_open_clip(spec: str, rest: str, device: torch.device, dtype: torch.dtype) -> ClipModel:
    """open_clip model from ``<arch>/<tag or file>``, ``hf-hub:<repo>`` or ``local-dir:<folder>``."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    kwargs: dict[str, Any] = {}
    if rest.startswith("hf-hub:"):
        repo = rest[len("hf-hub:") :]
        _hub_file(repo, ["open_clip_config.json"], spec)
        weights = _hub_file(repo, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME], spec)
        name, pretrained = f"local-dir:{Path(weights).parent}", None  # the cached snapshot holds both files
    elif rest.startswith("local-dir:"):
        folder = Path(rest[len("local-dir:") :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise GenrewardError(f"CLIP model {spec!r}: {folder} has no open_clip_config.json")
        name, pretrained = f"local-dir:{folder}", None
    else:
        arch, _, source = rest.partition("/")
        if arch not in open_clip.list_models():
            raise GenrewardError(f"unknown open_clip architecture {arch!r} in {spec!r} (see open_clip.list_models())")
        if not source:
            raise GenrewardError(f"CLIP model {spec!r} names no weights; use open_clip:{arch}/<pretrained tag or checkpoint file>")
        tag_cfg = open_clip.get_pretrained_cfg(arch, source)
        if tag_cfg and tag_cfg.get("hf_hub"):
            repo, filename = os.path.split(tag_cfg["hf_hub"])
            filename = filename or HF_WEIGHTS_NAME
            safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else filename.rsplit(".", 1)[0] + ".safetensors"
            candidates = [safe, filename] if filename.endswith((".bin", ".pth")) else [filename]
            pretrained = _hub_file(repo, candidates, spec)
            kwargs["force_preprocess_cfg"] = {
                k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg
            }
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))  # what the tag was trained with
        elif tag_cfg:
            if hub_unavailable():
                raise offline_error(spec, "CLIP model")
            pretrained = source  # URL-only tag: open_clip downloads it itself
        elif Path(source).expanduser().is_file():
            pretrained = str(Path(source).expanduser())
        else:
            known = open_clip.list_pretrained_tags_by_model(arch)
            tags = ", ".join(known[:8]) + (f", … ({len(known)} in all)" if len(known) > 8 else "") if known else "none"
            raise GenrewardError(
                f"{source!r} is neither a pretrained tag of open_clip {arch} (tags: {tags}) nor a checkpoint file"
            )
        name = arch
    try:
        model = open_clip.create_model(name, pretrained=pretrained, precision=precision, device=device, **kwargs)
        tokenizer = open_clip.get_tokenizer(name)
    except GenrewardError:
        raise
    except (OSError, ConnectionError) as exc:
        raise offline_error(spec, "CLIP model", exc) from None
    except (RuntimeError, ValueError, KeyError) as exc:
        raise GenrewardError(f"cannot build open_clip model {spec!r}: {exc}") from None
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise GenrewardError(f"CLIP model {spec!r} has a non-square input {tuple(size)}, which is not supported")
        size = size[0]
    context = int(getattr(model, "context_length", 77) or 77)
    clip = ClipModel(
        model,
        tokenizer,
        "open_clip",
        int(size),
        cfg.get("mean", OPENAI_CLIP_MEAN),
        cfg.get("std", OPENAI_CLIP_STD),
        context_length=context,
        resize_mode=cfg.get("resize_mode", "shortest"),
        spec=spec,
    )
    return clip.to(device=device)


TEXT_CACHE_SIZE = 4096  # prompts repeat across a training run; text embeddings are frozen


class TextEmbeddingCache:
    """Normalised, gradient-free text embeddings ``[B, D]`` of a CLIP, cached per prompt (least recently used out)."""

    def __init__(self, clip: "ClipModel", size: int = TEXT_CACHE_SIZE):
        self.clip, self.size = clip, size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            with torch.no_grad():
                embedded = self.clip.embed_texts(missing)
            for prompt, emb in zip(missing, embedded):
                self._cache[prompt] = emb
        for prompt in prompts:
            self._cache.move_to_end(prompt)
        out = torch.stack([self._cache[p] for p in prompts])
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return out
