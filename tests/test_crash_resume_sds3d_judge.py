"""Kill sds3d and the judge trainer (reward_model) at any moment, resume with ``latest``, get the uninterrupted run.

The same checks as tests/test_crash_resume.py (PRDP, DDPO, RPO) for the two step-counting trainers. Every run is
a subprocess (``python -m genreward train``) with one torch thread, so the uninterrupted and the killed-and-resumed
runs compute with the same kernels. A kill is a SIGKILL at a fault point of ``trainers/run_dir.py``
(``GENREWARD_FAULT=point:count``). Compared: every tensor of every safetensors file of the final checkpoint
(trainable weights, optimiser, and for the judge scheduler and RNG) with ``torch.equal``, and ``metrics.jsonl``
row for row without its wall-clock/memory keys (``VOLATILE``).

Both configs checkpoint every step, so the kill points below cover a restart from scratch (a kill before the
first checkpoint is complete, leaving a half-written folder behind) and resumes that cut the metrics log. The
judge uses LoRA with dropout: the RNG state in the checkpoint matters. Independent kill/resume pairs of the slow
tier run two at a time (``_in_lanes``) to keep this file near three minutes on two cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from subprocess_train import train_command, train_env, train_subprocess

REPO = Path(__file__).resolve().parents[1]

SDS3D = {
    "trainer": "sds3d",
    "prompt": "a hamburger",
    "grid": {"resolution": 12},
    "render": {"resolution": 16, "num_samples": 12},
    "guidance": {"pipeline": "tiny:sd", "min_step_percent": [0, 0.98, 0.02, 6], "max_step_percent": [0, 0.98, 0.5, 6]},
    "vlm": {"model": "tiny:qwen2-vl", "num_views": 2, "image_size": 28, "render_resolution": 16, "stop_step": 3},
    "loss": {"lambda_vlm": [0, 90.0, 0.0, 6], "lambda_tv_density": 0.1},
    "optim": {"lr": 0.03},
    "train": {"steps": 6, "seed": 0, "device": "cpu"},
    "output": {"render_every": 0, "render_views": 2, "eval_resolution": 16, "turntable_frames": 2, "gif": False,
               "mp4": False, "mesh": False, "gallery": False},
    "checkpoint": {"every": 1},
}
JUDGE = {
    "trainer": "reward_model",
    "model": "tiny:qwen2-vl",
    "data": {"train": "ROWS", "eval": "ROWS"},  # set by the fixture
    "train": {"objective": "pointwise", "trainable": "lora", "lora": {"rank": 4, "dropout": 0.1}, "lr": 3e-3,
              "lr_schedule": "cosine", "epochs": 3, "batch_size": 4, "eval_every": 1, "seed": 0, "device": "cpu"},
    "checkpoint": {"every": 1},
}
CONFIGS = {"sds3d": SDS3D, "reward_model": JUDGE}
STEPS = {"sds3d": 6, "reward_model": 6}  # 8 rows / batch 4 × 3 epochs
WEIGHTS = {"sds3d": "grid.safetensors", "reward_model": "adapter_model.safetensors"}
VOLATILE = {"wall_s", "peak_rss_mb", "step_seconds", "seconds"}  # wall clock and memory: differ run to run
FAST_FAULT = "log:3"
SLOW_FAULTS = ["unit:2", "save_files:1", "save_manifest:1", "saved:1"]


# ----------------------------------------------------------------------------------------------- helpers


_env, _cmd, _train = train_env, train_command, train_subprocess


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a checkpoint folder, keyed ``file/tensor``."""
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            out.update({f"{path.name}/{k}": fh.get_tensor(k) for k in fh.keys()})
    return out


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _final(out: Path, name: str) -> Path:
    return out / "checkpoints" / f"checkpoint-{STEPS[name]}"


def _assert_same_run(reference: Path, out: Path, name: str) -> None:
    a, b = _tensors(_final(reference, name)), _tensors(_final(out, name))
    assert any(k.startswith(WEIGHTS[name]) for k in a), sorted(a)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"final checkpoint differs from the uninterrupted run: {differ[:5]}"
    assert _rows(reference) == _rows(out)
    assert not list((out / "checkpoints").glob(".tmp-*")), "a half-written checkpoint folder was left behind"


