"""Exact verifier of the shapes world: which shapes of which colours are where, read from pixels alone.

This is the world's GenEval. Method (no learned parts):

1. **Pixel colours.** Every pixel ``p`` is explained as a blend ``bg + a·(c − bg)`` of the background and
   each palette colour ``c``: ``a`` is the projection onto that line (clamped to [0, 1]) and the residual
   its distance from it. The pixel takes the colour with the smallest residual (a small penalty on
   ``1 − a`` breaks ties between colours on one line, e.g. easy-vqa's gray and black); it is foreground
   if ``a ≥ 0.5`` and the residual is within ``tolerance``. Anti-aliased edges are blends by
   construction, so they keep their colour instead of being mistaken for a neighbouring one.
2. **Objects.** Connected foreground pixels of one colour (8-neighbourhood, ``scipy.ndimage.label``)
   form an object; specks smaller than ``min_area`` or that vanish under one erosion are dropped.
3. **Shape.** From the soft coverage ``a`` on the object and a one-pixel ring around it (pixels deep
   inside count as fully covered; ring values within 3× the noise level estimated from far background
   pixels count as empty): area, width and height (sums of the per-column / per-row maximum coverage,
   sub-pixel accurate under anti-aliasing), the fill ratio area/(width·height) — square 1, circle π/4,
   triangle and diamond ½ — and how far the centre of mass lies below the box centre, as a fraction of
   the height — ⅙ for the upward triangle, 0 for the others. Fixed cuts on these two numbers name the
   shape (:func:`classify_shape`); features that fit no shape of the vocabulary give no shape.
4. **Checks.** Against a caption spec: ``shape``, ``color``, ``present`` (the coloured shape), ``count``
   (exact number, and no extra objects) and, for relations, ``position`` (the relation holds along its
   dominant axis: "A left of B" ⇔ x_B − x_A > |y_B − y_A|). ``pass`` is all of them.

Images larger than :data:`WORK_SIZE` are first resized down to it (a box average when the size is a whole
multiple, antialiased bilinear otherwise); smaller than 32 is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from genreward.errors import GenrewardError
from genreward.world import shapes as W

WORK_SIZE = 64
"""Longest side the verifier works at; larger images are resized down to it."""

MIN_SIZE = 32

# Shape rule on (fill ratio, centre-of-mass offset below the box centre / height). Ideal values: square
# (1, 0), circle (π/4, 0), diamond (½, 0), upward triangle (½, ⅙). Anti-aliasing of 7-pixel objects lifts
# the pointed shapes' fill to ≤ 0.67 and Gaussian noise σ = 0.05 lowers the square's to ≥ 0.90 and the
# circle's to ≥ 0.74 (measured on 900 rendered scenes, ≈1,650 objects, per setting), so the cuts sit between those ranges.
SQUARE_MIN_FILL = 0.86
CIRCLE_MIN_FILL = 0.705
POINTED_MIN_FILL = 0.40
TRIANGLE_MIN_OFFSET = 0.065
MAX_ASPECT = 1.35  # world shapes have square bounding boxes; wider or taller blobs get no shape
EASYVQA_SHAPES: dict[str, str | None] = {"square": "rectangle", "circle": "circle", "triangle": "triangle", "diamond": None}
"""World shape → easy-vqa shape (easy-vqa has rectangles of any aspect and no diamonds)."""
EASYVQA_SQUARE_MIN_FILL = 0.93
"""easy-vqa draws small circles with little anti-aliasing (fill up to 0.867 on its train split, whose
rectangles fill ≥ 0.986); it has no noise, so its rectangle cut sits between those, set on train only."""

EASYVQA_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0)}
"""easy-vqa's shape colours, as found in its images (each colour answer's pixels are exactly these)."""


@dataclass
class Detection:
    """One object found in an image (coordinates in image units, x right, y down)."""

    color: str
    shape: str | None
    center: tuple[float, float]
    bbox: tuple[float, float, float, float]
    area: float  # soft area as a fraction of the image
    fill: float
    offset: float

    def to_dict(self) -> dict[str, Any]:
        return {"color": self.color, "shape": self.shape, "center": list(self.center), "bbox": list(self.bbox),
                "area": self.area, "fill": self.fill, "offset": self.offset}


def _working_image(image: torch.Tensor, work_size: int) -> np.ndarray:
    """``[3,H,W]`` float → ``[H',W',3]`` float64 in [0,1] with max(H', W') ≤ work_size."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise GenrewardError(f"verifier needs one float image [3,H,W] in [0,1], got {got}")
    h, w = image.shape[1:]
    if min(h, w) < MIN_SIZE:
        raise GenrewardError(f"verifier needs images of at least {MIN_SIZE}×{MIN_SIZE}, got {h}×{w}")
    x = image.detach().cpu()
    factor = -(-max(h, w) // work_size)
    if max(h, w) > work_size and not (h % factor == 0 and w % factor == 0):
        scale = work_size / max(h, w)
        x = F.interpolate(x.float()[None], size=(max(1, round(h * scale)), max(1, round(w * scale))),
                          mode="bilinear", antialias=True, align_corners=False)[0]
        factor = 1
    arr = np.clip(x.float().numpy().transpose(1, 2, 0).astype(np.float64), 0, 1)
    if factor > 1:  # a whole factor: exact box average
        arr = arr.reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))
    return arr


