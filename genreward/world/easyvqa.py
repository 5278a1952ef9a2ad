"""The verifier on easy-vqa (real data this project did not write): agreement with easy-vqa's answers.

easy-vqa draws one circle, rectangle or triangle in one of 8 colours on a lightly tinted 64×64
background. :func:`genreward.world.verifier.classify_easyvqa` reads shape and colour from the pixels;
here every image whose open questions state its shape ("what shape is present?") and/or colour
("what color is the shape?") is compared with those answers. Reading easy-vqa goes through
:mod:`genreward.data.easyvqa`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from genreward.data import easyvqa as E
from genreward.images import load_images
from genreward.world.verifier import classify_easyvqa


def answers(split: str) -> dict[str, dict[str, str]]:
    """Image path → {"shape": …, "color": …} from the split's open questions (either may be missing)."""
    out: dict[str, dict[str, str]] = {}
    for _, answer, path in zip(*E._split(split)):
        if answer in E.SHAPES:
            out.setdefault(path, {})["shape"] = answer
        elif answer in E.COLORS:
            out.setdefault(path, {})["color"] = answer
    return out


def agreement(split: str = "test", limit: int | None = None) -> dict[str, Any]:
    """Fraction of images whose verified shape / colour equals easy-vqa's answer, with counts and the
    confusions (``"truth→read"``: n) of the disagreements."""
    truth = answers(split)
    paths = sorted(truth)[:limit] if limit else sorted(truth)
    hits = {"shape": 0, "color": 0, "both": 0}
    totals = {"shape": 0, "color": 0, "both": 0}
    confusions: dict[str, int] = {}
    for path in paths:
        shape, color = classify_easyvqa(load_images([path])[0])
        got = {"shape": shape, "color": color}
        known = truth[path]
        for key in ("shape", "color"):
            if key in known:
                totals[key] += 1
                hits[key] += got[key] == known[key]
                if got[key] != known[key]:
                    name = f"{key}:{known[key]}→{got[key]}"
                    confusions[name] = confusions.get(name, 0) + 1
        if len(known) == 2:
            totals["both"] += 1
            hits["both"] += got == known
    return {"split": split, "images": len(paths),
            **{f"{k}_agreement": hits[k] / totals[k] if totals[k] else None for k in totals},
            **{f"n_{k}": totals[k] for k in totals},
            "confusions": dict(sorted(confusions.items(), key=lambda kv: -kv[1]))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="verifier vs easy-vqa's own shape/colour answers")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(agreement(args.split, args.limit), indent=1))


if __name__ == "__main__":
    main()
