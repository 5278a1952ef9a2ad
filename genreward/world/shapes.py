"""The shapes world: seeded scenes of coloured shapes, their captions, exact scene graphs and prompt sets.

No pretrained text-to-image model, CLIP or VLM can be downloaded here, so genreward ships a world small
enough to learn on a CPU in which every claim is measurable: each image comes with the exact scene it was
drawn from, and each caption with a structured spec that :mod:`genreward.world.verifier` checks from
pixels alone. The vocabulary is kept small and its colours far apart so a tiny model can learn it.

Coordinates are in image units: x to the right and y downwards, both in [0, 1], so one scene renders at
any resolution. Caption grammar (see :func:`caption_of`, parsed back by ``verifier.parse_caption``)::

    single    a COLOR SHAPE                          "a red circle"
    count     (two|three) COLOR SHAPEs               "two blue squares"
    relation  a COLOR SHAPE REL a COLOR SHAPE        "a red circle left of a green triangle"
              REL = left of | right of | above | below
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from genreward.errors import GenrewardError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
"""Axis-aligned shapes; the triangle points up, the diamond is a square turned by 45°."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
}
"""Colour names and their exact RGB (0–255); every pair is ≥ 100 apart and far from the background."""

BACKGROUND: tuple[int, int, int] = (20, 20, 20)
"""Plain near-black background: blending a colour into it only darkens it, so anti-aliased edges keep
their hue (the verifier relies on this)."""

CAPTION_TYPES: tuple[str, ...] = ("single", "count", "relation")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}

HELD_OUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "diamond"), ("blue", "square"), ("purple", "circle")}
)
"""(colour, shape) pairs never shown in training captions; each colour and shape still occurs otherwise."""

HELD_OUT_PAIRINGS: frozenset[tuple[frozenset[str], str]] = frozenset(
    {(frozenset({"circle", "triangle"}), "above"), (frozenset({"circle", "triangle"}), "below")}
)
"""Relation captions held out: a circle and a triangle in a vertical relation (either order)."""

# Object sizes (side of the bounding box, image units) per caption type, and layout margins.
_SIZE_RANGE = {"single": (0.34, 0.50), "count": (0.22, 0.30), "relation": (0.26, 0.36)}
_MARGIN = 0.04  # objects stay this far from the image border
_GAP = 0.08  # minimum gap between two objects' bounding boxes
_MIN_REL_DISTANCE = 0.3  # centre distance along the relation's axis
_REL_DOMINANCE = 2.0  # main-axis distance ≥ this × cross-axis distance


@dataclass
class WorldObject:
    """One drawn object: what it is and exactly where (image units)."""

    shape: str
    color: str
    center: tuple[float, float]
    size: float

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLORS[self.color]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the axis-aligned bounding box."""
        h = self.size / 2
        return (self.center[0] - h, self.center[1] - h, self.center[0] + h, self.center[1] + h)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "rgb": list(self.rgb),
                "center": [round(c, 6) for c in self.center], "size": round(self.size, 6),
                "bbox": [round(b, 6) for b in self.bbox]}


@dataclass
class Scene:
    """A scene graph plus the caption spec it was drawn for (objects are in caption order)."""

    spec: dict[str, Any]
    objects: list[WorldObject] = field(default_factory=list)
    background: tuple[int, int, int] = BACKGROUND

    @property
    def caption(self) -> str:
        return caption_of(self.spec)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able scene graph."""
        return {"caption": self.caption, "spec": self.spec, "background": list(self.background),
                "objects": [o.to_dict() for o in self.objects]}


# ---------------------------------------------------------------- specs and captions


def make_spec(caption_type: str, objects: Sequence[tuple[str, str]], count: int = 1,
              relation: str | None = None) -> dict[str, Any]:
    """The structured spec of a caption; ``objects`` are (colour, shape) pairs in caption order."""
    if caption_type == "single":
        (color, shape), = objects
        return {"type": "single", "objects": [{"shape": shape, "color": color, "count": 1}]}
    if caption_type == "count":
        (color, shape), = objects
        return {"type": "count", "objects": [{"shape": shape, "color": color, "count": int(count)}]}
    if caption_type == "relation":
        (ca, sa), (cb, sb) = objects
        return {"type": "relation", "relation": relation,
                "objects": [{"shape": sa, "color": ca, "count": 1}, {"shape": sb, "color": cb, "count": 1}]}
    raise GenrewardError(f"unknown caption type {caption_type!r}; use one of {', '.join(CAPTION_TYPES)}")


