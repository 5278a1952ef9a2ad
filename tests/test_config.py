"""Configs: YAML → dataclasses, dotted overrides, one-line errors naming key and file."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from genreward.config import MISSING_VALUE, load_config, save_config
from genreward.errors import ConfigError
from genreward.schema import EvalConfig


@dataclass
class Inner:
    steps: int = 10
    lr: float = 1e-4
    name: str = "x"


@dataclass
class Outer:
    output_dir: str
    required: str
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def _write(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_load_types_defaults_and_output_dir(tmp_path):
    path = _write(tmp_path, {"required": "r", "inner": {"lr": "3e-4"}})
    cfg = load_config(path, Outer)
    assert cfg.inner.lr == pytest.approx(3e-4) and cfg.inner.steps == 10
    assert cfg.output_dir == "outputs/exp"


def test_dotted_overrides(tmp_path):
    path = _write(tmp_path, {"required": "r", "tags": ["a", "b"]})
    cfg = load_config(path, Outer, ["inner.steps=3", "output_dir=/some/where", "tags.1=c", "inner.name=hello world"])
    assert cfg.inner.steps == 3 and cfg.output_dir == "/some/where" and cfg.tags == ["a", "c"]
    assert cfg.inner.name == "hello world"


@pytest.mark.parametrize(
    "data,overrides,message",
    [
        ({"required": "r", "inner": {"stepz": 3}}, [], r"exp.yaml: unknown key 'inner.stepz' \(did you mean 'steps'\?\)"),
        ({"required": "r"}, ["inner.steps=ten"], r"exp.yaml: key 'inner.steps' expects int, got 'ten'"),
        ({"required": "r", "inner": {"lr": [1]}}, [], r"key 'inner.lr' expects float"),
        ({}, [], r"exp.yaml: missing required key 'required'"),
        ({"required": MISSING_VALUE}, [], r"missing required value for key 'required'"),
        ({"required": "r"}, ["nope=1"], r"unknown key 'nope'"),
        ({"required": "r"}, ["tags.4=x"], r"no list item 4"),
        ({"required": "r"}, ["justtext"], r"must look like key.sub=value"),
    ],
)
def test_errors_name_key_and_file(tmp_path, data, overrides, message):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, Outer, overrides)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", Outer)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_config(bad, Outer)


def test_eval_config_literal_and_validation(tmp_path):
    path = _write(tmp_path, {"model": {"dtype": "fp64"}})
    with pytest.raises(ConfigError, match=r"key 'model.dtype' must be one of 'fp32', 'fp16', 'bf16'"):
        load_config(path, EvalConfig)
    path = _write(tmp_path, {"sample": {"num_steps": 0}})
    with pytest.raises(ConfigError, match=r"sample.num_steps' must be >= 1"):
        load_config(path, EvalConfig)


def test_shipped_eval_config_loads_and_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/eval_tiny.yaml", EvalConfig, ["sample.num_steps=10", f"output_dir={tmp_path / 'run'}"])
    assert cfg.sample.num_steps == 10
    written = save_config(cfg, cfg.output_dir)
    again = load_config(written, EvalConfig)
    assert again == cfg


def test_yaml_no_is_read_as_the_string_choice(tmp_path):
    """YAML 1.1 parses `no` as False; a Literal['no', 'fp16', 'bf16'] key still gets 'no'."""
    from trainers.prdp import PRDPConfig

    path = _write(tmp_path, {"train": {"mixed_precision": False}})
    assert load_config(path, PRDPConfig).train.mixed_precision == "no"
    assert load_config(path, PRDPConfig, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        load_config(path, PRDPConfig, ["train.mixed_precision=yes"])
