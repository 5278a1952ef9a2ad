"""Shared fixtures. The whole suite is offline: the hub is switched off before anything imports it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    """The built-in tiny SD pipeline on CPU, fp32 (built once; tests must not modify its weights)."""
    from genreward.models import load_pipeline

    return load_pipeline("tiny:sd", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_pipe_v():
    """The tiny SD pipeline with a v-prediction scheduler."""
    from genreward.models import load_pipeline

    return load_pipeline("tiny:sd-v", device="cpu", dtype="fp32")


@pytest.fixture()
def fresh_generator():
    return torch.Generator().manual_seed(0)


def _load_script(folder: str, name: str):
    """Import ``<repo>/<folder>/<name>.py`` as a module (``bench/`` and ``experiments/`` are not packages)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_bench():
    """Import a script from ``bench/`` by name, e.g. ``load_bench("prdp_gradient_snr")``."""
    return lambda name: _load_script("bench", name)


@pytest.fixture
def load_experiment():
    """Import a script from ``experiments/`` by name, e.g. ``load_experiment("world_reward_backprop")``."""
    return lambda name: _load_script("experiments", name)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process; a test that changes mixed precision starts a new one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