def validate_spec(spec: Any) -> dict[str, Any]:
    """Check a spec against the world's vocabulary; a spec from a prompt file that is not one is an error."""
    try:
        kind = spec["type"]
        objects = spec["objects"]
        ok = kind in CAPTION_TYPES and isinstance(objects, list) and all(
            o["shape"] in SHAPES and o["color"] in COLORS and isinstance(o["count"], int) for o in objects)
        if kind == "single":
            ok = ok and len(objects) == 1 and objects[0]["count"] == 1
        elif kind == "count":
            ok = ok and len(objects) == 1 and objects[0]["count"] in COUNT_WORDS
        elif kind == "relation":
            ok = ok and len(objects) == 2 and spec.get("relation") in RELATIONS and all(o["count"] == 1 for o in objects)
            ok = ok and (objects[0]["shape"], objects[0]["color"]) != (objects[1]["shape"], objects[1]["color"])
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise GenrewardError(f"not a shapes-world spec: {json.dumps(spec, default=str)[:200]}")
    return spec


def caption_of(spec_or_scene: dict[str, Any] | Scene) -> str:
    """The caption of a spec (or scene), in the world's grammar."""
    spec = spec_or_scene.spec if isinstance(spec_or_scene, Scene) else spec_or_scene
    objs = spec["objects"]
    if spec["type"] == "single":
        return f"a {objs[0]['color']} {objs[0]['shape']}"
    if spec["type"] == "count":
        return f"{COUNT_WORDS[objs[0]['count']]} {objs[0]['color']} {objs[0]['shape']}s"
    a, b = objs
    return f"a {a['color']} {a['shape']} {spec['relation']} a {b['color']} {b['shape']}"


def split_of(spec: dict[str, Any]) -> str:
    """``"holdout"`` if the caption uses a held-out colour–shape combo or relation pairing, else ``"train"``."""
    if any((o["color"], o["shape"]) in HELD_OUT_COMBOS for o in spec["objects"]):
        return "holdout"
    if spec["type"] == "relation":
        shapes = frozenset(o["shape"] for o in spec["objects"])
        if (shapes, spec["relation"]) in HELD_OUT_PAIRINGS:
            return "holdout"
    return "train"


def all_specs(caption_types: Sequence[str] = CAPTION_TYPES) -> list[dict[str, Any]]:
    """Every caption the grammar can produce, in a fixed order."""
    combos = [(c, s) for s in SHAPES for c in COLORS]
    specs = []
    for kind in caption_types:
        if kind == "single":
            specs += [make_spec("single", [cs]) for cs in combos]
        elif kind == "count":
            specs += [make_spec("count", [cs], count=n) for n in COUNT_WORDS for cs in combos]
        elif kind == "relation":
            specs += [make_spec("relation", [a, b], relation=r) for r in RELATIONS for a in combos for b in combos if a != b]
        else:
            raise GenrewardError(f"unknown caption type {kind!r}; use one of {', '.join(CAPTION_TYPES)}")
    return specs


def negative_spec(spec: dict[str, Any], kind: str, rng: np.random.Generator) -> dict[str, Any]:
    """A spec that the scene of ``spec`` does not satisfy: ``color`` (one object recoloured), ``count``
    (a different number of the object; single ↔ count) or ``relation`` (the relation reversed)."""
    new = json.loads(json.dumps(spec))
    if kind == "color":
        i = int(rng.integers(len(new["objects"])))
        obj = new["objects"][i]
        # Another colour, and never the other object's own (colour, shape): that caption would be invalid.
        taken = {o["color"] for j, o in enumerate(new["objects"]) if j != i and o["shape"] == obj["shape"]}
        obj["color"] = str(rng.choice([c for c in COLORS if c != obj["color"] and c not in taken]))
        return new
    if kind == "count":
        obj = new["objects"][0]
        if new["type"] == "relation":  # "two red circles" where only one is drawn
            return make_spec("count", [(obj["color"], obj["shape"])], count=int(rng.choice(list(COUNT_WORDS))))
        options = [n for n in (1, *COUNT_WORDS) if n != obj["count"]]
        n = int(rng.choice(options))
        return make_spec("single" if n == 1 else "count", [(obj["color"], obj["shape"])], count=n)
    if kind == "relation":
        if new["type"] != "relation":
            raise GenrewardError("a relation negative needs a relation spec")
        new["relation"] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[new["relation"]]
        return new
    raise GenrewardError(f"unknown negative kind {kind!r}; use color, count or relation")