def _pixel_colors(pixels: np.ndarray, bg: np.ndarray, palette: np.ndarray, tolerance: float):
    """Per pixel: index of the best-explaining colour (−1 = background/unknown), all coverages ``[K,H,W]``
    and, per colour, the noise level of the coverage on background pixels far from any object."""
    d = palette - bg  # [K,3]
    rel = pixels - bg  # [H,W,3]
    a = np.einsum("hwc,kc->khw", rel, d) / (d * d).sum(1)[:, None, None]
    raw = a
    a = a.clip(0, 1)
    resid = np.linalg.norm(rel[None] - a[..., None] * d[:, None, None, :], axis=-1)
    cost = resid + 0.1 * (1 - a) * np.linalg.norm(d, axis=1)[:, None, None]
    best = cost.argmin(0)
    a_best = np.take_along_axis(a, best[None], 0)[0]
    r_best = np.take_along_axis(resid, best[None], 0)[0]
    label = np.where((a_best >= 0.5) & (r_best <= tolerance), best, -1)
    # Pixel noise along each colour's line, from background pixels away from any object (robust scale).
    far = ~ndimage.binary_dilation(label >= 0, iterations=2)
    noise = 1.4826 * np.median(np.abs(raw[:, far]), axis=1) if far.any() else np.zeros(len(palette))
    return label, a, noise


def _shape_features(alpha: np.ndarray) -> tuple[float, float, float, float, float, float, float]:
    """(area, width, height, x centre, y centre, fill, offset) of a soft coverage map, in pixels."""
    area = alpha.sum()
    col, row = alpha.max(0), alpha.max(1)
    width, height = col.sum(), row.sum()
    xs, ys = np.arange(alpha.shape[1]) + 0.5, np.arange(alpha.shape[0]) + 0.5
    cx, cy = (xs * col).sum() / width, (ys * row).sum() / height
    mass_y = (ys[:, None] * alpha).sum() / area
    return area, width, height, cx, cy, area / (width * height), (mass_y - cy) / height


def classify_shape(fill: float, offset: float, aspect: float = 1.0, max_aspect: float | None = MAX_ASPECT,
                   square_min_fill: float = SQUARE_MIN_FILL) -> str | None:
    """World shape name from the soft features, or None when they match no shape of the vocabulary."""
    if max_aspect is not None and not 1 / max_aspect <= aspect <= max_aspect:
        return None
    if fill >= CIRCLE_MIN_FILL:
        if abs(offset) >= TRIANGLE_MIN_OFFSET:
            return None
        return "square" if fill >= square_min_fill else "circle"
    if fill >= POINTED_MIN_FILL:
        if offset >= TRIANGLE_MIN_OFFSET:
            return "triangle"
        return "diamond" if abs(offset) < TRIANGLE_MIN_OFFSET else None
    return None


def detect(image: torch.Tensor, palette: dict[str, tuple[int, int, int]] | None = None,
           background: tuple[int, int, int] | str = W.BACKGROUND,
           shape_names: dict[str, str | None] | None = None, max_aspect: float | None = MAX_ASPECT,
           square_min_fill: float = SQUARE_MIN_FILL, work_size: int = WORK_SIZE,
           tolerance: float = 0.25, min_area: float = 0.004) -> list[Detection]:
    """All objects in one image ``[3,H,W]``. ``background`` is an RGB triple or ``"border"`` (the median
    of the border pixels, for data with varying backgrounds); ``min_area`` is a fraction of the image;
    ``shape_names`` renames world shapes (to None: not allowed); ``max_aspect`` None allows any aspect."""
    palette = W.COLORS if palette is None else palette
    img = _working_image(image, work_size)
    h, w = img.shape[:2]
    if isinstance(background, str):
        if background != "border":
            raise GenrewardError(f"background must be an RGB triple or 'border', got {background!r}")
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        bg = np.median(border, axis=0)
    else:
        bg = np.asarray(background, dtype=np.float64) / 255
    names = list(palette)
    colors = np.asarray([palette[n] for n in names], dtype=np.float64) / 255
    label, coverage, noise = _pixel_colors(img, bg, colors, tolerance)
    eight = np.ones((3, 3), dtype=bool)
    found: list[Detection] = []
    for k, name in enumerate(names):
        mask = label == k
        if not mask.any():
            continue
        comps, n = ndimage.label(mask, structure=eight)
        for j in range(1, n + 1):
            comp = comps == j
            if comp.sum() < min_area * h * w or not ndimage.binary_erosion(comp, structure=eight).any():
                continue
            # Soft coverage around the object: its pixels plus one ring, excluding other objects' pixels.
            region = ndimage.binary_dilation(comp, structure=eight) & ((label == k) | (label == -1))
            region &= ~((label == k) & ~comp)
            alpha = np.where(region, coverage[k], 0.0)
            alpha[alpha < 3 * noise[k]] = 0.0  # edge coverage indistinguishable from noise
            alpha[ndimage.binary_erosion(comp, structure=eight)] = 1.0  # deep inside: fully covered, noise or not
            area, width, height, cx, cy, fill, offset = _shape_features(alpha)
            found.append(Detection(
                color=name, shape=_shape_name(classify_shape(fill, offset, width / height, max_aspect, square_min_fill), shape_names),
                center=(float(cx / w), float(cy / h)),
                bbox=(float((cx - width / 2) / w), float((cy - height / 2) / h),
                      float((cx + width / 2) / w), float((cy + height / 2) / h)),
                area=float(area / (h * w)), fill=float(fill), offset=float(offset)))
    return found


