"""``genreward export`` (genreward/export.py): a tiny LoRA run → pipeline folder / LoRA adapter + model card.

The exported pipeline, reloaded with plain diffusers, must sample what the fine-tuned model samples (same
prompts and seeds, deterministic DDIM) and differ from the base; the adapter alone must load with
``load_lora_weights``; bad inputs are one-line errors that write nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from genreward.errors import GenrewardError
from genreward.export import LORA_FILE, export

RUN = {
    "trainer": "prdp",
    "model": {"pipeline": "tiny:sd", "device": "cpu"},
    "sample": {"num_steps": 4, "guidance_scale": 5.0, "eta": 1.0, "batch_size": 16},
    "prompts": {"path": "animals"},
    "reward": [{"name": "jpeg_compressibility", "label": "jpeg"}],
    "prdp": {"epochs": 1, "updates_per_epoch": 2, "prompts_per_epoch": 2, "images_per_prompt": 3, "beta": 1e-3, "clip_eps": 1e-2},
    "train": {"trainable": "lora", "lora": {"rank": 4}, "optim": {"lr": 1e-1}, "chunk_size": 16},
    "checkpoint": {"every": 1},
    "eval": {"enabled": False},
    "logging": {"trackers": []},
}
PROMPTS, SEEDS = ["a cat", "a dog"], [3, 4]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from genreward.config import config_from_dict
    from trainers import get_trainer

    out = tmp_path_factory.mktemp("export") / "run"
    config_cls, train = get_trainer("prdp")
    train(config_from_dict(dict(RUN, output_dir=str(out)), config_cls))
    assert (out / "checkpoints" / "checkpoint-1" / LORA_FILE).is_file()
    return out


def _images(pipe) -> torch.Tensor:
    from genreward.sampling import sample_trajectories

    return sample_trajectories(pipe, PROMPTS, num_steps=4, guidance_scale=5.0, eta=0.0, seeds=SEEDS).images


@pytest.fixture(scope="module")
def finetuned_images(run) -> torch.Tensor:
    from genreward.models import load_pipeline

    return _images(load_pipeline("tiny:sd", device="cpu", lora=str(run / "checkpoints" / "checkpoint-1")))


def _fake_checkpoint(folder: Path, write) -> Path:
    """A checkpoint folder the way trainers.run_dir writes one: files, trainer_state.json, then the manifest."""
    from trainers.run_dir import write_manifest

    folder.mkdir(parents=True)
    write(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"format": 1, "unit": "step", "done": 7, "metrics_rows": 0}))
    write_manifest(folder)
    return folder


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


def test_pipeline_export_reloads_with_diffusers_and_samples_the_finetuned_model(run, finetuned_images, tiny_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = export(run, tmp_path / "pipe")
    assert {p.name for p in out.iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "README.md"}
    assert not list(tmp_path.glob(".*export-tmp*"))  # the staging folder is gone
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert not getattr(pipe.unet, "peft_config", None)  # fused and unloaded: a plain U-Net
    images = _images(pipe)
    assert (images - finetuned_images).abs().max().item() < 1e-4
    assert (images - _images(tiny_pipe)).abs().max().item() > 1e-3  # the fine-tuning is in there
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and "`prdp`" in card and "`jpeg_compressibility`" in card
    assert "`tiny:sd`" in card and "epochs done: 1 of 1" in card and "fuse_lora" in card and "checkpoint-1" in card


def test_lora_only_export_loads_with_load_lora_weights(run, finetuned_images, tmp_path):
    from genreward.models import load_pipeline

    out = export(run, tmp_path / "lora", lora_only=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", LORA_FILE]
    pipe = load_pipeline("tiny:sd", device="cpu")
    pipe.load_lora_weights(str(out))
    assert (_images(pipe) - finetuned_images).abs().max().item() < 1e-4
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "`prdp`" in card and "jpeg_compressibility" in card and "tiny:sd" in card


def test_card_evaluation_damaged_newest_checkpoint_and_lora_alpha(run, tmp_path):
    """Before/after means in the card; a damaged newer checkpoint is skipped; alpha/rank goes into the up weights."""
    from safetensors.torch import load_file

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for tag, value in (("before", 0.25), ("final", 0.75)):
        (copy / "eval" / tag).mkdir(parents=True)
        (copy / "eval" / tag / "summary.json").write_text(json.dumps({"jpeg": value}))
    bad = copy / "checkpoints" / "checkpoint-2"
    shutil.copytree(copy / "checkpoints" / "checkpoint-1", bad)
    (bad / LORA_FILE).write_bytes(b"\0" * (bad / LORA_FILE).stat().st_size)  # same size, wrong sha256
    config = (copy / "config.yaml").read_text().replace("    alpha: null\n", "    alpha: 8.0\n")
    assert "alpha: 8.0" in config
    (copy / "config.yaml").write_text(config)

    out = export(copy, tmp_path / "card", lora_only=True)
    card = (out / "README.md").read_text()
    assert "checkpoint `checkpoint-1`" in card and "| jpeg | 0.25 | 0.75 | +0.5 |" in card
    assert "alpha 8.0" in card and "alpha/rank = 2" in card
    mine, trained = load_file(str(out / LORA_FILE)), load_file(str(run / "checkpoints" / "checkpoint-1" / LORA_FILE))
    for key, value in trained.items():
        factor = 2.0 if (".lora.up." in key or ".lora_B." in key) else 1.0
        assert torch.allclose(mine[key], value * factor), key


def test_full_unet_checkpoint_and_base_override(tiny_pipe, tmp_path):
    """A checkpoint with unet/ (trainable=full) replaces the pipeline's U-Net; a lone checkpoint needs --base."""
    from diffusers import StableDiffusionPipeline

    unet = type(tiny_pipe.unet).from_config(tiny_pipe.unet.config)
    unet.load_state_dict(tiny_pipe.unet.state_dict())
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    ckpt = _fake_checkpoint(tmp_path / "checkpoint-7", lambda f: unet.save_pretrained(str(f / "unet")))
    with pytest.raises(GenrewardError, match="no config.yaml found") as exc:
        export(ckpt, tmp_path / "o")
    _one_line(exc)
    with pytest.raises(GenrewardError, match="--lora-only needs a LoRA checkpoint") as exc:
        export(ckpt, tmp_path / "o", lora_only=True, base="tiny:sd")
    _one_line(exc)
    (tmp_path / "o").mkdir()  # an empty OUT is fine
    out = export(ckpt, tmp_path / "o", base="tiny:sd")
    loaded = StableDiffusionPipeline.from_pretrained(str(out)).unet
    assert torch.equal(loaded.conv_out.bias, unet.conv_out.bias)
    assert "full U-Net" in (out / "README.md").read_text() and "steps done: 7" in (out / "README.md").read_text()