# ---------------------------------------------------------------- scenes


def _random_spec(rng: np.random.Generator, caption_type: str) -> dict[str, Any]:
    colors, shapes = list(COLORS), list(SHAPES)
    pick = lambda: (str(rng.choice(colors)), str(rng.choice(shapes)))  # noqa: E731
    if caption_type == "single":
        return make_spec("single", [pick()])
    if caption_type == "count":
        return make_spec("count", [pick()], count=int(rng.choice(list(COUNT_WORDS))))
    if caption_type == "relation":
        a = pick()
        b = pick()
        while b == a:
            b = pick()
        return make_spec("relation", [a, b], relation=str(rng.choice(list(RELATIONS))))
    raise GenrewardError(f"unknown caption type {caption_type!r}; use one of {', '.join(CAPTION_TYPES)}")


def _apart(a: WorldObject, b: WorldObject) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return bx0 - ax1 >= _GAP or ax0 - bx1 >= _GAP or by0 - ay1 >= _GAP or ay0 - by1 >= _GAP


def _relation_holds(a: WorldObject, b: WorldObject, relation: str, dominance: float, min_distance: float) -> bool:
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    main, cross = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return main >= min_distance and main >= dominance * abs(cross)


def layout(spec: dict[str, Any], rng: np.random.Generator, max_tries: int = 10_000) -> Scene:
    """Place the spec's objects at random sizes and positions (non-overlapping, relation unambiguous)."""
    validate_spec(spec)
    lo, hi = _SIZE_RANGE[spec["type"]]
    wanted = [(o["shape"], o["color"]) for o in spec["objects"] for _ in range(o["count"])]
    for _ in range(max_tries):
        objects: list[WorldObject] = []
        for shape, color in wanted:
            size = float(rng.uniform(lo, hi))
            h = size / 2 + _MARGIN
            obj = WorldObject(shape, color, (float(rng.uniform(h, 1 - h)), float(rng.uniform(h, 1 - h))), size)
            if not all(_apart(obj, other) for other in objects):
                break
            objects.append(obj)
        else:
            if spec["type"] != "relation" or _relation_holds(objects[0], objects[1], spec["relation"],
                                                             _REL_DOMINANCE, _MIN_REL_DISTANCE):
                return Scene(spec=spec, objects=objects)
    raise RuntimeError(f"could not lay out {caption_of(spec)!r} in {max_tries} tries")


def sample_scene(rng: np.random.Generator, caption_type: str, split: str | None = None) -> Scene:
    """A random scene of one caption type; ``split`` (``train``/``holdout``) restricts its caption."""
    if split not in (None, "all", "train", "holdout"):
        raise GenrewardError(f"split must be train, holdout or all, got {split!r}")
    while True:
        spec = _random_spec(rng, caption_type)
        if split in (None, "all") or split_of(spec) == split:
            return layout(spec, rng)


# ---------------------------------------------------------------- rendering


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Whether offsets (dx, dy) from the centre fall inside a shape whose bounding box is 2·half wide."""
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (dy <= half) & (2 * np.abs(dx) <= dy + half)
    raise GenrewardError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")


def coverage(obj: WorldObject, size: int, antialias: bool = True, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel ``[H,W]`` covered by the object (0/1 without anti-aliasing): the mean of
    ``supersample²`` point samples per pixel, evaluated only inside the object's box (fast at any size)."""
    s = supersample if antialias else 1
    out = np.zeros((size, size), dtype=np.float32)
    x0, y0, x1, y1 = obj.bbox
    c0, r0 = max(0, int(np.floor(x0 * size)) - 1), max(0, int(np.floor(y0 * size)) - 1)
    c1, r1 = min(size, int(np.ceil(x1 * size)) + 1), min(size, int(np.ceil(y1 * size)) + 1)
    xs = (np.arange(c0 * s, c1 * s) + 0.5) / (size * s) - obj.center[0]
    ys = (np.arange(r0 * s, r1 * s) + 0.5) / (size * s) - obj.center[1]
    inside = _inside(obj.shape, xs[None, :], ys[:, None], obj.size / 2).astype(np.float32)
    out[r0:r1, c0:c1] = inside.reshape(r1 - r0, s, c1 - c0, s).mean(axis=(1, 3))
    return out