def _shape_name(shape: str | None, names: dict[str, str | None] | None) -> str | None:
    return shape if names is None or shape is None else names.get(shape)


# ---------------------------------------------------------------- captions → specs

_COLOR_RE = "|".join(W.COLORS)
_SHAPE_RE = "|".join(W.SHAPES)
_REL_RE = "|".join(W.RELATIONS).replace(" ", r"\s+")
_SINGLE = re.compile(rf"a\s+({_COLOR_RE})\s+({_SHAPE_RE})")
_COUNT = re.compile(rf"({'|'.join(W.COUNT_WORDS.values())})\s+({_COLOR_RE})\s+({_SHAPE_RE})s")
_RELATION = re.compile(rf"a\s+({_COLOR_RE})\s+({_SHAPE_RE})\s+({_REL_RE})\s+a\s+({_COLOR_RE})\s+({_SHAPE_RE})")


def parse_caption(caption: str) -> dict[str, Any]:
    """The spec of a caption in the world's grammar (case, extra spaces and a final period are ignored)."""
    text = " ".join(str(caption).lower().split()).rstrip(".").strip()
    if m := _SINGLE.fullmatch(text):
        return W.make_spec("single", [(m[1], m[2])])
    if m := _COUNT.fullmatch(text):
        n = {v: k for k, v in W.COUNT_WORDS.items()}[m[1]]
        return W.make_spec("count", [(m[2], m[3])], count=n)
    if (m := _RELATION.fullmatch(text)) and (m[1], m[2]) != (m[4], m[5]):
        return W.make_spec("relation", [(m[1], m[2]), (m[4], m[5])], relation=" ".join(m[3].split()))
    raise GenrewardError(
        f"caption {caption!r} is outside the shapes-world grammar "
        f"('a COLOR SHAPE', 'two|three COLOR SHAPEs', 'a COLOR SHAPE left of|right of|above|below a COLOR SHAPE'; "
        f"colours {', '.join(W.COLORS)}; shapes {', '.join(W.SHAPES)})")


# ---------------------------------------------------------------- checks

CHECKS: tuple[str, ...] = ("shape", "color", "present", "count", "position")


def check(detections: Sequence[Detection], spec: dict[str, Any]) -> dict[str, Any]:
    """Per-attribute results of a spec against detections (``position`` is None unless a relation)."""
    objs = spec["objects"]
    matches = [[d for d in detections if d.shape == o["shape"] and d.color == o["color"]] for o in objs]
    result: dict[str, Any] = {
        "shape": all(any(d.shape == o["shape"] for d in detections) for o in objs),
        "color": all(any(d.color == o["color"] for d in detections) for o in objs),
        "present": all(matches),
        "count": all(len(m) == o["count"] for m, o in zip(matches, objs))
        and len(detections) == sum(o["count"] for o in objs),
        "position": None,
    }
    if spec["type"] == "relation":
        result["position"] = any(_holds(a, b, spec["relation"]) for a in matches[0] for b in matches[1])
    applicable = [result[c] for c in CHECKS if result[c] is not None]
    result["pass"] = all(applicable)
    result["graded"] = sum(applicable) / len(applicable)
    return result


def _holds(a: Detection, b: Detection, relation: str) -> bool:
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    main, cross = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return main > abs(cross)


def score(image: torch.Tensor, spec: dict[str, Any] | str, work_size: int = WORK_SIZE) -> dict[str, Any]:
    """Verify one image ``[3,H,W]`` against a spec (or a caption, parsed): per-attribute checks, ``pass``,
    ``graded`` (mean of the applicable checks) and the detections."""
    spec = parse_caption(spec) if isinstance(spec, str) else W.validate_spec(spec)
    detections = detect(image, work_size=work_size)
    return {**check(detections, spec), "detections": [d.to_dict() for d in detections]}


def classify_easyvqa(image: torch.Tensor) -> tuple[str | None, str | None]:
    """(shape, colour) of an easy-vqa image: its largest object under easy-vqa's palette and shapes, on its
    own background (estimated from the border); (None, None) if nothing is found."""
    found = detect(image, palette=EASYVQA_COLORS, background="border", shape_names=EASYVQA_SHAPES, max_aspect=None,
                   square_min_fill=EASYVQA_SQUARE_MIN_FILL,
                   tolerance=0.35, min_area=0.002)
    if not found:
        return None, None
    best = max(found, key=lambda d: d.area)
    return best.shape, best.color