def test_errors_are_one_line_and_write_nothing(run, tmp_path):
    cases = []
    cases.append((tmp_path / "missing", "does not exist"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    cases.append((tmp_path / "plain", "is not a training run folder"))
    broken = tmp_path / "broken"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("metrics.jsonl", "*.png"))
    (broken / "checkpoints" / "checkpoint-1" / "manifest.json").unlink()
    cases.append((broken, "has no verified checkpoint"))
    cases.append((broken / "checkpoints" / "checkpoint-1", "does not verify"))
    empty = _fake_checkpoint(tmp_path / "checkpoints" / "checkpoint-3", lambda f: None)
    cases.append((empty, "no config.yaml found"))
    for source, needle in cases:
        with pytest.raises(GenrewardError, match=needle) as exc:
            export(source, tmp_path / "never")
        _one_line(exc)
    with pytest.raises(GenrewardError, match="nothing to export") as exc:
        export(empty, tmp_path / "never", base="tiny:sd")
    _one_line(exc)

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(GenrewardError, match="exists and is not empty") as exc:
        export(run, full)
    _one_line(exc)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out, needle in ((blocker, "is not a folder"), (blocker / "sub", "cannot be created")):
        with pytest.raises(GenrewardError, match=needle) as exc:
            export(run, out, lora_only=True)
        _one_line(exc)
    assert not (tmp_path / "never").exists()


def test_cli_export_writes_the_adapter_and_refuses_a_missing_source(run, tmp_path, capsys):
    """``genreward export``: output line and one-line error."""
    from genreward import cli

    assert cli.main(["export", str(run), str(tmp_path / "x"), "--lora-only"]) == 0
    assert (tmp_path / "x" / LORA_FILE).is_file() and "exported LoRA adapter" in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path / "nope"), str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genreward: error:") and "does not exist" in err and "\n" not in err