def render(scene: Scene, size: int = 32, antialias: bool = True, noise: float = 0.0,
           rng: np.random.Generator | None = None) -> torch.Tensor:
    """The scene as a float image ``[3,H,W]`` in [0,1] (H = W = ``size``); ``noise`` is the σ of added
    Gaussian pixel noise (in [0,1] units), drawn from ``rng``."""
    if size < 8:
        raise GenrewardError(f"render size must be at least 8, got {size}")
    image = np.empty((3, size, size), dtype=np.float32)
    image[:] = (np.asarray(scene.background, dtype=np.float32) / 255)[:, None, None]
    for obj in scene.objects:
        alpha = coverage(obj, size, antialias)[None]
        color = (np.asarray(obj.rgb, dtype=np.float32) / 255)[:, None, None]
        image = image * (1 - alpha) + color * alpha
    if noise > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        image = image + rng.standard_normal(image.shape).astype(np.float32) * noise
    return torch.from_numpy(np.clip(image, 0, 1).astype(np.float32))


# ---------------------------------------------------------------- datasets and prompt sets


@dataclass
class Sample:
    """One dataset item: image ``[3,H,W]``, caption, spec and the scene it was drawn from."""

    image: torch.Tensor
    caption: str
    spec: dict[str, Any]
    scene: Scene


def sample_at(index: int, seed: int = 0, size: int = 32, caption_types: Sequence[str] = CAPTION_TYPES,
              split: str | None = "train", antialias: bool = True, noise: float = 0.0) -> Sample:
    """Item ``index`` of the dataset of ``seed``: drawn from its own generator, so any item can be made
    alone and the same (seed, index) always gives the same image and caption. Caption types cycle."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, caption_types[index % len(caption_types)], split)
    image = render(scene, size, antialias, noise, rng)
    return Sample(image=image, caption=scene.caption, spec=scene.spec, scene=scene)


def dataset(n: int, seed: int = 0, size: int = 32, caption_types: Sequence[str] = CAPTION_TYPES,
            split: str | None = "train", antialias: bool = True, noise: float = 0.0, start: int = 0) -> Iterator[Sample]:
    """Yield items ``start … start+n-1`` of the seeded dataset (see :func:`sample_at`)."""
    for i in range(start, start + n):
        yield sample_at(i, seed, size, caption_types, split, antialias, noise)


def prompt_rows(split: str) -> list[dict[str, Any]]:
    """Rows of a prompt set: every caption of ``split`` with its spec as metadata."""
    return [{"prompt": caption_of(s), "type": s["type"], "split": split, "spec": s}
            for s in all_specs() if split_of(s) == split]


def write_prompt_sets(out_dir: str | Path) -> dict[str, Any]:
    """Write ``shapes_train.jsonl`` and ``shapes_holdout.jsonl``; returns paths and counts per type."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    for split in ("train", "holdout"):
        rows = prompt_rows(split)
        path = out / f"shapes_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        counts = {k: sum(r["type"] == k for r in rows) for k in CAPTION_TYPES}
        report[split] = {"path": str(path), "n": len(rows), **counts}
    return report


def main(argv: list[str] | None = None) -> None:
    from genreward.prompts import PROMPTS_DIR

    parser = argparse.ArgumentParser(description="shapes world: write prompt sets or a preview grid")
    parser.add_argument("--write-prompts", action="store_true", help="write prompts/shapes_{train,holdout}.jsonl")
    parser.add_argument("--out-dir", default=str(PROMPTS_DIR))
    parser.add_argument("--preview", metavar="PNG", help="write a grid of sample images to this PNG")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.write_prompts:
        print(json.dumps(write_prompt_sets(args.out_dir)))
    if args.preview:
        from genreward.images import save_png

        items = list(dataset(args.n, args.seed, args.size, split=None))
        cols = 8
        rows = (len(items) + cols - 1) // cols
        grid = torch.ones(3, rows * (args.size + 2), cols * (args.size + 2))
        for k, it in enumerate(items):
            r, c = divmod(k, cols)
            grid[:, r * (args.size + 2):r * (args.size + 2) + args.size, c * (args.size + 2):c * (args.size + 2) + args.size] = it.image
        save_png(grid, args.preview)
        for k, it in enumerate(items):
            print(k, it.caption)
    if not args.write_prompts and not args.preview:
        parser.error("nothing to do: pass --write-prompts and/or --preview PNG")


if __name__ == "__main__":
    main()
