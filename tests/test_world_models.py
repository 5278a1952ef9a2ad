"""The shapes world's project-trained models: shipped weights load and measure as documented; trainers run.

Documented numbers (genreward/world/weights/*/README.md, docs/world.md) are re-measured here on small
fixed seed sets; the tolerances cover floating-point differences between CPUs, which can flip a few
borderline images, not a different model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genreward.errors import GenrewardError
from genreward.world import shapes as W

# Measured with the shipped weights (see genreward/world/weights/shapes_t2i/README.md).
T2I_SINGLE_PASS_48 = 13 / 48  # 0.271
T2I_TOLERANCE = 0.1  # ± 5 of 48 images
# true caption vs wrong-colour caption on 96 held-out renders (genreward/world/weights/shapes_clip/README.md)
CLIP_COLOR_ACC_96 = 1.0  # 96/96
CLIP_TOLERANCE = 0.05


def _single_rows() -> list[dict]:
    """All 24 single captions (training and held-out), two images each: 48 images, seeds 0…47."""
    specs = W.all_specs(("single",))
    return [{"prompt": W.caption_of(s), "spec": s} for s in specs for _ in range(2)]


@pytest.fixture(scope="module")
def world_pipe():
    from genreward.models import load_pipeline

    return load_pipeline("world:shapes-t2i", device="cpu", dtype="fp32")


@pytest.mark.slow
def test_shipped_t2i_reproduces_documented_single_pass_rate(world_pipe):
    from genreward.rewards import build
    from genreward.sampling import sample_trajectories
    from genreward.world.models import t2i_defaults

    d = t2i_defaults()
    assert (d["num_steps"], d["height"]) == (20, 32)
    rows = _single_rows()
    prompts = [r["prompt"] for r in rows]
    traj = sample_trajectories(world_pipe, prompts, num_steps=d["num_steps"], guidance_scale=d["guidance_scale"],
                               eta=d["eta"], seeds=list(range(len(rows))), batch_size=48)
    assert traj.images.shape == (48, 3, 32, 32)
    rate = float(build("verifier")(traj.images, prompts, metadata=[{"spec": r["spec"]} for r in rows]).scores.mean())
    assert abs(rate - T2I_SINGLE_PASS_48) <= T2I_TOLERANCE, rate


@pytest.mark.slow
def test_shipped_t2i_follows_captions_better_than_chance(world_pipe):
    """The same images scored against a shuffled caption pass far less often: the model reads the text."""
    from genreward.rewards import build
    from genreward.sampling import sample_trajectories

    rows = _single_rows()[::2]
    prompts = [r["prompt"] for r in rows]
    traj = sample_trajectories(world_pipe, prompts, num_steps=20, guidance_scale=4.0, eta=1.0,
                               seeds=list(range(100, 100 + len(rows))))
    reward = build("verifier")
    right = float(reward(traj.images, prompts).scores.mean())
    wrong = float(reward(traj.images, prompts[7:] + prompts[:7]).scores.mean())
    assert right >= wrong + 0.15, (right, wrong)


def test_world_clip_true_caption_beats_wrong_colour():
    from genreward.models.clip import load_clip

    clip = load_clip("world:shapes-clip", device="cpu")
    samples = list(W.dataset(96, seed=10_000, split="holdout"))
    rng = np.random.default_rng(0)
    true = [s.caption for s in samples]
    wrong = [W.caption_of(W.negative_spec(s.spec, "color", rng)) for s in samples]
    images = torch.stack([s.image for s in samples])
    with torch.no_grad():
        v = clip.embed_images(images)
        s_true = (v * clip.embed_texts(true)).sum(-1)
        s_wrong = (v * clip.embed_texts(wrong)).sum(-1)
    acc = float((s_true > s_wrong).float().mean())
    assert acc >= CLIP_COLOR_ACC_96 - CLIP_TOLERANCE, acc


def test_world_clip_works_as_clip_score_reward():
    from genreward.rewards import build

    reward = build("clip_score", model="world:shapes-clip", device="cpu")
    samples = list(W.dataset(24, seed=3, split="train", caption_types=("single",)))
    images = torch.stack([s.image for s in samples])
    right = reward(images, [s.caption for s in samples]).scores
    wrong = reward(images, [samples[(i + 1) % 24].caption for i in range(24)]).scores
    assert right.shape == (24,) and float(right.mean()) > float(wrong.mean())


def test_unknown_world_specs_are_one_line_errors():
    from genreward.models import load_pipeline
    from genreward.models.clip import load_clip

    with pytest.raises(GenrewardError, match="world:shapes-t2i"):
        load_pipeline("world:nope", device="cpu")
    with pytest.raises(GenrewardError, match="world:shapes-clip"):
        load_clip("world:nope")


def test_shipped_weights_are_small_safetensors():
    from genreward.world.models import clip_folder, t2i_folder

    for folder, limit in ((t2i_folder(), 20e6), (clip_folder(), 5e6)):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files)
        assert not any(p.suffix in (".bin", ".pt", ".pth", ".ckpt") for p in files)
        assert sum(p.stat().st_size for p in files) <= limit
        assert (folder / "README.md").is_file()


@pytest.mark.slow
def test_train_t2i_runs_end_to_end(tmp_path):
    from genreward.sampling import sample_trajectories
    from genreward.world import train_t2i
    from genreward.world.models import load_world_t2i

    out = tmp_path / "t2i"
    train_t2i.main(["--out", str(out), "--n-train", "48", "--vae-steps", "2", "--vae-batch", "4", "--steps", "3",
                    "--batch", "4", "--eval-per-type", "0", "--seed", "1"])
    meta = json.loads((out / "world_model.json").read_text())
    assert meta["training"]["steps"] == 3 and meta["defaults"]["num_steps"] == 20
    # the follow-up modes the shipped model used: decoder refinement and resumed U-Net training
    common = ["--out", str(out), "--n-train", "48", "--vae-batch", "4", "--batch", "4", "--eval-per-type", "0", "--seed", "1"]
    unet_before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    train_t2i.main(["--refine-decoder", "--decoder-steps", "2", *common])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet_before  # decoder only
    train_t2i.main(["--resume", "--steps", "2", *common])
    meta = json.loads((out / "world_model.json").read_text())
    assert meta["decoder_refinement"]["decoder_steps"] == 2 and meta["resumes"][0]["steps"] == 2
    pipe = load_world_t2i(out)
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the training latents
    traj = sample_trajectories(pipe, ["a red circle"], num_steps=2, guidance_scale=4.0, seeds=[0])
    assert traj.images.shape == (1, 3, 32, 32) and torch.isfinite(traj.log_probs).all()


def test_train_clip_runs_end_to_end(tmp_path):
    from genreward.world import train_clip
    from genreward.world.models import load_world_clip

    out = tmp_path / "clip"
    train_clip.main(["--out", str(out), "--steps", "3", "--batch", "8", "--eval-n", "0", "--seed", "1"])
    assert json.loads((out / "world_clip.json").read_text())["training"]["steps"] == 3
    clip = load_world_clip(out)
    assert clip.tokenizer(["a red circle"]).input_ids[0][:2] == [49406, 320]  # the real CLIP BPE
    emb = clip.embed_texts(["a red circle", "two blue squares"])
    assert emb.shape == (2, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-4)
