"""``genreward train`` in a subprocess for the crash/resume tests: one torch thread, offline, an optional fault."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_env(fault: str | None = None) -> dict:
    """The environment of a test run: one thread (same kernels in every run), offline, ``GENREWARD_FAULT`` set or cleared."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONHASHSEED="0")
    env.pop("GENREWARD_FAULT", None)
    if fault:
        env["GENREWARD_FAULT"] = fault
    return env


def train_command(config: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "genreward", "train", str(config), f"output_dir={out}", *overrides]


def train_subprocess(config: Path, out: Path, *overrides: str, fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(config, out, *overrides), cwd=REPO, env=train_env(fault),
                          capture_output=True, text=True, timeout=600)