def _sha(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _in_lanes(jobs: dict[str, Callable[[], None]], lanes: int = 2) -> None:
    """Run independent jobs (each a sequence of subprocess runs) two at a time; report every failure by name."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(lanes) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
    failures = {name: f.exception() for name, f in futures.items() if f.exception() is not None}
    assert not failures, "\n".join(f"{name}: {exc}" for name, exc in failures.items())


def _red_blue(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(8):
        red = i % 2 == 0
        noise = rng.integers(-20, 21, size=(32, 32, 3))
        arr = np.clip(np.array((220, 30, 30) if red else (30, 30, 220))[None, None] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.png")
        rows.append({"prompt": "is the image red?", "image": f"{i}.png", "label": "yes" if red else "no"})
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Configs and one uninterrupted run per trainer (both computed on first use, two at a time)."""
    root = tmp_path_factory.mktemp("reference")
    rows = _red_blue(root / "data")
    configs, runs = {}, {}
    for name, data in CONFIGS.items():
        data = json.loads(json.dumps(data))
        if name == "reward_model":
            data["data"] = {"train": str(rows), "eval": str(rows)}
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(data))

    def run(name: str) -> Callable[[], None]:
        def job() -> None:
            proc = _train(configs[name], root / f"{name}-run")
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[name] = root / f"{name}-run"

        return job

    _in_lanes({name: run(name) for name in CONFIGS})
    return {name: (configs[name], runs[name]) for name in CONFIGS}


def _kill_and_resume(references, out: Path, name: str, fault: str) -> None:
    config, reference = references[name]
    killed = _train(config, out, fault=fault)
    assert killed.returncode == -signal.SIGKILL, f"fault {fault} did not fire: rc={killed.returncode}\n{killed.stderr[-2000:]}"
    resumed = _train(config, out, "checkpoint.resume_from=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(reference, out, name)


# ------------------------------------------------------------------------------------------------ kills


@pytest.mark.slow
def test_reference_runs_write_the_run_folder(references):
    for name, (_, out) in references.items():
        done = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
        assert done == list(range(1, STEPS[name] + 1)), done
        assert (out / "config.yaml").is_file()
        state = json.loads((_final(out, name) / "trainer_state.json").read_text())
        assert state["unit"] == "step" and state["done"] == STEPS[name] and state["metrics_rows"] == len(_rows(out)) - (name == "reward_model")
        assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))
    names = {p.name for p in _final(references["reward_model"][1], "reward_model").iterdir()}
    assert names == {"adapter_model.safetensors", "optimizer.safetensors", "scheduler.safetensors", "rng.safetensors",
                     "trainer_state.json", "manifest.json"}
    assert (references["reward_model"][1] / "judge").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sds3d", "reward_model"])
def test_sigkill_after_a_metrics_row_resumes_to_the_uninterrupted_run(references, tmp_path, name):
    _kill_and_resume(references, tmp_path / "run", name, FAST_FAULT)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sds3d", "reward_model"])
def test_sigkill_anywhere_resumes_to_the_uninterrupted_run(references, tmp_path, name):
    """unit:2 (a step done, not logged), save_files:1 / save_manifest:1 (the first checkpoint half written: the
    run restarts from scratch and must ignore the leftover), saved:1 (just after the first checkpoint)."""
    jobs = {fault: (lambda fault=fault: _kill_and_resume(references, tmp_path / fault.replace(":", "-"), name, fault))
            for fault in SLOW_FAULTS}
    _in_lanes(jobs)


# ----------------------------------------------------------------------------------- damaged checkpoints


def _damage(path: Path, name: str, how: str) -> Path:
    """Damage one file of a checkpoint; returns the damaged file."""
    weights = path / WEIGHTS[name]
    if how == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "delete":
        weights.unlink()
    elif how == "zeros":
        weights.write_bytes(b"\0" * weights.stat().st_size)
    elif how == "empty_state":
        (path / "trainer_state.json").write_text("")
        return path / "trainer_state.json"
    return weights


def _cli(capsys, config: Path, out: Path, *overrides: str) -> tuple[int, str]:
    """The CLI in this process (for runs that stop before loading anything): (exit code, stderr)."""
    from genreward.cli import main

    capsys.readouterr()
    code = main(["train", str(config), f"output_dir={out}", *overrides])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", ["sds3d", "reward_model"])
