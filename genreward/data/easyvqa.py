"""easy-vqa (64×64 shape images, one shape each) → pointwise judge rows ``{"prompt", "image", "label"}``.

The yes/no questions become judge rows directly. Optionally the open questions ("what color is the
shape?" → "teal") become auxiliary yes/no rows — one true and one false statement each — so the judge's
single yes/no head gets dense supervision on shape and colour, which the yes/no questions alone (many
answerable from the question prior) give only sparsely.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from genreward.data.judge_rows import majority_baseline
from genreward.errors import GenrewardError

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


def _split(split: str) -> tuple[list[str], list[str], list[str]]:
    """(questions, answers, image paths) of the ``train`` or ``test`` split."""
    try:
        import easy_vqa
    except ImportError:
        raise GenrewardError("easy-vqa is not installed; run: pip install easy-vqa") from None
    if split == "train":
        qs, ans, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        qs, ans, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise GenrewardError(f"easy-vqa split must be 'train' or 'test', got {split!r}")
    return list(qs), list(ans), [paths[i] for i in ids]


def yes_no_rows(split: str) -> list[dict]:
    """The split's yes/no questions as judge rows."""
    return [{"prompt": q, "image": p, "label": a} for q, a, p in zip(*_split(split)) if a in ("yes", "no")]


def auxiliary_rows(split: str, seed: int = 0) -> list[dict]:
    """Open shape/colour questions turned into one true and one false yes/no statement per image."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for _, answer, path in zip(*_split(split)):
        if answer in SHAPES:
            kind, choices, text = "shape", SHAPES, "is the shape a {}?"
        elif answer in COLORS:
            kind, choices, text = "color", COLORS, "is the shape {}?"
        else:
            continue
        if (path, kind) in seen:
            continue
        seen.add((path, kind))
        wrong = rng.choice([c for c in choices if c != answer])
        rows.append({"prompt": text.format(answer), "image": path, "label": "yes"})
        rows.append({"prompt": text.format(wrong), "image": path, "label": "no"})
    return rows


def open_rows(split: str) -> list[dict]:
    """The open shape/colour questions as free-form answer rows (``answer`` instead of ``label``): the judge
    learns to name what it sees, which teaches it to read the image before it learns the yes/no binding."""
    return [{"prompt": q, "image": p, "answer": a} for q, a, p in zip(*_split(split)) if a not in ("yes", "no")]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def convert(out_dir: str | Path, auxiliary: bool = False, seed: int = 0, open_answers: bool = False) -> dict:
    """Write ``train.jsonl`` (yes/no rows, plus auxiliary yes/no rows and/or free-form answer rows if asked,
    shuffled) and ``test.jsonl`` (yes/no rows only); returns paths, counts and the question-prior
    ``majority_baseline``."""
    out = Path(out_dir)
    train = yes_no_rows("train")
    test = yes_no_rows("test")
    baseline = majority_baseline([dict(r, label=int(r["label"] == "yes")) for r in train],
                                 [dict(r, label=int(r["label"] == "yes")) for r in test])
    rows = train + (auxiliary_rows("train", seed) if auxiliary else []) + (open_rows("train") if open_answers else [])
    random.Random(seed).shuffle(rows)
    return {
        "train": str(write_jsonl(rows, out / "train.jsonl")),
        "test": str(write_jsonl(test, out / "test.jsonl")),
        "n_train": len(rows), "n_test": len(test), "majority_baseline": baseline,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--auxiliary", action="store_true", help="add yes/no rows from the open shape/colour questions")
    parser.add_argument("--open", action="store_true", help="add the open shape/colour questions as free-form answer rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(convert(args.out_dir, args.auxiliary, args.seed, args.open)))


if __name__ == "__main__":
    main()
