"""Kill a run at any moment, resume with ``latest``, get the uninterrupted run back (PRDP, DDPO, RPO).

Every run is a subprocess (``python -m genreward train``) with one torch thread, so the uninterrupted and the
killed-and-resumed runs compute with the same kernels. A kill is a SIGKILL at a fault point of
``trainers/run_dir.py`` (``GENREWARD_FAULT=point:count``): after a unit's work, after a metrics row, during a
checkpoint save (files written / manifest written / folder in place). Compared: the final trainable weights,
tensor by tensor with ``torch.equal`` (bitwise), and ``metrics.jsonl`` row for row without wall-clock keys.
Also here: damaged checkpoints, a crafted pickle, a fresh run into an earlier run's folder, SIGTERM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from subprocess_train import train_env, train_subprocess

REPO = Path(__file__).resolve().parents[1]

PRDP = {
    "trainer": "prdp",
    "model": {"pipeline": "tiny:sd", "device": "cpu"},
    "sample": {"num_steps": 3, "guidance_scale": 5.0, "eta": 1.0, "batch_size": 8, "height": 32, "width": 32},
    "prompts": {"path": "animals"},
    "reward": [{"name": "meanstd", "options": {"reward": {"name": "jpeg_compressibility"}}}],  # stateful reward
    "prdp": {"epochs": 3, "updates_per_epoch": 2, "prompts_per_epoch": 2, "images_per_prompt": 2, "beta": 1e-3, "clip_eps": 1e-2},
    "train": {"trainable": "lora", "lora": {"rank": 2}, "optim": {"lr": 1e-2}, "chunk_size": 4},
    "checkpoint": {"every": 1},
    "eval": {"enabled": False},
    "logging": {"trackers": []},
}
DDPO = {
    "trainer": "ddpo",
    "model": {"pipeline": "tiny:sd", "device": "cpu"},
    "sample": {"num_steps": 3, "guidance_scale": 5.0, "eta": 1.0, "batch_size": 8, "height": 32, "width": 32},
    "prompts": {"path": "animals", "limit": 2},
    "reward": [{"name": "jpeg_compressibility"}],
    "ddpo": {"epochs": 3, "samples_per_epoch": 4, "minibatch_size": 2, "gradient_accumulation_steps": 1,
             "tracker_buffer_size": 4, "tracker_min_count": 2},  # the per-prompt tracker is checkpointed state
    "train": {"trainable": "lora", "lora": {"rank": 2}, "optim": {"lr": 1e-2}},
    "checkpoint": {"every": 1},
    "eval": {"enabled": False},
    "logging": {"trackers": []},
}
RPO = {
    "trainer": "rpo",
    "model": {"pipeline": "tiny:sd", "device": "cpu"},
    "sample": {"num_steps": 3, "guidance_scale": 5.0, "eta": 0.0, "batch_size": 8},
    "subject": {"references": "skimage:chelsea", "class_noun": "cat", "identifier": "sks"},
    "reward": {"name": "lambda_harmonic", "options": {"backend": "clip", "model": "tiny:clip"}},
    "rpo": {"max_train_steps": 4, "batch_size": 1, "negatives_per_prompt": 1, "validation_every": 2,
            "num_validation_images": 1, "training_prompts": ["a {identifier} {class_noun} on the Moon"]},
    "train": {"trainable": "lora", "lora": {"rank": 2}, "optim": {"lr": 1e-3}},
    "checkpoint": {"every": 1},
    "eval": {"enabled": False},
    "logging": {"trackers": []},
}
CONFIGS = {"prdp": PRDP, "ddpo": DDPO, "rpo": RPO}
VOLATILE = ("time_", "peak_rss_mb", "wall_s")


def _write_config(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(CONFIGS[name]))
    return path


_env, _train = train_env, train_subprocess


def _weights(out: Path, done: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"checkpoint-{done}" / "pytorch_lora_weights.safetensors"))


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _total(name: str) -> int:
    return CONFIGS[name]["rpo"]["max_train_steps"] if name == "rpo" else CONFIGS[name][name]["epochs"]


def _assert_same_run(a: Path, b: Path, name: str) -> None:
    wa, wb = _weights(a, _total(name)), _weights(b, _total(name))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ from the uninterrupted run"
    assert _rows(a) == _rows(b)


def _sha(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """One uninterrupted run per trainer (computed lazily)."""
    root = tmp_path_factory.mktemp("baseline")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in cache:
            config = _write_config(root, name)
            out = root / f"{name}-run"
            proc = _train(config, out)
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[name] = (config, out)
        return cache[name]

    return get


def _kill_and_resume(baselines, tmp_path: Path, name: str, fault: str) -> None:
    config, reference = baselines(name)
    out = tmp_path / "run"
    killed = _train(config, out, fault=fault)
    assert killed.returncode == -signal.SIGKILL, f"fault {fault} did not fire: rc={killed.returncode}\n{killed.stderr[-2000:]}"
    resumed = _train(config, out, "checkpoint.resume_from=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(reference, out, name)
    assert not list((out / "checkpoints").glob(".tmp-*")), "a half-written checkpoint folder was left behind"


# A kill during a checkpoint save, for every trainer (fast tier).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["prdp", "ddpo", "rpo"])
def test_sigkill_during_checkpoint_save_resumes_to_the_uninterrupted_run(baselines, tmp_path, name):
    _kill_and_resume(baselines, tmp_path, name, "save_files:2")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["unit:1", "unit:2", "log:2", "save_manifest:1", "saved:2", "log:3"])
@pytest.mark.parametrize("name", ["prdp", "ddpo", "rpo"])
def test_sigkill_anywhere_resumes_to_the_uninterrupted_run(baselines, tmp_path, name, fault):
    _kill_and_resume(baselines, tmp_path, name, fault)


# ----------------------------------------------------------------------------------- damaged checkpoints


def _damage(path: Path, how: str) -> None:
    lora = path / "pytorch_lora_weights.safetensors"
    if how == "truncate_lora":
        lora.write_bytes(lora.read_bytes()[: lora.stat().st_size // 2])
    elif how == "delete_lora":
        lora.unlink()
    elif how == "zero_lora":
        lora.write_bytes(b"\0" * lora.stat().st_size)
    elif how == "truncate_optimizer":
        opt = path / "optimizer.safetensors"
        opt.write_bytes(opt.read_bytes()[:100])
    elif how == "empty_state":
        (path / "trainer_state.json").write_text("")
    elif how == "no_manifest":
        (path / "manifest.json").unlink()


DAMAGES = ["truncate_lora", "delete_lora", "zero_lora", "truncate_optimizer", "empty_state", "no_manifest"]


@pytest.fixture(scope="module")
def damaged_source(baselines):
    """The PRDP baseline's folder; each test copies it and damages the newest checkpoint."""
    return baselines("prdp")


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_newest_checkpoint_is_skipped_by_latest_and_named_one_fails_in_one_line(damaged_source, tmp_path, how):
    from trainers.run_dir import CheckpointSection, RunDir

    _, src = damaged_source
    out = _copy_run(src, tmp_path / "run")
    _damage(out / "checkpoints" / "checkpoint-3", how)
    rd = RunDir(out, "epoch", CheckpointSection(resume_from="latest"))
    assert rd.prepare() == out / "checkpoints" / "checkpoint-2"  # falls back, with a warning
    named = RunDir(out, "epoch", CheckpointSection(resume_from=str(out / "checkpoints" / "checkpoint-3")))
    from genreward.errors import GenrewardError

    with pytest.raises(GenrewardError) as err:
        named.prepare()
    assert "checkpoint-3" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_resume_after_damage_falls_back_and_reaches_the_uninterrupted_weights(damaged_source, tmp_path):
    config, src = damaged_source
    out = _copy_run(src, tmp_path / "run")
    _damage(out / "checkpoints" / "checkpoint-3", "zero_lora")
    proc = _train(config, out, "checkpoint.resume_from=latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping checkpoint" in proc.stderr and "checkpoint-3" in proc.stderr
    _assert_same_run(src, out, "prdp")


@pytest.mark.slow
def test_named_damaged_checkpoint_exits_with_one_line_and_no_traceback(damaged_source, tmp_path):
    config, src = damaged_source
    out = _copy_run(src, tmp_path / "run")
    _damage(out / "checkpoints" / "checkpoint-3", "truncate_optimizer")
    before = _sha(out)
    proc = _train(config, out, f"checkpoint.resume_from={out / 'checkpoints' / 'checkpoint-3'}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("genreward: error:")]
    assert len(errors) == 1 and "optimizer.safetensors" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert _sha(out) == before


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    from trainers.run_dir import CheckpointSection, RunDir

    rd = RunDir(tmp_path / "run", "epoch", CheckpointSection())
    rd.start({"a": 1}, None)
    rd.log({"epoch": 0})
    path = rd.save(1, None, {})
    rd.log({"epoch": 1})
    with open(rd.metrics_path, "a") as fh:
        fh.write('{"epoch": 2, "rew')  # killed mid-write
    again = RunDir(tmp_path / "run", "epoch", CheckpointSection(resume_from="latest"))
    assert again.prepare() == path
    again.start({"a": 1}, path)
    assert again.metrics() == [{"epoch": 0}] and again.metrics_rows == 1


# ----------------------------------------------------------------------------------- no code on load


@pytest.mark.slow
def test_crafted_pickle_in_a_checkpoint_is_never_loaded(damaged_source, tmp_path):
    """accelerate's register_for_checkpointing unpickled custom_checkpoint_0.pkl on resume; nothing loads pickles now."""
    config, src = damaged_source
    out = _copy_run(src, tmp_path / "run")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (out / "checkpoints" / "checkpoint-3" / name).write_bytes(pickle.dumps(Exploit()))
    proc = _train(config, out, "checkpoint.resume_from=latest", "prdp.epochs=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists(), "a pickle in a checkpoint folder was executed"


@pytest.mark.slow
def test_checkpoint_state_files_are_json_and_safetensors_only(damaged_source):
    _, src = damaged_source
    names = {p.name for p in (src / "checkpoints" / "checkpoint-3").iterdir()}
    assert names == {"manifest.json", "trainer_state.json", "optimizer.safetensors", "rng.safetensors",
                     "pytorch_lora_weights.safetensors"}


# ----------------------------------------------------------------------------------- fresh runs never mix


@pytest.mark.slow
def test_fresh_run_into_an_earlier_run_folder_stops_and_changes_nothing(damaged_source, tmp_path):
    config, src = damaged_source
    out = _copy_run(src, tmp_path / "run")
    before = _sha(out)
    proc = _train(config, out, "train.optim.lr=0.5", "train.seed=7")
    assert proc.returncode == 2
    assert "holds an earlier run" in proc.stderr and "checkpoint.overwrite=true" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _sha(out) == before


@pytest.mark.slow
def test_bad_prompt_path_never_touches_an_earlier_run(damaged_source, tmp_path):
    config, src = damaged_source
    out = _copy_run(src, tmp_path / "run")
    before = _sha(out)
    proc = _train(config, out, "prompts.path=/nonexistent/prompts.txt", "checkpoint.overwrite=true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _sha(out) == before


@pytest.mark.slow
def test_overwrite_replaces_the_earlier_run_completely(damaged_source, tmp_path):
    config, src = damaged_source
    out = _copy_run(src, tmp_path / "run")
    old = _weights(out, 3)
    proc = _train(config, out, "checkpoint.overwrite=true", "train.optim.lr=0.05")
    assert proc.returncode == 0, proc.stderr[-2000:]
    new = _weights(out, 3)
    assert any(not torch.equal(old[k], new[k]) for k in old), "the final save kept the earlier run's weights"
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["optim"]["lr"] == 0.05
    assert len(_rows(out)) == 3


def test_resume_latest_without_checkpoint_starts_an_empty_log(tmp_path):
    from trainers.run_dir import CheckpointSection, RunDir

    rd = RunDir(tmp_path / "run", "epoch", CheckpointSection())
    rd.start({"a": 1}, None)
    rd.log({"epoch": 0})  # killed during epoch 1, before any checkpoint
    again = RunDir(tmp_path / "run", "epoch", CheckpointSection(resume_from="latest"))
    assert again.prepare() is None
    again.start({"a": 1}, None)
    assert again.metrics() == []


def test_total_limit_keeps_the_newest_checkpoints(tmp_path):
    from trainers.run_dir import CheckpointSection, RunDir

    rd = RunDir(tmp_path / "run", "step", CheckpointSection(total_limit=2))
    rd.start({}, None)
    for done in (2, 4, 6):
        rd.save(done, None, {})
    assert [n for n, _ in rd.list_checkpoints()] == [4, 6]


@pytest.mark.slow
def test_renamed_checkpoint_keys_name_the_new_key(tmp_path):
    proc = _train(_write_config(tmp_path, "prdp"), tmp_path / "run", "checkpoint.every_epochs=2")
    assert proc.returncode == 2 and "use 'checkpoint.every'" in proc.stderr
    proc = _train(_write_config(tmp_path, "prdp"), tmp_path / "run", "train.batch_size=2")
    assert proc.returncode == 2 and "train.chunk_size" in proc.stderr and "ddpo.minibatch_size" in proc.stderr


# ----------------------------------------------------------------------------------- signals


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_a_checkpoint_that_resumes_exactly(baselines, tmp_path, sig):
    config, reference = baselines("prdp")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "genreward", "train", str(config), f"output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    name = signal.Signals(sig).name
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.startswith("genreward:")]  # tqdm uses \r
    assert len(lines) == 1 and name in lines[0] and "checkpoint" in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    resumed = _train(config, out, "checkpoint.resume_from=latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(reference, out, "prdp")


@pytest.fixture
def synthetic_run(tmp_path):
    """A run folder with checkpoint-1..3 written by RunDir.save (small safetensors files), no training needed."""
    from safetensors.torch import save_file

    from trainers.run_dir import CheckpointSection, RunDir, save_tree

    rd = RunDir(tmp_path / "run", "epoch", CheckpointSection())
    rd.start({"trainer": "synthetic"}, None)
    for done in (1, 2, 3):
        rd.log({"epoch": done - 1})

        def files(folder, done=done):
            save_file({"w": torch.full((64,), float(done))}, str(folder / "pytorch_lora_weights.safetensors"))
            save_tree({"state": {0: {"step": torch.tensor(float(done))}}}, folder / "optimizer.safetensors")

        rd.save(done, files, {"extra": {}})
    return tmp_path / "run"


@pytest.mark.parametrize("how", DAMAGES)
def test_latest_skips_a_damaged_newest_checkpoint_and_a_named_one_fails_in_one_line(synthetic_run, how):
    from genreward.errors import GenrewardError
    from trainers.run_dir import CheckpointSection, RunDir

    _damage(synthetic_run / "checkpoints" / "checkpoint-3", how)
    assert RunDir(synthetic_run, "epoch", CheckpointSection(resume_from="latest")).prepare() == synthetic_run / "checkpoints" / "checkpoint-2"
    named = RunDir(synthetic_run, "epoch", CheckpointSection(resume_from=str(synthetic_run / "checkpoints" / "checkpoint-3")))
    with pytest.raises(GenrewardError) as err:
        named.prepare()
    assert "checkpoint-3" in str(err.value) and "\n" not in str(err.value)


def test_fresh_run_into_a_run_folder_is_refused_before_anything_is_written(synthetic_run):
    from genreward.errors import GenrewardError
    from trainers.run_dir import CheckpointSection, RunDir

    before = _sha(synthetic_run)
    with pytest.raises(GenrewardError, match="holds an earlier run"):
        RunDir(synthetic_run, "epoch", CheckpointSection()).prepare()
    assert _sha(synthetic_run) == before


def test_a_crafted_pickle_next_to_the_state_is_ignored_by_the_loaders(synthetic_run, tmp_path):
    """load_tree reads safetensors only; files accelerate would unpickle are never opened."""
    import pickle

    from trainers.run_dir import load_tree

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = synthetic_run / "checkpoints" / "checkpoint-3"
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Exploit()))
    state = load_tree(ckpt / "optimizer.safetensors")
    assert float(state["state"][0]["step"]) == 3.0 and not marker.exists()
