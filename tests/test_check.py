"""``genreward check``: the on-policy self-check passes on every family and precision here, and says FAIL (exit 1)
when the recorded log-probs do not belong to the model that trains."""

from __future__ import annotations

import pytest
import torch

from genreward.cli import main
from genreward.config import load_config
from trainers.check import CheckResult, check
from trainers.grpo import GRPOConfig

CONFIG = "configs/grpo_tiny_sd3.yaml"


@pytest.mark.parametrize("spec,precision", [("tiny:sd", "no"), ("tiny:sdxl", "no"), ("tiny:sd3", "no"), ("tiny:flux", "no"),
                                            ("tiny:sd3", "bf16"), ("tiny:flux", "bf16")])
def test_check_is_on_policy_for_every_family_and_precision(tmp_path, spec, precision, fresh_accelerator_state):
    config = load_config(CONFIG, GRPOConfig, [f"model.pipeline={spec}", f"train.mixed_precision={precision}",
                                              f"output_dir={tmp_path / 'never'}", "model.device=cpu"])
    result = check(config, samples=3)
    assert result.ok, result.lines()
    assert result.samples == 3 and result.steps == 6 and result.clip_fraction == 0.0
    if precision == "no":
        assert result.max_abs_delta == 0.0 and result.ratio_min == result.ratio_max == 1.0
    assert not (tmp_path / "never").exists()  # the check never writes the config's run folder


def test_check_cli_prints_the_numbers_and_exits_0(capsys, tmp_path):
    code = main(["check", CONFIG, f"output_dir={tmp_path / 'x'}", "model.device=cpu", "--samples", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "family sd3, precision fp32: 2 samples × 6 stochastic steps" in out and "OK: on-policy" in out


def test_off_policy_numbers_are_a_fail(monkeypatch, tmp_path, capsys):
    """A sampler whose recorded log-probs are off (here: shifted by 0.01 per step) is reported, exit code 1."""
    import trainers.common as common

    original = common.TrainingRun.sample

    def shifted(self, *args, **kwargs):
        traj = original(self, *args, **kwargs)
        traj.log_probs = traj.log_probs + 0.01
        return traj

    monkeypatch.setattr(common.TrainingRun, "sample", shifted)
    code = main(["check", CONFIG, f"output_dir={tmp_path / 'x'}", "model.device=cpu", "--samples", "2"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL: off-policy beyond the fp32 tolerance" in out and "100.0% of ratios outside 1 ± 0.001" in out


def test_result_tolerance_logic():
    base = dict(family="sd", precision="fp32", samples=1, steps=1, ratio_min=1, ratio_max=1, clip_range=None,
                clip_fraction=0.0, tolerance=1e-4)
    assert CheckResult(max_abs_delta=1e-5, max_abs_delta_grad=0.0, **base).ok
    assert not CheckResult(max_abs_delta=0.0, max_abs_delta_grad=2e-4, **base).ok
    assert torch.isfinite(torch.tensor(base["tolerance"]))