@pytest.mark.parametrize("how", ["truncate", "delete", "zeros", "empty_state"])
def test_damaged_newest_checkpoint_latest_falls_back_named_one_exits_2(references, tmp_path, capsys, name, how):
    from trainers.run_dir import CheckpointSection, RunDir

    config, reference = references[name]
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    newest = _final(out, name)
    damaged = _damage(newest, name, how)
    rd = RunDir(out, "step", CheckpointSection(resume_from="latest"))
    capsys.readouterr()
    assert rd.prepare() == out / "checkpoints" / f"checkpoint-{STEPS[name] - 1}"
    assert f"skipping checkpoint {newest}" in capsys.readouterr().err
    before = _sha(out)
    code, err = _cli(capsys, config, out, f"checkpoint.resume_from={newest}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("genreward: error:"), err
    assert str(damaged) in lines[0] and "Traceback" not in err
    assert _sha(out) == before


@pytest.mark.slow
def test_resume_after_damage_falls_back_with_a_warning_and_reaches_the_uninterrupted_run(references, tmp_path):
    def job(name: str, how: str) -> Callable[[], None]:
        def run() -> None:
            config, reference = references[name]
            out = tmp_path / name
            shutil.copytree(reference, out)
            _damage(_final(out, name), name, how)
            proc = _train(config, out, "checkpoint.resume_from=latest")
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert f"skipping checkpoint {_final(out, name)}" in proc.stderr
            _assert_same_run(reference, out, name)

        return run

    _in_lanes({"sds3d": job("sds3d", "zeros"), "reward_model": job("reward_model", "truncate")})


# ----------------------------------------------------------------------------------- fresh runs never mix


@pytest.mark.parametrize("name", ["sds3d", "reward_model"])
def test_fresh_run_into_an_earlier_run_folder_exits_2_and_changes_nothing(references, tmp_path, capsys, name):
    config, reference = references[name]
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = _sha(out)
    code, err = _cli(capsys, config, out, "train.seed=7")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "holds an earlier run" in lines[0] and "checkpoint.overwrite=true" in lines[0], err
    # a bad input stops before the folder is touched, even with checkpoint.overwrite=true: a missing data file
    # (checked before the folder is looked at) and an unknown model (loaded after prepare(), before start())
    bad = ["model=tiny:nope"] if name == "reward_model" else ["guidance.pipeline=tiny:nope"]
    if name == "reward_model":
        bad.append("data.train=/nonexistent/rows.jsonl")
    for override in bad:
        code, err = _cli(capsys, config, out, override, "checkpoint.overwrite=true")
        assert code == 2 and "Traceback" not in err and ("tiny:nope" in err or "nonexistent" in err), err
        assert _sha(out) == before, override


def test_renamed_checkpoint_keys_name_the_new_key(references, tmp_path, capsys):
    cases = [("sds3d", "output.resume=latest", "use 'checkpoint.resume_from'"),
             ("sds3d", "output.checkpoint_every=5", "use 'checkpoint.every'"),
             ("reward_model", "checkpoint.every_epochs=1", "use 'checkpoint.every (counted in steps now)'")]
    for name, override, needle in cases:
        code, err = _cli(capsys, references[name][0], tmp_path / "run", override)
        assert code == 2 and needle in err, err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------- signals


def _sigterm_and_resume(references, out: Path, name: str) -> None:
    config, reference = references[name]
    proc = subprocess.Popen(_cmd(config, out), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, f"the run ended before SIGTERM reached it\n{stderr[-2000:]}"
    errors = [line for line in stderr.splitlines() if line.startswith("genreward:")]
    assert len(errors) == 1 and "SIGTERM" in errors[0] and "checkpoint" in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    saved = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert saved and not (_final(out, name)).exists(), "SIGTERM should stop the run before its last step"
    resumed = _train(config, out, "checkpoint.resume_from=latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(reference, out, name)


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_that_resumes_exactly(references, tmp_path):
    _in_lanes({name: (lambda name=name: _sigterm_and_resume(references, tmp_path / name, name)) for name in CONFIGS})
