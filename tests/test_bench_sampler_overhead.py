"""bench/sampler_overhead.py runs for every family and prints the side-by-side ratio line."""

from __future__ import annotations

import sys

import pytest


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_sampler_overhead_bench_runs_for_every_family(load_bench, monkeypatch, capsys, family):
    bench = load_bench("sampler_overhead")
    monkeypatch.setattr(sys, "argv", ["sampler_overhead.py", "--family", family, "--steps", "2", "--batch", "2",
                                      "--reps", "1", "--device", "cpu"])
    bench.main()
    out = capsys.readouterr().out
    assert f"family={family}" in out and out.strip().splitlines()[-1].startswith("ratio: ")
