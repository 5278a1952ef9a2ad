"""bench/prdp_gradient_snr.py: the signal estimate from batch-gradient cosines, and an end-to-end run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_cosine_recovers_the_noise_to_signal_ratio(load_bench):
    """Gradients = s + noise of per-trajectory variance v/n: n·(1/ρ − 1) must estimate D·v/|s|², the n* of the docstring."""
    bench = load_bench("prdp_gradient_snr")
    gen = torch.Generator().manual_seed(0)
    dim, n, per_trajectory_var = 20_000, 64, 4.0
    signal = torch.randn(dim, generator=gen)
    signal = signal / signal.norm()  # |s|² = 1
    noise_std = (per_trajectory_var / n / dim) ** 0.5  # |noise|² ≈ v/n
    grads = [{"w": signal + noise_std * torch.randn(dim, generator=gen)} for _ in range(8)]
    rho, norm = bench.mean_cosine(grads, lambda name: True)
    # ρ = 1/(1 + v/n), so n* = n·(1/ρ − 1) = v
    expected_rho = 1 / (1 + per_trajectory_var / n)
    assert rho == pytest.approx(expected_rho, abs=0.02)
    assert float(bench.needed(rho, n).replace(",", "")) == pytest.approx(per_trajectory_var, rel=0.35)
    assert bench.needed(-0.1, n).startswith("∞")
    assert norm == pytest.approx((1 + per_trajectory_var / n) ** 0.5, rel=0.05)


@pytest.mark.slow
def test_runs_end_to_end_on_the_tiny_model(capsys, load_bench):
    bench = load_bench("prdp_gradient_snr")
    overrides = ["prdp.prompts_per_epoch=2", "prdp.images_per_prompt=3", "sample.num_steps=3", "model.device=cpu"]
    assert bench.main([str(ROOT / "configs" / "prdp_tiny_jpeg.yaml"), *overrides, "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 prompts × 3 images = 6 trajectories per batch, T = 3, 2 batches" in out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    for group in ("cross-attention", "self-attention", "resnet", "time", "all", "steps"):
        assert group in rows, out
    # exactly one row per parameter group and one per third of the timesteps
    assert len(out.strip().splitlines()) == 2 + len(bench.GROUPS) + 3
