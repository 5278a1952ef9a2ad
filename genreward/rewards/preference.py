"""Learned human-preference and aesthetic rewards: HPSv2, PickScore and the LAION aesthetic predictor.

All three are frozen CLIP models plus, for the aesthetic predictor, a small MLP head; the images go
through :class:`~genreward.models.clip.ClipModel`'s torch preprocessing, so every score is
differentiable with respect to the pixels (gradients never touch the reward's own weights).

PRDP (Deng et al., 2024) fine-tunes on the multi-reward ``10·pickscore + 2·hpsv2 + 0.05·laion_aesthetic``,
which brings the three to roughly comparable sizes (about 2.1, 0.55 and 0.28 for SD 1.x images)::

    {name: weighted_sum, options: {components: [
        {name: pickscore, weight: 10}, {name: hpsv2, weight: 2}, {name: laion_aesthetic, weight: 0.05}]}}

Weights are fetched from the Hugging Face hub only when they are not in the local cache and the hub is
not switched off (``HF_HUB_OFFLINE``); otherwise construction fails at once with a one-line
:class:`~genreward.errors.OfflineModelError` that names the repository and file and the option that
takes a local copy instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from genreward.errors import GenrewardError, OfflineModelError
from genreward.models.clip import ClipModel, load_clip
from genreward.models.hub import first_line, hub_unavailable, quiet_hub
from genreward.rewards.base import RewardOutput, check_batch, register
from genreward.rewards.clip_score import PromptImageCosine


HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCH = "ViT-H-14"  # open_clip architecture of laion2b_s32b_b79k, which HPS fine-tunes end to end

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_REPO = "trl-lib/ddpo-aesthetic-predictor"  # TRL's hub copy of sac+logos+ava1-l14-linearMSE.pth
AESTHETIC_HEAD_FILE = "aesthetic-model.pth"
AESTHETIC_HEAD_ORIGIN = "github.com/christophschuhmann/improved-aesthetic-predictor (sac+logos+ava1-l14-linearMSE.pth)"


# --------------------------------------------------------------------------------------------- helpers


def _first_line(exc: BaseException) -> str:
    return first_line(exc, 200)


def _hub_file(repo: str, filename: str, what: str, option: str) -> str:
    """Local path of ``filename`` from hub ``repo``: the cache first, then the hub unless it is switched off.

    Every failure is one line naming the file and the option that takes a local copy, so an offline
    machine learns what to fetch instead of seeing a stack of HTTP errors.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        with quiet_hub():
            return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError) or an unreadable cache entry
        pass
    fix = (
        f"download it where the hub is reachable (hf download {repo} {filename}) "
        f"and pass the local file with option {option}=<path>"
    )
    unavailable = hub_unavailable()  # switched off, or no connection at all: say so now, not after retries
    if unavailable:
        raise OfflineModelError(f"{what} {repo}/{filename} is not in the local model cache, and {unavailable}; {fix}")
    try:
        with quiet_hub():
            return hf_hub_download(repo, filename)
    except RepositoryNotFoundError:
        raise GenrewardError(f"{what}: hub repository {repo!r} does not exist (or is private or gated); {fix}") from None
    except EntryNotFoundError as exc:
        if isinstance(exc, FileNotFoundError):  # LocalEntryNotFoundError: the hub could not be reached
            raise OfflineModelError(f"{what} {repo}/{filename} could not be downloaded ({_first_line(exc)}); {fix}") from None
        raise GenrewardError(f"{what}: hub repository {repo!r} has no file {filename!r}; {fix}") from None
    except Exception as exc:  # network errors come in many types across huggingface_hub versions
        raise OfflineModelError(
            f"{what} {repo}/{filename} is not in the local model cache, and the model hub is unreachable "
            f"({type(exc).__name__}: {_first_line(exc)}); {fix}"
        ) from None


