"""The shapes world: generator ↔ verifier agreement, negatives, caption grammar, the reward, determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genreward.errors import GenrewardError
from genreward.world import shapes as W
from genreward.world import verifier as V

N = 500  # scenes per caption type in each agreement / negative check
NOISE_SIGMA = 0.05  # the tolerance docs/world.md states


def _agreement(caption_type: str, size: int = 32, noise: float = 0.0, upscale: int | None = None, seed: int = 11) -> float:
    samples = [W.sample_at(i, seed=seed, size=size, caption_types=(caption_type,), split=None, noise=noise) for i in range(N)]
    images = torch.stack([s.image for s in samples])
    if upscale:  # as a generator working at a higher resolution would draw it (bicubic overshoot clamped)
        images = F.interpolate(images, size=(upscale, upscale), mode="bicubic", align_corners=False).clamp(0, 1)
    return sum(V.score(image, s.spec)["pass"] for image, s in zip(images, samples)) / N


@pytest.mark.parametrize("caption_type", W.CAPTION_TYPES)
def test_agreement_clean_and_noisy_32(caption_type):
    assert _agreement(caption_type) >= 0.99
    assert _agreement(caption_type, noise=NOISE_SIGMA) >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("caption_type", W.CAPTION_TYPES)
def test_agreement_64_and_upscaled_256(caption_type):
    assert _agreement(caption_type, size=64, seed=12) >= 0.99
    assert _agreement(caption_type, upscale=256, seed=13) >= 0.99


@pytest.mark.parametrize("kind,caption_type", [("color", "single"), ("color", "count"), ("color", "relation"),
                                               ("count", "single"), ("count", "count"), ("count", "relation"),
                                               ("relation", "relation")])
def test_negative_captions_rejected(kind, caption_type):
    rng = np.random.default_rng(5)
    rejected = 0
    for i in range(N):
        s = W.sample_at(i, seed=21, caption_types=(caption_type,), split=None)
        negative = W.negative_spec(s.spec, kind, rng)
        assert negative != s.spec and W.validate_spec(negative)
        rejected += not V.score(s.image, negative)["pass"]
    assert rejected / N >= 0.99


def test_verifier_fails_on_blank_and_wrong_images():
    blank = W.render(W.Scene(spec=W.make_spec("single", [("red", "circle")]), objects=[]))
    result = V.score(blank, "a red circle")
    assert not result["pass"] and result["detections"] == [] and result["graded"] == 0
    circle = W.render(W.layout(W.make_spec("single", [("red", "circle")]), np.random.default_rng(0)))
    assert V.score(circle, "a red circle")["pass"]
    square = V.score(circle, "a red square")
    assert not square["pass"] and square["color"] and not square["shape"]


def test_detections_match_scene_graph():
    s = W.sample_at(3, seed=4, size=64, caption_types=("relation",), split=None)
    found = V.detect(s.image)
    assert len(found) == 2
    for obj in s.scene.objects:
        d = min(found, key=lambda d: math.dist(d.center, obj.center))
        assert (d.shape, d.color) == (obj.shape, obj.color)
        assert math.dist(d.center, obj.center) < 0.03
        assert abs(d.bbox[2] - d.bbox[0] - obj.size) < 0.06


def test_caption_parser_round_trips_every_caption():
    specs = W.all_specs()
    assert len(specs) == 24 + 48 + 4 * 24 * 23
    for spec in specs:
        caption = W.caption_of(spec)
        assert V.parse_caption(caption) == spec
    assert V.parse_caption("  Two  BLUE squares. ") == W.make_spec("count", [("blue", "square")], count=2)


@pytest.mark.parametrize("caption", ["a pink circle", "four red circles", "a red circle near a blue square",
                                     "a red circle left of a red circle", "two red circle", "a red circle and"])
def test_out_of_grammar_caption_is_one_line_error(caption):
    with pytest.raises(GenrewardError) as err:
        V.parse_caption(caption)
    assert "\n" not in str(err.value) and "outside the shapes-world grammar" in str(err.value)


def test_verifier_reward_with_and_without_metadata():
    from genreward.rewards import build

    samples = [W.sample_at(i, seed=31, split=None) for i in range(6)]
    images = torch.stack([s.image for s in samples])
    prompts = [s.caption for s in samples]
    reward = build("verifier")
    assert reward.name == "verifier" and not reward.differentiable
    plain = reward(images, prompts)
    assert plain.scores.tolist() == [1.0] * 6
    assert set(plain.details) >= {"pass", "graded", "shape", "color", "present", "count", "position", "n_objects"}
    position = plain.details["position"]
    for s, p in zip(samples, position.tolist()):
        assert math.isnan(p) if s.spec["type"] != "relation" else p == 1.0

    # The spec in metadata wins over the prompt text: wrong specs make the same images fail.
    rng = np.random.default_rng(0)
    wrong = [{"spec": W.negative_spec(s.spec, "color", rng)} for s in samples]
    failed = reward(images, prompts, metadata=wrong)
    assert failed.scores.tolist() == [0.0] * 6
    graded = build("verifier", graded=True)(images, prompts, metadata=wrong)
    assert all(0.0 < g < 1.0 for g in graded.scores.tolist())
    # Metadata that is itself a spec, and the shipped prompt-set rows, both work.
    assert reward(images, prompts, metadata=[s.spec for s in samples]).scores.tolist() == [1.0] * 6
    rows = W.prompt_rows("train")[:2]
    meta = [{k: v for k, v in r.items() if k != "prompt"} for r in rows]
    imgs = torch.stack([W.render(W.layout(r["spec"], np.random.default_rng(1))) for r in rows])
    assert reward(imgs, ["ignored text"] * 2, metadata=meta).scores.tolist() == [1.0, 1.0]


def test_verifier_verdicts_name_failed_checks_and_what_was_seen(tmp_path):
    from genreward.evaluation import score_images
    from genreward.gallery import write_gallery
    from genreward.rewards import build

    spec = {"type": "count", "objects": [{"shape": "circle", "color": "red", "count": 2}]}
    image = W.render(W.layout(spec, np.random.default_rng(3)))
    reward = build("verifier")
    ok = reward(image[None], ["two red circles"])
    assert ok.verdicts == ["pass · saw 2 red circles"]
    wrong = reward(image[None], ["three red circles"])
    assert wrong.verdicts == ["fail: count · saw 2 red circles"]
    blank = reward(torch.zeros(1, 3, 32, 32), ["a blue square"])
    assert blank.verdicts[0].startswith("fail: shape, color, present, count") and blank.verdicts[0].endswith("saw nothing")
    from genreward.world.reward import verdict  # detections the verifier could not name still print

    unnamed = {"pass": False, "shape": False, "color": True, "present": False, "count": False, "position": None,
               "detections": [{"color": "red", "shape": None}, {"color": None, "shape": "circle"}]}
    assert verdict(unnamed) == "fail: shape, present, count · saw 1 red blob, 1 unknown-colour circle"

    # Evaluation keeps the verdicts per image and the gallery prints them under the image.
    verdicts: dict = {}
    score_images([reward], image[None].repeat(2, 1, 1, 1), ["two red circles", "three red circles"], [{}, {}], verdicts)
    assert verdicts == {"verifier": ["pass · saw 2 red circles", "fail: count · saw 2 red circles"]}
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    from genreward.images import save_png

    save_png(image, run / "images" / "a.png")
    rec = {"prompt": "three red circles", "image": "images/a.png", "rewards": {"verifier": 0.0},
           "verdicts": {"verifier": "fail: count · saw 2 red circles"}}
    (run / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    page = write_gallery(run).read_text()
    assert '<span class="verdict">fail: count · saw 2 red circles</span>' in page


def test_verifier_reward_errors_are_one_line():
    from genreward.rewards import build

    reward = build("verifier")
    with pytest.raises(GenrewardError, match="outside the shapes-world grammar"):
        reward(torch.zeros(1, 3, 32, 32), ["a photo of a cat"])
    with pytest.raises(GenrewardError, match="at least 32"):
        reward(torch.zeros(1, 3, 16, 16), ["a red circle"])
    with pytest.raises(GenrewardError, match="not a shapes-world spec"):
        reward(torch.zeros(1, 3, 32, 32), ["a red circle"], metadata=[{"spec": {"type": "single", "objects": []}}])
    with pytest.raises(GenrewardError, match="no option"):
        build("verifier", strict=True)


def test_determinism_same_seed_same_data():
    a = [W.sample_at(i, seed=7, noise=0.05) for i in range(12)]
    b = list(W.dataset(12, seed=7, noise=0.05))
    c = list(W.dataset(12, seed=8, noise=0.05))
    assert [x.caption for x in a] == [x.caption for x in b]
    assert all(torch.equal(x.image, y.image) for x, y in zip(a, b))
    assert [x.scene.to_dict() for x in a] == [x.scene.to_dict() for x in b]
    assert [x.caption for x in a] != [x.caption for x in c]
    assert [x.spec["type"] for x in a] == list(W.CAPTION_TYPES) * 4
    json.dumps(a[0].scene.to_dict())  # the scene graph is JSON-able


def test_render_contract_and_antialiasing():
    s = W.sample_at(0, seed=1, caption_types=("single",), split=None)
    img = W.render(s.scene, 64)
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    hard = W.render(s.scene, 64, antialias=False)
    palette = {tuple(round(v * 255) for v in px) for px in hard.permute(1, 2, 0).reshape(-1, 3).tolist()}
    assert palette == {W.BACKGROUND, W.COLORS[s.scene.objects[0].color]}
    assert len({tuple(px) for px in img.permute(1, 2, 0).reshape(-1, 3).tolist()}) > 2  # blended edges
    obj = s.scene.objects[0]
    cx, cy = (int(obj.center[0] * 64), int(obj.center[1] * 64 + obj.size * 64 / 4))
    assert torch.allclose(img[:, cy, cx], torch.tensor(obj.rgb) / 255)


def test_splits_and_shipped_prompt_sets(tmp_path):
    from genreward.prompts import load_prompt_set

    for split in ("train", "holdout"):
        rows = W.prompt_rows(split)
        assert all(W.split_of(r["spec"]) == split for r in rows)
    held = W.prompt_rows("holdout")
    assert any((o["color"], o["shape"]) in W.HELD_OUT_COMBOS for r in held for o in r["spec"]["objects"])
    assert not any((o["color"], o["shape"]) in W.HELD_OUT_COMBOS for r in W.prompt_rows("train") for o in r["spec"]["objects"])
    for i in range(40):  # training data never shows a held-out caption, holdout data only those
        assert W.split_of(W.sample_at(i, seed=2).spec) == "train"
        assert W.split_of(W.sample_at(i, seed=2, split="holdout").spec) == "holdout"
    written = W.write_prompt_sets(tmp_path)
    for split in ("train", "holdout"):
        shipped = load_prompt_set(f"shapes_{split}")
        fresh = load_prompt_set(written[split]["path"])
        assert [(i.prompt, i.metadata) for i in shipped] == [(i.prompt, i.metadata) for i in fresh]
        assert all(V.parse_caption(i.prompt) == i.metadata["spec"] for i in shipped)


def test_easyvqa_agreement_on_real_test_images():
    pytest.importorskip("easy_vqa")
    from genreward.world.easyvqa import agreement

    result = agreement("test", limit=300)
    assert result["n_shape"] > 200 and result["n_color"] > 200
    assert result["shape_agreement"] >= 0.98 and result["color_agreement"] >= 0.98
