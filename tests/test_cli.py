"""The command line: one-line errors with non-zero exit codes, the quickstart end to end, the gallery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "genreward", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    lines = [line for line in err.splitlines() if line.startswith("genreward: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_config_key_is_one_line_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("sample:\n  num_stepz: 3\n")
    proc = run_cli("eval", str(cfg))
    assert_one_line_error(proc, "bad.yaml", "sample.num_stepz", "num_steps")


def test_wrong_type_override_is_one_line_error():
    proc = run_cli("eval", "configs/quickstart.yaml", "sample.num_steps=many")
    assert_one_line_error(proc, "quickstart.yaml", "sample.num_steps", "int")


def test_missing_config_file():
    proc = run_cli("eval", "configs/does-not-exist.yaml")
    assert_one_line_error(proc, "does-not-exist.yaml")


def test_missing_prompt_file(tmp_path):
    proc = run_cli("eval", "configs/quickstart.yaml", "eval.prompts.path=/nonexistent/prompts.txt", f"output_dir={tmp_path}")
    assert_one_line_error(proc, "/nonexistent/prompts.txt")


def test_missing_prompt_column(tmp_path):
    tsv = tmp_path / "parti.tsv"
    tsv.write_text("Prompt\tCategory\na cat\tAnimals\n")
    proc = run_cli("eval", "configs/quickstart.yaml", f"eval.prompts.path={tsv}", "eval.prompts.column=Text", f"output_dir={tmp_path / 'o'}")
    assert_one_line_error(proc, "Text", "parti.tsv")


def test_unknown_reward_name(tmp_path):
    proc = run_cli("eval", "configs/quickstart.yaml", "eval.rewards.0.name=no_such_reward", f"output_dir={tmp_path}")
    assert_one_line_error(proc, "no_such_reward")


def test_offline_model_id_is_one_line_error(tmp_path):
    proc = run_cli(
        "eval", "configs/quickstart.yaml", "model.pipeline=CompVis/stable-diffusion-v1-4", "eval.prompts.limit=1", f"output_dir={tmp_path}"
    )
    assert_one_line_error(proc, "CompVis/stable-diffusion-v1-4", "local")


def test_gallery_of_missing_run_dir(tmp_path):
    proc = run_cli("gallery", str(tmp_path / "nope"))
    assert_one_line_error(proc, "nope")


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    """The shipped quickstart, unchanged but for its output folder: outputs, summaries and gallery exist."""
    out = tmp_path / "quickstart"
    proc = run_cli("eval", "configs/quickstart.yaml", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 12 * 4
    assert all((out / r["image"]).is_file() for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"jpeg_compressibility", "clip_score"}
    assert summary["jpeg_compressibility"] < 0 and -1 <= summary["clip_score"] <= 1
    assert (out / "summary.md").read_text().count("\n") == 2 + 12 + 1
    assert (out / "summary.csv").is_file() and (out / "config.yaml").is_file()
    html = (out / "gallery.html").read_text()
    assert html.count("<img") >= 48
    # A second, compared run: the CLI gallery command writes the before/after page.
    proc = run_cli("gallery", str(out), "--compare", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "compare.html").is_file()