def _local_file(path: str, what: str, hint: str = "") -> str:
    """An existing file path (``~`` expanded), or a one-line error saying what it was for and where to get it."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise GenrewardError(f"{what} must be a file path, got {path!r}")
    resolved = Path(str(path)).expanduser()
    if not resolved.is_file():
        raise GenrewardError(f"{what} not found: {resolved}" + (f"; {hint}" if hint else ""))
    return str(resolved)


def _read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``torch.save``-d state dict (``{"state_dict": …}`` and DDP ``module.`` prefixes unwrapped).

    ``weights_only=True``: a reward checkpoint is data, and must not be able to run code on load.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GenrewardError(f"cannot read {what} {path}: {type(exc).__name__}: {_first_line(exc)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GenrewardError(f"{what} {path} is not a state dict of tensors")
    if all(str(k).startswith("module.") for k in obj):
        obj = {str(k)[len("module.") :]: v for k, v in obj.items()}
    return obj


def _embed_dim(clip: ClipModel) -> int:
    """Width of the joint image–text embedding (768 for ViT-L/14, 1024 for ViT-H/14)."""
    if clip.backend == "transformers":
        return int(clip.model.config.projection_dim)
    return int(clip.model.visual.output_dim)


@register("hpsv2")
class HPSv2(PromptImageCosine):
    """Human Preference Score v2 (Wu et al., 2023): OpenCLIP ViT-H/14 fine-tuned on HPD v2 preferences.

    Score: cosine of the normalised image and prompt embeddings, in [-1, 1]; Stable Diffusion images
    typically score 0.25–0.35 (the HPS v2 benchmark's scale, no logit scale applied). Differentiable.
    Preprocessing follows HPS: the longer side is resized to 224 and the rest padded with black.

    Downloads ``HPS_v2.1_compressed.pt`` (``version="v2.1"``) or ``HPS_v2_compressed.pt`` (``"v2.0"``)
    from hub repository ``xswu/HPSv2`` (the whole fine-tuned CLIP, not a head); ``checkpoint=`` takes a local
    copy instead. ``model=`` replaces the ViT-H/14 by any CLIP spec (e.g. ``tiny:open_clip`` in tests):
    it is used as is, or with ``checkpoint`` loaded into it when both are given.
    """

    def __init__(
        self,
        version: str = "v2.1",
        checkpoint: str | None = None,
        model: str | None = None,
        device: str | torch.device | None = None,
        dtype: str = "fp32",
    ):
        if version not in HPS_FILES:
            raise GenrewardError(f"hpsv2 option version must be one of {', '.join(HPS_FILES)}, got {version!r}")
        self.version = version
        path = _local_file(checkpoint, "hpsv2 checkpoint") if checkpoint is not None else None
        if model is None:
            path = path or _hub_file(HPS_REPO, HPS_FILES[version], f"HPS {version} checkpoint", "checkpoint")
            clip = load_clip(f"open_clip:{HPS_ARCH}/{path}", device=device, dtype=dtype)
        else:
            clip = load_clip(model, device=device, dtype=dtype)
            if path is not None:
                _load_open_clip_checkpoint(clip, path)
        clip.resize_mode = "longest"  # HPS's ResizeMaxSize: fit the longer side, pad with black
        super().__init__("hpsv2", clip)
        self.checkpoint = path


def _load_open_clip_checkpoint(clip: ClipModel, path: str) -> None:
    """Load an open_clip training checkpoint (HPS format: ``{"state_dict": …}``) into ``clip`` in place."""
    if clip.backend != "open_clip":
        raise GenrewardError(f"hpsv2 checkpoint {path} is an open_clip checkpoint, but model {clip.spec!r} is not open_clip")
    from open_clip.factory import load_checkpoint

    try:
        load_checkpoint(clip.model, path, strict=True, weights_only=True)
    except Exception as exc:  # unpickling, missing/unexpected keys, shape mismatches
        raise GenrewardError(f"cannot load hpsv2 checkpoint {path} into {clip.spec!r}: {_first_line(exc)}") from None
    clip.model.requires_grad_(False)


# ------------------------------------------------------------------------------------------- PickScore


@register("pickscore")
class PickScore(PromptImageCosine):
    """PickScore v1 (Kirstain et al., 2023): CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

    Score: ``scale`` · cosine of the normalised image and prompt embeddings. The default ``scale=1``
    gives the plain cosine in [-1, 1] (≈0.21 for SD 1.5 images, the scale PRDP reports); the PickScore
    paper multiplies by the model's logit scale (≈100, i.e. ≈21), which ``scale="logit_scale"`` reproduces.
    Differentiable.

    Downloads the transformers model ``yuvalkirstain/PickScore_v1`` (≈4 GB); ``model=`` takes a local
    folder or another CLIP spec. Its processor (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: 224 px bicubic
    shortest-side resize, centre crop, OpenAI mean/std) equals the loader's CLIP defaults, and its
    tokenizer is CLIP's BPE, so nothing else is fetched.
    """

    def __init__(
        self,
        model: str = PICKSCORE_MODEL,
        scale: float | str = 1.0,
        device: str | torch.device | None = None,
        dtype: str = "fp32",
    ):
        if not (scale == "logit_scale" or (isinstance(scale, (int, float)) and not isinstance(scale, bool))):
            raise GenrewardError(f"pickscore option scale must be a number or 'logit_scale', got {scale!r}")
        clip = load_clip(model, device=device, dtype=dtype)
        if scale == "logit_scale":
            if clip.logit_scale is None:
                raise GenrewardError(f"pickscore scale='logit_scale', but CLIP model {model!r} has no logit scale")
            scale = clip.logit_scale
        super().__init__("pickscore", clip, float(scale))


# ------------------------------------------------------------------------------------ LAION aesthetics


class AestheticHead(torch.nn.Module):
    """The LAION improved-aesthetic-predictor MLP: five linear layers, no activations, dropout in training only.

    Layout and parameter names (``layers.0`` … ``layers.7``) match the published state dict.
    """

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(in_features, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )
        self.eval()

    def train(self, mode: bool = True) -> "AestheticHead":
        """The head stays in eval mode: dropout in a reward would make scores noisy."""
        return super().train(False)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings ``[B, D]`` → scores ``[B]``."""
        return self.layers(embeddings).squeeze(-1)


@register("laion_aesthetic")
class LaionAesthetic:
    """LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE), the aesthetic reward of DDPO and PRDP.

    Score: MLP head on the L2-normalised CLIP ViT-L/14 image embedding, roughly 1–10 (mean rating on the
    AVA/SAC scale; SD 1.5 images score ≈5–6). Prompt-independent; differentiable.

    Downloads the CLIP ``openai/clip-vit-large-patch14`` (≈1.7 GB) and the 3.7 MB head, published at
    github.com/christophschuhmann/improved-aesthetic-predictor, from its hub copy
    ``trl-lib/ddpo-aesthetic-predictor`` / ``aesthetic-model.pth``. ``head=`` takes a local
    ``sac+logos+ava1-l14-linearMSE.pth`` (or any state dict with the same keys whose input width matches
    the CLIP's embedding), ``clip_model=`` another CLIP spec.
    """

    differentiable = True

    def __init__(
        self,
        clip_model: str = AESTHETIC_CLIP,
        head: str | None = None,
        device: str | torch.device | None = None,
        dtype: str = "fp32",
    ):
        self.name = "laion_aesthetic"
        # The small head first: an offline machine learns about both files before loading a 1.7 GB CLIP.
        if head is None:
            head_path = _hub_file(AESTHETIC_HEAD_REPO, AESTHETIC_HEAD_FILE, "LAION aesthetic head", "head")
        else:
            head_path = _local_file(head, "laion_aesthetic head", f"download it from {AESTHETIC_HEAD_ORIGIN}")
        state = _read_state_dict(head_path, "laion_aesthetic head")
        self.clip: ClipModel = load_clip(clip_model, device=device, dtype=dtype)
        dim = _embed_dim(self.clip)
        self.head = AestheticHead(dim)
        expected = {k: tuple(v.shape) for k, v in self.head.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        if missing:
            raise GenrewardError(
                f"laion_aesthetic head {head_path} lacks {', '.join(missing)}; expected the improved-aesthetic-predictor "
                f"keys {', '.join(expected)}"
            )
        got_in = tuple(state["layers.0.weight"].shape)
        if got_in != expected["layers.0.weight"]:
            raise GenrewardError(
                f"laion_aesthetic head {head_path} takes {got_in[-1]}-d embeddings but CLIP {clip_model!r} gives {dim}-d ones"
            )
        try:
            self.head.load_state_dict({k: state[k] for k in expected}, strict=True)
        except RuntimeError as exc:
            raise GenrewardError(f"cannot load laion_aesthetic head {head_path}: {_first_line(exc)}") from None
        self.head.requires_grad_(False).to(self.clip.device)  # float32: it is tiny, and keeps scores precise
        self.head_path = head_path

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        check_batch(self.name, images, prompts)
        if images.shape[0] == 0:
            return RewardOutput(scores=torch.zeros(0, device=images.device))
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            embeddings = self.clip.embed_images(images.to(self.clip.device))  # float32, L2-normalised
            scores = self.head(embeddings.to(next(self.head.parameters()).device))
            scores = scores.to(device=images.device, dtype=torch.float32)
        return RewardOutput(scores=scores)


__all__ = ["AestheticHead", "HPSv2", "LaionAesthetic", "PickScore"]
