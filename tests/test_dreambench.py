"""DreamBench-style evaluation (docs/algorithms/rpo_lambda_harmonic.md §9, §11 item 9), subject folders and bad input."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from genreward.cli import main
from genreward.dreambench import (
    LIVE_PROMPTS,
    OBJECT_PROMPTS,
    ClipTextAlignment,
    ReferenceSimilarity,
    aggregate,
    discover_subjects,
    load_dino,
    load_reference_images,
    load_subject,
    write_skimage_subject,
)
from genreward.errors import GenrewardError
from genreward.images import save_png


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, 2 threads per process thrash (see OFFLINE-NOTES)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _photos(folder: Path, n: int, size=(32, 32), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, *size, generator=gen)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        save_png(images[i], folder / f"img{i}.png")
    return images


def _yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------ §11 item 9


def test_spec11_9_generated_equal_to_reference_gives_dino_and_clip_i_one(tmp_path, capsys):
    root, gen = tmp_path / "subjects", tmp_path / "generated"
    for name, seed in (("dog", 1), ("teapot", 2)):
        ref = _photos(root / name, 1, seed=seed)[0]
        for i in range(2):
            for j in range(2):
                save_png(ref, gen / name / f"p{i:04d}_s{j:02d}.png")
    cfg = _yaml(tmp_path / "db.yaml", {
        "output_dir": str(tmp_path / "out"),
        "model": {"device": "cpu"},
        "dreambench": {"root": str(root), "generated": str(gen), "prompts_limit": 2, "images_per_prompt": 2,
                       "dino_model": "tiny:dino", "clip_model": "tiny:clip"},
    })
    assert main(["eval", str(cfg)]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dino"] == pytest.approx(1.0, abs=1e-5)
    assert summary["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= summary["clip_t"] <= 1.0
    subjects = json.loads((out / "subjects.json").read_text())
    assert set(subjects) == {"dog", "teapot"} and subjects["dog"]["images"] == 4
    assert "| **(overall)** |" in (out / "summary.md").read_text()
    assert len((out / "per_prompt.csv").read_text().strip().splitlines()) == 1 + 4
    html = (out / "gallery.html").read_text()
    assert "references/images/dog_r00.png" in html and "dog/images/p0000_s00.png" in html
    assert "dog: a sks dog in the jungle" in html


def test_spec11_9_metric_objects_on_identical_images():
    from genreward.models.clip import load_clip

    ref = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    gen = ref.repeat(4, 1, 1, 1)
    for name, emb in (("dino", load_dino("tiny:dino")), ("clip_i", load_clip("tiny:clip"))):
        scores = ReferenceSimilarity(name, emb, ref)(gen, ["p"] * 4).scores
        torch.testing.assert_close(scores, torch.ones(4), atol=1e-5, rtol=0)
    other = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(4))
    assert ReferenceSimilarity("dino", load_dino("tiny:dino"), ref)(other, ["p"] * 2).scores.max() < 0.999


# ------------------------------------------------------------------------------------------ protocol


def test_averaging_is_images_then_prompts_then_subjects():
    def rec(i, dino):
        return {"prompt_index": i, "prompt": f"p{i}", "rewards": {"dino": dino, "clip_i": dino, "clip_t": 0.0}}

    # subject a: prompt 0 has one image (1.0), prompt 1 three images (0.0) → prompt means 1, 0 → subject 0.5
    # subject b: one prompt, one image 0.2 → subject 0.2;  overall = mean of subjects = 0.35 (not the image mean)
    per = {"a": [rec(0, 1.0), rec(1, 0.0), rec(1, 0.0), rec(1, 0.0)], "b": [rec(0, 0.2)]}
    prompts, subjects, overall = aggregate(per)
    assert [p["dino"] for p in prompts] == [1.0, 0.0, 0.2]
    assert subjects[0]["dino"] == pytest.approx(0.5) and subjects[1]["dino"] == pytest.approx(0.2)
    assert overall["dino"] == pytest.approx(0.35)


def test_clip_t_removes_identifier_and_clamps_at_zero():
    from genreward.models.clip import load_clip

    clip = load_clip("tiny:clip")
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    metric = ClipTextAlignment(clip, "sks")
    with_id = metric(images, ["a sks dog"] * 6).scores
    plain = torch.nn.functional.normalize(clip.encode_text(["a dog"]), dim=-1)
    cos = (clip.embed_images(images) * plain).sum(-1)
    torch.testing.assert_close(with_id, cos.clamp(min=0), atol=1e-5, rtol=1e-5)
    assert torch.all(with_id >= 0)


def test_dreambench_prompt_lists_and_subject_table(tmp_path):
    assert len(OBJECT_PROMPTS) == 25 and len(LIVE_PROMPTS) == 25 and len(set(LIVE_PROMPTS)) == 25
    _photos(tmp_path / "dog2", 2)
    _photos(tmp_path / "shiny_sneaker", 2)
    _photos(tmp_path / "my_mug3", 2)
    (tmp_path / "empty_dir").mkdir()
    subjects = {s.name: s for s in discover_subjects(tmp_path)}
    assert set(subjects) == {"dog2", "shiny_sneaker", "my_mug3"}
    assert subjects["dog2"].class_noun == "dog" and subjects["dog2"].live and subjects["dog2"].prompts == LIVE_PROMPTS
    assert subjects["shiny_sneaker"].class_noun == "sneaker" and not subjects["shiny_sneaker"].live
    assert subjects["my_mug3"].class_noun == "my mug"
    assert subjects["dog2"].prompt_texts("sks", 1) == ["a sks dog in the jungle"]


def test_subject_yaml_overrides_and_rejects_unknown_keys(tmp_path):
    _photos(tmp_path / "thing", 1)
    _yaml(tmp_path / "thing" / "subject.yaml", {"class_noun": "robot", "live": False, "prompts": ["a {identifier} {class_noun} at sea"]})
    s = load_subject(tmp_path / "thing")
    assert s.prompt_texts("zwx") == ["a zwx robot at sea"]
    _yaml(tmp_path / "thing" / "subject.yaml", {"clas_noun": "robot"})
    with pytest.raises(GenrewardError, match=r"subject.yaml: unknown key 'clas_noun'"):
        load_subject(tmp_path / "thing")


# ------------------------------------------------------------------------------------------ bad input


def test_subject_folder_without_images_names_the_folder(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no photos here")
    with pytest.raises(GenrewardError, match=r"cat holds no reference images") as err:
        load_reference_images(tmp_path / "cat")
    assert "\n" not in str(err.value)
    with pytest.raises(GenrewardError, match="subject folder not found"):
        load_reference_images(tmp_path / "missing")


def test_unreadable_image_names_the_file(tmp_path):
    _photos(tmp_path / "cat", 2)
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(GenrewardError, match=r"cannot read reference image .*broken\.jpg") as err:
        load_reference_images(tmp_path / "cat")
    assert "\n" not in str(err.value)


def test_mismatched_sizes_are_resized_with_a_warning(tmp_path, caplog):
    _photos(tmp_path / "cat", 2, size=(32, 32))
    save_png(torch.rand(3, 40, 24), tmp_path / "cat" / "img9.png")
    with caplog.at_level(logging.WARNING, logger="genreward.dreambench"):
        refs = load_reference_images(tmp_path / "cat")
    assert refs.shape == (3, 3, 32, 32)
    assert any("img9.png" in r.message and "resizing" in r.message for r in caplog.records)
    square = load_reference_images(tmp_path / "cat", size=16)
    assert square.shape == (3, 3, 16, 16) and 0 <= square.min() and square.max() <= 1


def test_bad_root_and_subject_names_are_one_line_errors(tmp_path):
    with pytest.raises(GenrewardError, match="dreambench.root: folder not found"):
        discover_subjects(tmp_path / "nope")
    _photos(tmp_path / "dog", 1)
    with pytest.raises(GenrewardError, match=r"dreambench.subjects: no folder .*cat"):
        discover_subjects(tmp_path, ["dog", "cat"])


def test_missing_generated_image_is_named(tmp_path, capsys):
    _photos(tmp_path / "subjects" / "dog", 1)
    cfg = _yaml(tmp_path / "db.yaml", {
        "output_dir": str(tmp_path / "out"), "model": {"device": "cpu"},
        "dreambench": {"root": str(tmp_path / "subjects"), "generated": str(tmp_path / "gen"), "prompts_limit": 1,
                       "images_per_prompt": 1, "dino_model": "tiny:dino", "clip_model": "tiny:clip"},
    })
    assert main(["eval", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the progress bar writes to stderr before it
    assert err.startswith("genreward: error: dreambench.generated: missing image") and "p0000_s00.png" in err


def test_skimage_subject_writes_same_size_views(tmp_path):
    folder = write_skimage_subject("chelsea", tmp_path / "refs", count=4, size=64)
    files = sorted(folder.glob("*.png"))
    assert len(files) == 4
    refs = load_reference_images(folder)
    assert refs.shape == (4, 3, 64, 64)
    assert not torch.equal(refs[0], refs[1])  # crops/flips differ
    with pytest.raises(GenrewardError, match="unknown skimage subject"):
        write_skimage_subject("not_a_photo", tmp_path / "x")


# --------------------------------------------------------------------------------- sampling end to end


def test_eval_samples_tiny_pipeline_per_subject(tmp_path, capsys):
    root = tmp_path / "subjects"
    _photos(root / "cat", 2, seed=7)
    _photos(root / "vase", 3, size=(48, 48), seed=8)
    cfg = _yaml(tmp_path / "db.yaml", {
        "output_dir": str(tmp_path / "out"),
        "model": {"pipeline": "tiny:sd", "device": "cpu"},
        "sample": {"num_steps": 2, "guidance_scale": 3.0, "eta": 0.0, "batch_size": 8},
        "dreambench": {"root": str(root), "prompts_limit": 2, "images_per_prompt": 2,
                       "dino_model": "tiny:dino", "clip_model": "tiny:clip"},
    })
    assert main(["eval", str(cfg), "dreambench.seed=3"]) == 0
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    assert "| **(overall)** |" in printed and "evaluated 8 images of 2 subjects" in printed
    records = [json.loads(l) for l in (out / "cat" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and records[0]["prompt"] == "a sks cat in the jungle"
    assert all(0 <= r["rewards"]["clip_t"] <= 1 and -1 <= r["rewards"]["dino"] <= 1 for r in records)
    assert (out / "vase" / "images" / "p0001_s01.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"dino", "clip_i", "clip_t"}
    subjects = json.loads((out / "subjects.json").read_text())
    assert summary["dino"] == pytest.approx((subjects["cat"]["dino"] + subjects["vase"]["dino"]) / 2)
    # same seeds → same images on a second run (per-image seeds fixed by position)
    shutil.rmtree(out)
    assert main(["eval", str(cfg), "dreambench.seed=3", "dreambench.subjects=[cat]", "dreambench.gallery=false"]) == 0
    again = [json.loads(l) for l in (out / "cat" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rewards"]["dino"] for r in again] == pytest.approx([r["rewards"]["dino"] for r in records])
