"""Subject-driven evaluation in the DreamBench protocol (docs/algorithms/rpo_lambda_harmonic.md §9), and subject folders.

Layout: ``ROOT/<subject>/`` holds the subject's reference photos (jpg/png/webp/bmp) and optionally
``subject.yaml`` (``class_noun``, ``live``, ``prompts``: templates with ``{identifier}`` and ``{class_noun}``).
DreamBench's 30 subjects are known by name (class noun, live or object); its 25 prompts per kind are built in.

Metrics, per generated image x of a subject with references r_1..r_M (prompt p, identifier removed for CLIP-T):

* DINO   = mean_m cos(DINO-CLS(x), DINO-CLS(r_m))       — ViT-S/16 ``facebook/dino-vits16``;
* CLIP-I = mean_m cos(CLIP-I(x), CLIP-I(r_m))           — CLIP ViT-B/16 image embeddings;
* CLIP-T = max(cos(CLIP-T(p), CLIP-I(x)), 0)            — torchmetrics ``clip_score``/100 (clamps at 0).

Averaged over the images of a prompt, then over prompts, then over subjects. ``tiny:dino`` / ``tiny:clip`` are
random-weight stand-ins for offline tests. Outputs: per-subject run folders (images + metrics.jsonl, the layout of
:mod:`genreward.evaluation`), ``summary.csv/.md/.json``, ``per_prompt.csv``, ``subjects.json`` and ``gallery.html``
whose left ("before") column shows the subject's reference photos beside every row of generated images.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from genreward.errors import GenrewardError
from genreward.images import (  # noqa: F401  (image_files / load_reference_images: also imported from here)
    IMAGE_EXTENSIONS,
    check_images,
    fit_square,
    from_uint8,
    image_files,
    load_images,
    load_reference_images,
    save_png,
)
from genreward.models.device import resolve_device
from genreward.models.hub import from_pretrained_offline_aware
from genreward.rewards.base import RewardOutput, check_batch
from genreward.rewards.lambda_harmonic import image_image_similarity, strip_tokens
from genreward.schema import ModelConfig, SampleConfig

log = logging.getLogger("genreward.dreambench")

TINY_SEED = 1234

# DreamBench's evaluation prompts (DreamBooth benchmark): 25 for objects, 25 for live subjects.
OBJECT_PROMPTS = [
    "a {identifier} {class_noun} in the jungle",
    "a {identifier} {class_noun} in the snow",
    "a {identifier} {class_noun} on the beach",
    "a {identifier} {class_noun} on a cobblestone street",
    "a {identifier} {class_noun} on top of pink fabric",
    "a {identifier} {class_noun} on top of a wooden floor",
    "a {identifier} {class_noun} with a city in the background",
    "a {identifier} {class_noun} with a mountain in the background",
    "a {identifier} {class_noun} with a blue house in the background",
    "a {identifier} {class_noun} on top of a purple rug in a forest",
    "a {identifier} {class_noun} with a wheat field in the background",
    "a {identifier} {class_noun} with a tree and autumn leaves in the background",
    "a {identifier} {class_noun} with the Eiffel Tower in the background",
    "a {identifier} {class_noun} floating on top of water",
    "a {identifier} {class_noun} floating in an ocean of milk",
    "a {identifier} {class_noun} on top of green grass with sunflowers around it",
    "a {identifier} {class_noun} on top of a mirror",
    "a {identifier} {class_noun} on top of the sidewalk in a crowded street",
    "a {identifier} {class_noun} on top of a dirt road",
    "a {identifier} {class_noun} on top of a white rug",
    "a red {identifier} {class_noun}",
    "a purple {identifier} {class_noun}",
    "a shiny {identifier} {class_noun}",
    "a wet {identifier} {class_noun}",
    "a cube shaped {identifier} {class_noun}",
]
LIVE_PROMPTS = OBJECT_PROMPTS[:10] + [
    "a {identifier} {class_noun} wearing a red hat",
    "a {identifier} {class_noun} wearing a santa hat",
    "a {identifier} {class_noun} wearing a rainbow scarf",
    "a {identifier} {class_noun} wearing a black top hat and a monocle",
    "a {identifier} {class_noun} in a chef outfit",
    "a {identifier} {class_noun} in a firefighter outfit",
    "a {identifier} {class_noun} in a police outfit",
    "a {identifier} {class_noun} wearing pink glasses",
    "a {identifier} {class_noun} wearing a yellow shirt",
    "a {identifier} {class_noun} in a purple wizard outfit",
] + OBJECT_PROMPTS[20:]

# The 30 DreamBench subjects: folder name → (class noun, live subject?).
DREAMBENCH_SUBJECTS: dict[str, tuple[str, bool]] = {
    "backpack": ("backpack", False), "backpack_dog": ("backpack", False), "bear_plushie": ("stuffed animal", False),
    "berry_bowl": ("bowl", False), "can": ("can", False), "candle": ("candle", False), "cat": ("cat", True),
    "cat2": ("cat", True), "clock": ("clock", False), "colorful_sneaker": ("sneaker", False), "dog": ("dog", True),
    "dog2": ("dog", True), "dog3": ("dog", True), "dog5": ("dog", True), "dog6": ("dog", True), "dog7": ("dog", True),
    "dog8": ("dog", True), "duck_toy": ("toy", False), "fancy_boot": ("boot", False),
    "grey_sloth_plushie": ("stuffed animal", False), "monster_toy": ("toy", False), "pink_sunglasses": ("glasses", False),
    "poop_emoji": ("toy", False), "rc_car": ("toy", False), "red_cartoon": ("cartoon", False), "robot_toy": ("toy", False),
    "shiny_sneaker": ("sneaker", False), "teapot": ("teapot", False), "vase": ("vase", False),
    "wolf_plushie": ("stuffed animal", False),
}
LIVE_NOUNS = {"cat", "dog", "kitten", "puppy"}


# ------------------------------------------------------------------------------------- subject folders


def write_skimage_subject(name: str, folder: str | Path, count: int = 4, size: int = 256) -> Path:
    """Write a real subject from ``skimage.data`` (e.g. ``chelsea``, the cat) as ``count`` reference photos.

    Variants are deterministic crops and horizontal flips of the one photo, so a CPU demo has a subject with
    several views without any download; each is ``size×size``. Returns the folder.
    """
    try:
        import skimage.data as data
    except ImportError:
        raise GenrewardError("skimage subjects need scikit-image: pip install scikit-image") from None
    loader = getattr(data, name, None)
    if loader is None or not callable(loader):
        raise GenrewardError(f"unknown skimage subject {name!r}; try chelsea, astronaut, coffee, rocket")
    image = loader()
    if image.ndim == 2:
        image = image[..., None].repeat(3, axis=-1)
    full = from_uint8(image[..., :3])
    _, _, h, w = full.shape
    side = min(h, w)
    crops = [
        (0, (w - side) // 2, side),  # centre square
        (0, 0, side),  # left square
        (0, w - side, side),  # right square
        (h // 10, (w - int(side * 0.8)) // 2, int(side * 0.8)),  # closer crop
    ]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        top, left, s = crops[k % len(crops)]
        crop = full[..., top : top + s, left : left + s]
        if (k // len(crops)) % 2 == 1 or k % 2 == 1:
            crop = crop.flip(-1)
        save_png(fit_square(crop, size)[0], folder / f"{name}_{k:02d}.png")
    return folder


def resolve_subject_folder(spec: str, workdir: str | Path) -> Path:
    """``skimage:NAME`` → photos written to ``workdir/references`` (by code); anything else is a folder path."""
    if spec.startswith("skimage:"):
        return write_skimage_subject(spec.split(":", 1)[1], Path(workdir) / "references")
    return Path(spec)


@dataclass
class Subject:
    """One DreamBench subject: its folder, class noun ("dog"), kind and prompt templates."""

    name: str
    folder: Path
    class_noun: str
    live: bool
    prompts: list[str] = field(default_factory=list)

    def prompt_texts(self, identifier: str, limit: int | None = None) -> list[str]:
        templates = self.prompts[:limit] if limit is not None else self.prompts
        return [fill_template(t, identifier, self.class_noun) for t in templates]


def fill_template(template: str, identifier: str, class_noun: str) -> str:
    """``{identifier}``/``{class_noun}`` placeholders → text (one-line error naming an unknown placeholder)."""
    try:
        return " ".join(template.format(identifier=identifier, class_noun=class_noun).split())
    except (KeyError, IndexError, ValueError) as exc:
        raise GenrewardError(f"prompt template {template!r} has a bad placeholder ({exc}); use {{identifier}} and {{class_noun}}") from None


def load_subject(folder: str | Path, class_noun: str | None = None, live: bool | None = None) -> Subject:
    """Subject from a folder: ``subject.yaml`` if present, else DreamBench's table, else the folder name."""
    import yaml

    folder = Path(folder)
    image_files(folder)
    meta: dict[str, Any] = {}
    meta_path = folder / "subject.yaml"
    if meta_path.is_file():
        try:
            meta = yaml.safe_load(meta_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise GenrewardError(f"{meta_path}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(meta, dict):
            raise GenrewardError(f"{meta_path}: expected a mapping with class_noun / live / prompts")
        unknown = set(meta) - {"class_noun", "live", "prompts"}
        if unknown:
            raise GenrewardError(f"{meta_path}: unknown key '{sorted(unknown)[0]}' (allowed: class_noun, live, prompts)")
    known = DREAMBENCH_SUBJECTS.get(folder.name)
    noun = class_noun or meta.get("class_noun") or (known[0] if known else re.sub(r"\d+$", "", folder.name).replace("_", " "))
    is_live = live if live is not None else meta.get("live", known[1] if known else noun in LIVE_NOUNS)
    prompts = meta.get("prompts") or (LIVE_PROMPTS if is_live else OBJECT_PROMPTS)
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise GenrewardError(f"{meta_path}: 'prompts' must be a list of strings")
    return Subject(folder.name, folder, str(noun), bool(is_live), list(prompts))


def discover_subjects(root: str | Path, names: Sequence[str] | None = None) -> list[Subject]:
    """Every subfolder of ``root`` holding images (or just ``names``), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise GenrewardError(f"dreambench.root: folder not found: {root}")
    if names:
        missing = [n for n in names if not (root / n).is_dir()]
        if missing:
            raise GenrewardError(f"dreambench.subjects: no folder {root / missing[0]}")
        folders = [root / n for n in names]
    else:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and any(q.suffix.lower() in IMAGE_EXTENSIONS for q in p.iterdir()))
    if not folders:
        raise GenrewardError(f"dreambench.root: {root} has no subject folders with images")
    return [load_subject(f) for f in folders]


# ----------------------------------------------------------------------------------------------- DINO


class DinoEmbedder(torch.nn.Module):
    """Frozen DINO ViT (transformers ``ViTModel``) → L2-normalised CLS embeddings, preprocessing in torch."""

    def __init__(self, model: torch.nn.Module, size: tuple[int, int], crop: tuple[int, int] | None, mean, std, spec: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.size, self.crop = tuple(size), (tuple(crop) if crop else None)
        self.mean, self.std = tuple(mean), tuple(std)
        self.spec = spec

    def train(self, mode: bool = True) -> "DinoEmbedder":
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] → normalised CLS embeddings ``[B,D]`` float32 (bicubic resize, optional crop, ImageNet norm)."""
        check_images(images)
        x = images.float().to(self.device)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", antialias=True, align_corners=False)
        if self.crop is not None:
            (h, w), (ch, cw) = x.shape[-2:], self.crop
            x = x[..., (h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        out = self.model(pixel_values=((x - mean) / std).to(next(self.model.parameters()).dtype))
        return F.normalize(out.last_hidden_state[:, 0].float(), dim=-1)


def load_dino(spec: str = "facebook/dino-vits16", device: str | torch.device | None = None) -> DinoEmbedder:
    """``tiny:dino`` (random weights, offline) or a hub id / local folder of a transformers ViT (DINO)."""
    imagenet_mean, imagenet_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if spec in ("tiny:dino", "tiny"):
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, add_pooling_layer=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = ViTModel(config, add_pooling_layer=False)
        embedder = DinoEmbedder(model, (32, 32), None, imagenet_mean, imagenet_std, spec)
    elif spec.startswith("tiny:"):
        raise GenrewardError(f"unknown tiny DINO spec {spec!r}; use tiny:dino")
    else:
        from transformers import AutoImageProcessor, ViTModel

        model = from_pretrained_offline_aware(ViTModel.from_pretrained, spec, spec, "DINO model", add_pooling_layer=False)
        proc = from_pretrained_offline_aware(AutoImageProcessor.from_pretrained, spec, spec, "DINO image processor")
        size = getattr(proc, "size", None) or {"height": 224, "width": 224}
        size = size if isinstance(size, dict) else {"height": getattr(size, "height", 224), "width": getattr(size, "width", 224)}
        hw = (int(size.get("height") or size.get("shortest_edge", 224)), int(size.get("width") or size.get("shortest_edge", 224)))
        embedder = DinoEmbedder(model, hw, None, proc.image_mean or imagenet_mean, proc.image_std or imagenet_std, spec)
    return embedder.to(resolve_device(device))


# ------------------------------------------------------------------------------------ metric "rewards"


class ReferenceSimilarity:
    """Mean cosine of each image to the subject's references under an embedder (DINO or CLIP-I)."""

    differentiable = False

    def __init__(self, name: str, embedder: Any, references: torch.Tensor):
        self.name, self.embedder = name, embedder
        with torch.no_grad():
            self.reference_emb = embedder.embed_images(check_images(references, "references"))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        check_batch(self.name, images, prompts)
        emb = self.embedder.embed_images(images)
        return RewardOutput(scores=image_image_similarity(emb, self.reference_emb).float().cpu())


class ClipTextAlignment:
    """CLIP-T: max(cos(text, image), 0) with the identifier removed from the prompt (torchmetrics clip_score/100)."""

    differentiable = False

    def __init__(self, clip: Any, identifier: str, name: str = "clip_t"):
        self.name, self.clip, self.identifier = name, clip, identifier

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        check_batch(self.name, images, prompts)
        text = self.clip.embed_texts([strip_tokens(p, [self.identifier]) for p in prompts])
        emb = self.clip.embed_images(images)
        return RewardOutput(scores=(emb * text.to(emb)).sum(-1).clamp(min=0).float().cpu())


@dataclass
class Metrics:
    """Loaded metric backbones (loaded once for all subjects)."""

    dino: DinoEmbedder
    clip: Any
    identifier: str

    def for_subject(self, references: torch.Tensor) -> list[Any]:
        return [
            ReferenceSimilarity("dino", self.dino, references),
            ReferenceSimilarity("clip_i", self.clip, references.to(self.clip.device)),
            ClipTextAlignment(self.clip, self.identifier),
        ]


def load_metrics_models(dino: str, clip: str, identifier: str, device: str | torch.device | None = None) -> Metrics:
    from genreward.models.clip import load_clip

    return Metrics(load_dino(dino, device=device), load_clip(clip, device=device), identifier)


METRIC_NAMES = ("dino", "clip_i", "clip_t")


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class DreamBenchSection:
    """DreamBench-style subject evaluation (``genreward eval`` with a ``dreambench:`` key)."""

    root: str = "???"  # folder with one subfolder per subject
    subjects: list[str] | None = None  # None = every subject folder
    identifier: str = "sks"  # the rare token fine-tuning bound to the subject ("[V]")
    prompts_limit: int | None = None  # first N prompts per subject (None = all 25)
    images_per_prompt: int = 4
    seed: int = 0
    lora: str | None = None  # fine-tuned LoRA per subject; "{subject}" is replaced by the subject's name
    unet: str | None = None  # full fine-tuned U-Net folder per subject; "{subject}" likewise
    generated: str | None = None  # score images already generated (GENERATED/<subject>/pPPPP_sSS.png) instead of sampling
    dino_model: str = "facebook/dino-vits16"
    clip_model: str = "openai/clip-vit-base-patch16"
    gallery: bool = True

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1:
            raise ValueError(f"key 'dreambench.images_per_prompt' must be >= 1, got {self.images_per_prompt}")
        if self.lora and self.unet:
            raise ValueError("keys 'dreambench.lora' and 'dreambench.unet' are exclusive")


@dataclass
class DreamBenchConfig:
    output_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    dreambench: DreamBenchSection = field(default_factory=DreamBenchSection)


def _generated_images(folder: Path, n_prompts: int, per_prompt: int) -> torch.Tensor:
    paths = [folder / f"p{i:04d}_s{j:02d}.png" for i in range(n_prompts) for j in range(per_prompt)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise GenrewardError(f"dreambench.generated: missing image {missing[0]} ({len(missing)} missing in all)")
    return load_images(paths)


def score_existing(
    images: torch.Tensor, prompts: list[str], per_prompt: int, rewards: Sequence[Any], out: Path, image_paths: list[str]
) -> list[dict]:
    """Score already generated images (``images`` ordered prompt-major) and write the run folder like ``evaluate``."""
    from genreward.evaluation import score_images, write_run_outputs

    records = []
    for i, prompt in enumerate(prompts):
        batch = images[i * per_prompt : (i + 1) * per_prompt]
        scores = score_images(rewards, batch, [prompt] * len(batch), [{}] * len(batch))
        for j in range(len(batch)):
            records.append({"prompt_index": i, "prompt": prompt, "sample_index": j, "seed": None,
                            "image": image_paths[i * per_prompt + j], "metadata": {},
                            "rewards": {r.name: float(scores[r.name][j]) for r in rewards}})
    out.mkdir(parents=True, exist_ok=True)
    write_run_outputs(records, [r.name for r in rewards], out)
    return records


def evaluate_subject(
    subject: Subject,
    metrics: Metrics,
    out: Path,
    identifier: str,
    images_per_prompt: int,
    prompts_limit: int | None = None,
    pipe: Any = None,
    sample: SampleConfig | None = None,
    seed: int = 0,
    unet: Any = None,
    generated: Path | None = None,
    references: torch.Tensor | None = None,
) -> list[dict]:
    """Generate (or read) ``images_per_prompt`` images per prompt for one subject, score them, write ``out``."""
    from genreward.evaluation import evaluate
    from genreward.prompts import PromptItem

    refs = references if references is not None else load_reference_images(subject.folder)
    rewards = metrics.for_subject(refs)
    prompts = subject.prompt_texts(identifier, prompts_limit)
    if generated is not None:
        folder = generated / subject.name
        images = _generated_images(folder, len(prompts), images_per_prompt)
        (out / "images").mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(len(prompts)):
            for j in range(images_per_prompt):
                rel = f"images/p{i:04d}_s{j:02d}.png"
                shutil.copyfile(folder / f"p{i:04d}_s{j:02d}.png", out / rel)  # the run folder stays self-contained
                paths.append(rel)
        return score_existing(images, prompts, images_per_prompt, rewards, out, paths)
    if pipe is None or sample is None:
        raise ValueError("evaluate_subject needs a pipeline and sample settings unless generated= is given")
    items = [PromptItem(p, {"subject": subject.name}) for p in prompts]
    return evaluate(pipe, items, rewards, out, sample, images_per_prompt=images_per_prompt, seed=seed, unet=unet, progress=False).records


def aggregate(per_subject: dict[str, list[dict]]) -> tuple[list[dict], list[dict], dict[str, float]]:
    """Images → prompt means → subject means (over prompts) → overall mean (over subjects), for each metric."""
    prompt_rows, subject_rows = [], []
    for name, records in per_subject.items():
        by_prompt: dict[int, list[dict]] = {}
        for rec in records:
            by_prompt.setdefault(rec["prompt_index"], []).append(rec)
        means = {m: [] for m in METRIC_NAMES}
        for index, recs in sorted(by_prompt.items()):
            row = {"subject": name, "prompt_index": index, "prompt": recs[0]["prompt"], "images": len(recs)}
            for m in METRIC_NAMES:
                vals = [r["rewards"][m] for r in recs if r["rewards"].get(m) is not None]
                row[m] = sum(vals) / len(vals) if vals else float("nan")
                means[m].append(row[m])
            prompt_rows.append(row)
        srow = {"subject": name, "prompts": len(by_prompt), "images": len(records)}
        for m in METRIC_NAMES:
            finite = [v for v in means[m] if math.isfinite(v)]
            srow[m] = sum(finite) / len(finite) if finite else float("nan")
        subject_rows.append(srow)
    overall = {}
    for m in METRIC_NAMES:
        finite = [r[m] for r in subject_rows if math.isfinite(r[m])]
        overall[m] = sum(finite) / len(finite) if finite else float("nan")
    return prompt_rows, subject_rows, overall


def write_tables(out: Path, prompt_rows: list[dict], subject_rows: list[dict], overall: dict[str, float], notes: str = "") -> None:
    """summary.csv/.md/.json (per subject + overall), per_prompt.csv, subjects.json."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "per_prompt.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["subject", "prompt_index", "prompt", "images", *METRIC_NAMES])
        writer.writeheader()
        writer.writerows(prompt_rows)
    total = {"subject": "(overall)", "prompts": sum(r["prompts"] for r in subject_rows), "images": sum(r["images"] for r in subject_rows), **overall}
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["subject", "prompts", "images", *METRIC_NAMES])
        writer.writeheader()
        writer.writerows(subject_rows + [total])
    lines = ["| subject | prompts | images | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|---|---|"]
    for row in subject_rows + [total]:
        name = f"**{row['subject']}**" if row is total else row["subject"]
        lines.append(f"| {name} | {row['prompts']} | {row['images']} | " + " | ".join(f"{row[m]:.4f}" for m in METRIC_NAMES) + " |")
    if notes:
        lines += ["", notes]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    clean = lambda v: v if isinstance(v, (int, str)) or math.isfinite(v) else None  # noqa: E731
    (out / "summary.json").write_text(json.dumps({m: clean(overall[m]) for m in METRIC_NAMES}, indent=2) + "\n", encoding="utf-8")
    (out / "subjects.json").write_text(
        json.dumps({r["subject"]: {k: clean(v) for k, v in r.items() if k != "subject"} for r in subject_rows}, indent=2) + "\n",
        encoding="utf-8",
    )


def write_subject_gallery(out: Path, per_subject: dict[str, list[dict]], subjects: dict[str, Subject], title: str) -> Path:
    """gallery.html: one row per (subject, prompt); the left column holds the subject's reference photos."""
    from genreward.gallery import write_gallery
    from genreward.jsonl import append_jsonl

    refs_dir = out / "references"
    if refs_dir.exists():
        shutil.rmtree(refs_dir)
    (refs_dir / "images").mkdir(parents=True)
    combined = out / "metrics.jsonl"
    combined.unlink(missing_ok=True)
    ref_paths: dict[str, list[str]] = {}
    for name in per_subject:
        ref_paths[name] = []
        for k, src in enumerate(image_files(subjects[name].folder)):
            rel = f"images/{name}_r{k:02d}{src.suffix.lower()}"
            shutil.copyfile(src, refs_dir / rel)
            ref_paths[name].append(rel)
    for name, records in per_subject.items():
        seen: set[int] = set()
        for rec in records:
            row_prompt = f"{name}: {rec['prompt']}"
            append_jsonl(combined, {**rec, "prompt": row_prompt, "image": f"{name}/{rec['image']}"})
            if rec["prompt_index"] not in seen:
                seen.add(rec["prompt_index"])
                for k, rel in enumerate(ref_paths[name]):
                    append_jsonl(refs_dir / "metrics.jsonl", {"prompt": row_prompt, "image": rel, "sample_index": k,
                                                              "seed": "reference", "rewards": {}})
    return write_gallery(out, compare_dir=refs_dir, out_path=out / "gallery.html", title=title)


def run_dreambench(config: DreamBenchConfig) -> int:
    """``genreward eval`` with a ``dreambench:`` section: every subject × prompt × image, tables and gallery."""
    from genreward.config import save_config
    from genreward.models import load_pipeline

    start = time.perf_counter()
    d, m = config.dreambench, config.model
    if d.root == "???":
        raise GenrewardError("dreambench.root: missing required value (the folder with one subfolder per subject)")
    out = Path(config.output_dir)
    save_config(config, out)
    subjects = discover_subjects(d.root, d.subjects)
    metrics = load_metrics_models(d.dino_model, d.clip_model, d.identifier, device=m.device)
    per_subject: dict[str, list[dict]] = {}
    pipe, loaded_for = None, None
    from tqdm.auto import tqdm

    for subject in tqdm(subjects, desc="subjects", unit="subject"):
        if d.generated is not None:
            per_subject[subject.name] = evaluate_subject(
                subject, metrics, out / subject.name, d.identifier, d.images_per_prompt, d.prompts_limit,
                generated=Path(d.generated),
            )
            continue
        lora = d.lora.replace("{subject}", subject.name) if d.lora else m.lora
        unet = d.unet.replace("{subject}", subject.name) if d.unet else m.unet
        if pipe is None or loaded_for != (lora, unet):
            pipe = load_pipeline(m.pipeline, device=m.device, dtype=m.dtype, lora=lora, unet=unet)
            loaded_for = (lora, unet)
        per_subject[subject.name] = evaluate_subject(
            subject, metrics, out / subject.name, d.identifier, d.images_per_prompt, d.prompts_limit,
            pipe=pipe, sample=config.sample, seed=d.seed,
        )
    prompt_rows, subject_rows, overall = aggregate(per_subject)
    notes = f"DINO: {d.dino_model} · CLIP-I/CLIP-T: {d.clip_model} · identifier '{d.identifier}' removed for CLIP-T"
    write_tables(out, prompt_rows, subject_rows, overall, notes)
    if d.gallery:
        print(f"gallery: {write_subject_gallery(out, per_subject, {s.name: s for s in subjects}, f'DreamBench: {out.name}')}")
    print((out / "summary.md").read_text(encoding="utf-8"))
    print(f"evaluated {sum(len(v) for v in per_subject.values())} images of {len(subjects)} subjects in "
          f"{time.perf_counter() - start:.1f}s; outputs: {out}")
    return 0
