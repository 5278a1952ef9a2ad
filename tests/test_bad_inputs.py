"""Every bad input is one line: a table of bad inputs to every subcommand and to the public Python API.

CLI cases run ``genreward.cli.main(argv)`` in-process (one model load per process instead of one per case) and
must return a non-zero code with exactly one ``genreward: error:`` line on stderr naming the file/key/value, no
traceback and nothing else on stderr (argparse errors keep their usage block above the line). Cases that point at
an existing run folder get a fresh copy of a real run (trained once per module) and check afterwards that no
file of it changed (sha256 of every file). API cases name the exception type and a message substring.

Adding a case is adding one row. Placeholders in CLI rows: ``{E}``/``{T}``/``{D}``/``{B}``/``{S}`` expand to a
quick eval / PRDP / DDPO / best-of-n / serve config (with quick overrides) and a fresh ``output_dir``;
``{tmp}`` is a fresh folder; ``{run}``/``{damaged}``/``{evalrun}`` a fresh copy of the fixture runs (checked
unchanged afterwards); ``{file}`` a plain file; ``{nowrite}`` a path no one can create (under /proc);
``{lora_corrupt}``, ``{lora_wide}``, ``{lora_renamed}`` LoRA files that cannot fit ``tiny:sd``; ``{cfg_*}`` YAML
files from :data:`CONFIG_FILES`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import shlex
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch

from genreward.cli import main
from genreward.errors import ConfigError, GenrewardError, OfflineModelError
from genreward.rewards.base import RewardOutput, register

NOWRITE = "/proc/genreward-no-such-dir/out"  # /proc refuses new entries, even for root


@register("test_nan_reward")
class _NaNReward:
    """Scores every image NaN (a reward that broke)."""

    differentiable = False

    def __init__(self):
        self.name = "test_nan_reward"

    def __call__(self, images, prompts, **context):
        return RewardOutput(scores=torch.full((images.shape[0],), float("nan")))


# ------------------------------------------------------------------------------------------- fixtures

QUICK_EVAL = "configs/eval_tiny.yaml eval.prompts.limit=1 eval.images_per_prompt=1 sample.num_steps=2 model.device=cpu"
QUICK_TRAIN = ("prdp.epochs=1 prdp.prompts_per_epoch=1 prdp.images_per_prompt=2 prdp.updates_per_epoch=1 sample.num_steps=2 "
               "eval.enabled=false logging.trackers=[] model.device=cpu")
QUICK_PRDP = f"configs/prdp_tiny_jpeg.yaml {QUICK_TRAIN} train.lora.rank=2"

CONFIG_FILES = {
    "bestofn": "output_dir: x\nmodel: {pipeline: 'tiny:sd', device: cpu}\nsample: {num_steps: 2}\n"
               "prompts: {path: animals, limit: 1}\nn: 2\ntop_k: 1\nreward: [{name: jpeg_compressibility}]\n",
    "serve": "output_dir: x\nreward: [{name: jpeg_compressibility}]\n",
    "serve_empty": "output_dir: x\nreward: []\n",
    "badyaml": "sample: [1, 2\n",
    "toplist": "- 1\n- 2\n",
    "notrainer": "output_dir: x\nprdp: {epochs: 1}\n",
    "missing_value": "trainer: prdp\nprompts:\n  path: '???'\n",
    "ddpo": "trainer: ddpo\nmodel: {pipeline: 'tiny:sd', device: cpu}\nsample: {num_steps: 2, batch_size: 8}\n"
            "prompts: {path: animals, limit: 4}\nreward: [{name: jpeg_compressibility}]\n"
            "ddpo: {epochs: 1, samples_per_epoch: 2, minibatch_size: 2}\ntrain: {lora: {rank: 2}}\n"
            "eval: {enabled: false}\nlogging: {trackers: []}\n",
}


def _sha_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Pristine fixture files, made once: a real PRDP run (LoRA rank 2, one checkpoint), a damaged copy of it, an
    evaluation run folder, broken LoRA files and small YAML configs."""
    from safetensors.torch import load_file, save_file

    from genreward.images import save_png

    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    rc = main(["train", *shlex.split(QUICK_PRDP), f"output_dir={run}"])
    assert rc == 0 and (run / "checkpoints" / "checkpoint-1" / "manifest.json").is_file()
    damaged = root / "damaged"
    shutil.copytree(run, damaged)
    weights = damaged / "checkpoints" / "checkpoint-1" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    evalrun = root / "evalrun"
    save_png(torch.rand(3, 32, 32), evalrun / "images" / "p0000_s00.png")
    (evalrun / "metrics.jsonl").write_text('{"prompt": "a cat", "image": "images/p0000_s00.png", "rewards": {"r": 1.0}}\n')
    (evalrun / "config.yaml").write_text("output_dir: x\n")
    (evalrun / "badjson").mkdir()
    (evalrun / "badjson" / "metrics.jsonl").write_text("{not json\n")
    files = SimpleNamespace(root=root, run=run, damaged=damaged, evalrun=evalrun)
    files.file = root / "a_file"
    files.file.write_text("not a folder\n")
    lora = load_file(str(run / "checkpoints" / "checkpoint-1" / "pytorch_lora_weights.safetensors"))
    files.lora_good = root / "good.safetensors"
    save_file(lora, str(files.lora_good))
    files.lora_corrupt = root / "corrupt.safetensors"
    files.lora_corrupt.write_bytes(b"\x00garbage, not safetensors" * 8)
    files.lora_wide = root / "wide.safetensors"  # a LoRA of a model with wider layers
    save_file({k: torch.zeros(v.shape[0], v.shape[1] + 16) if "lora_A" in k or "lora.down" in k else v
               for k, v in lora.items()}, str(files.lora_wide))
    files.lora_renamed = root / "renamed.safetensors"  # a LoRA of a model with more blocks
    save_file({k.replace("down_blocks.0", "down_blocks.7"): v for k, v in lora.items()}, str(files.lora_renamed))
    for name, text in CONFIG_FILES.items():
        path = root / f"cfg_{name}.yaml"
        path.write_text(text)
        setattr(files, f"cfg_{name}", path)
    files.cfg_prompts = root / "cfg_prompts.tsv"
    files.cfg_prompts.write_text("Prompt\tCategory\na cat\tAnimals\n")
    files.hashes = {name: _sha_tree(getattr(files, name)) for name in ("run", "damaged", "evalrun")}
    return files


# ------------------------------------------------------------------------------------------- CLI cases


@dataclass(frozen=True)
class Cli:
    id: str
    argv: str  # shell words with {placeholders}
    needle: str  # must appear in the one error line
    usage: bool = False  # an argparse error: its usage block may precede the line


CLI_CASES = [
    # --- the top-level parser
    Cli("no-command", "", "command", usage=True),
    Cli("unknown-command", "evl configs/eval_tiny.yaml", "'evl'", usage=True),
    Cli("unknown-flag", "--frobnicate eval configs/eval_tiny.yaml", "--frobnicate", usage=True),
    # --- train: config files and overrides
    Cli("train-no-config", "train", "config", usage=True),
    Cli("train-missing-file", "train {tmp}/nope.yaml", "nope.yaml"),
    Cli("train-bad-yaml", "train {cfg_badyaml}", "cfg_badyaml.yaml"),
    Cli("train-top-level-list", "train {cfg_toplist}", "top level must be a mapping"),
    Cli("train-no-trainer-key", "train {cfg_notrainer}", "'trainer'"),
    Cli("train-unknown-trainer", "train {T} trainer=ppo_magic", "ppo_magic"),
    Cli("train-unknown-key", "train {T} prdp.betta=1", "prdp.betta"),
    Cli("train-wrong-type", "train {T} prdp.epochs=many", "prdp.epochs"),
    Cli("train-override-no-equals", "train {T} prdp.epochs", "prdp.epochs"),
    Cli("train-override-empty-key", "train {T} =3", "=3"),
    Cli("train-list-index", "train {T} reward.5.weight=2", "reward.5.weight"),
    Cli("train-bad-choice", "train {T} train.mixed_precision=fp8", "train.mixed_precision"),
    Cli("train-missing-value", "train {cfg_missing_value}", "prompts.path"),
    Cli("train-images-per-prompt", "train {T} prdp.images_per_prompt=1", "prdp.images_per_prompt"),
    Cli("train-beta-zero", "train {T} prdp.beta=0", "prdp.beta"),
    Cli("train-num-steps-zero", "train {T} sample.num_steps=0", "sample.num_steps"),
    Cli("train-eta-negative", "train {T} sample.eta=-1", "sample.eta"),
    Cli("train-guidance-negative", "train {T} sample.guidance_scale=-1", "sample.guidance_scale"),
    Cli("train-height-not-multiple", "train {T} output_dir={run} checkpoint.resume_from=latest prdp.epochs=2 sample.height=33", "sample.height"),
    Cli("train-width-zero", "train {T} sample.width=0", "sample.width"),
    Cli("train-lora-rank-zero", "train {T} train.lora.rank=0", "train.lora.rank"),
    Cli("train-lora-targets-nomatch", "train {T} output_dir={run} checkpoint.resume_from=latest prdp.epochs=2 train.lora.targets=[nope]", "train.lora.targets"),
    Cli("train-lora-dropout-one", "train {T} train.lora.dropout=1", "train.lora.dropout"),
    Cli("train-lora-targets-empty", "train {T} train.lora.targets=[]", "train.lora.targets"),
    Cli("train-max-nonfinite-negative", "train {T} train.max_nonfinite_epochs=-1", "train.max_nonfinite_epochs"),
    Cli("train-chunk-size-zero", "train {T} train.chunk_size=0", "train.chunk_size"),
    Cli("train-total-limit-zero", "train {T} checkpoint.total_limit=0", "checkpoint.total_limit"),
    Cli("train-moved-batch-size", "train {T} train.batch_size=4", "train.chunk_size"),
    Cli("train-moved-every-epochs", "train {T} checkpoint.every_epochs=3", "checkpoint.every"),
    Cli("train-moved-eval-every", "train {T} eval.every_epochs=3", "eval.every"),
    Cli("train-sds3d-moved-resume", "train configs/sds3d_tiny.yaml output.resume=latest output_dir={tmp}/o", "checkpoint.resume_from"),
    Cli("train-unknown-reward", "train {T} reward.0.name=no_such_reward", "no_such_reward"),
    Cli("train-reward-bad-option", "train {T} reward.0.options.quality=500", "quality"),
    Cli("train-reward-unknown-option", "train {T} reward.0.options.colour=1", "colour"),
    Cli("train-missing-prompts", "train {T} prompts.path={tmp}/none.txt", "none.txt"),
    Cli("train-too-few-prompts", "train {T} prompts.limit=1 prdp.prompts_per_epoch=4", "prdp.prompts_per_epoch"),
    Cli("train-unknown-tracker", "train {T} logging.trackers=[bogus]", "bogus"),
    Cli("train-model-lora", "train {T} model.lora={lora_good}", "model.lora"),
    Cli("train-offline-hub-id", "train {T} model.pipeline=CompVis/stable-diffusion-v1-4", "CompVis/stable-diffusion-v1-4"),
    Cli("train-output-under-file", "train {T} output_dir={file}/run", "a_file"),
    Cli("train-output-unwritable", "train {T} output_dir={nowrite}", "/proc/genreward-no-such-dir"),
    Cli("train-into-earlier-run", "train {T} output_dir={run}", "holds an earlier run"),
    Cli("train-resume-missing", "train {T} output_dir={run} checkpoint.resume_from={tmp}/nope", "nope"),
    Cli("train-resume-damaged", "train {T} output_dir={damaged} checkpoint.resume_from={damaged}/checkpoints/checkpoint-1", "pytorch_lora_weights.safetensors"),
    Cli("train-resume-other-rank", "train {T} output_dir={run} checkpoint.resume_from=latest prdp.epochs=2 train.lora.rank=4", "rank"),
    Cli("train-resume-other-trainable", "train {T} output_dir={run} checkpoint.resume_from=latest prdp.epochs=2 train.trainable=full", "train.trainable"),
    Cli("train-all-rewards-nan", "train {T} reward.0.name=test_nan_reward prdp.epochs=6", "max_nonfinite_epochs"),
    Cli("train-ddpo-all-rewards-nan", "train {D} reward.0.name=test_nan_reward ddpo.epochs=6", "max_nonfinite_epochs"),
    Cli("train-ddpo-timestep-fraction", "train {D} ddpo.timestep_fraction=0", "ddpo.timestep_fraction"),
    Cli("train-rpo-bad-lambda", "train configs/rpo_tiny.yaml rpo.lambda_val=2 output_dir={tmp}/o", "rpo.lambda_val"),
    Cli("train-reward-model-unknown-key", "train configs/judge_easyvqa.yaml judge.nope=1 output_dir={tmp}/o", "nope"),
    # --- eval
    Cli("eval-no-config", "eval", "config", usage=True),
    Cli("eval-missing-file", "eval {tmp}/nope.yaml", "nope.yaml"),
    Cli("eval-unknown-key", "eval {E} sample.num_stepz=3", "sample.num_stepz"),
    Cli("eval-wrong-type", "eval {E} sample.num_steps=many", "sample.num_steps"),
    Cli("eval-bad-dtype", "eval {E} model.dtype=fp8", "model.dtype"),
    Cli("eval-missing-prompts", "eval {E} eval.prompts.path={tmp}/none.txt", "none.txt"),
    Cli("eval-missing-column", "eval {E} eval.prompts.path={cfg_prompts} eval.prompts.column=Text", "Text"),
    Cli("eval-images-per-prompt-zero", "eval {E} eval.images_per_prompt=0", "eval.images_per_prompt"),
    Cli("eval-unknown-reward", "eval {E} eval.rewards.0.name=no_such_reward", "no_such_reward"),
    Cli("eval-duplicate-reward", "eval {E} eval.rewards.1.name=jpeg_compressibility eval.rewards.1.options={{}}", "label"),
    Cli("eval-offline-hub-id", "eval {E} model.pipeline=CompVis/stable-diffusion-v1-4", "CompVis/stable-diffusion-v1-4"),
    Cli("eval-unknown-spec", "eval {E} model.pipeline=tiny:nope", "tiny:nope"),
    Cli("eval-missing-unet", "eval {E} model.unet={tmp}/no_unet", "no_unet"),
    Cli("eval-missing-lora", "eval {E} model.lora={tmp}/none.safetensors", "none.safetensors"),
    Cli("eval-corrupt-lora", "eval {E} model.lora={lora_corrupt}", "corrupt.safetensors"),
    Cli("eval-lora-other-shapes", "eval {E} model.lora={lora_wide}", "wide.safetensors"),
    Cli("eval-lora-other-modules", "eval {E} model.lora={lora_renamed}", "renamed.safetensors"),
    Cli("eval-guidance-negative", "eval {E} sample.guidance_scale=-1", "sample.guidance_scale"),
    Cli("eval-height-not-multiple", "eval {E} sample.height=33", "sample.height"),
    Cli("eval-output-under-file", "eval {E} output_dir={file}/eval", "a_file"),
    Cli("eval-output-unwritable", "eval {E} output_dir={nowrite}", "/proc/genreward-no-such-dir"),
    Cli("eval-into-training-run", "eval {E} output_dir={run}", "training run"),
    Cli("eval-bad-prompts-keeps-folder", "eval {E} output_dir={evalrun} eval.prompts.path={tmp}/none.txt", "none.txt"),
    # --- gallery
    Cli("gallery-no-run-dir", "gallery", "run_dir", usage=True),
    Cli("gallery-missing-run-dir", "gallery {tmp}/nope", "nope"),
    Cli("gallery-no-metrics", "gallery {tmp}", "metrics.jsonl"),
    Cli("gallery-bad-json", "gallery {evalrun}/badjson", "metrics.jsonl:1"),
    Cli("gallery-missing-compare", "gallery {evalrun} --compare {tmp}/nope", "nope"),
    Cli("gallery-out-unwritable", "gallery {evalrun} --out {nowrite}/g.html", "/proc/genreward-no-such-dir"),
    Cli("gallery-out-under-file", "gallery {evalrun} --out {file}/g.html", "a_file"),
    Cli("gallery-out-is-folder", "gallery {evalrun} --out {tmp}", "is a folder"),
    Cli("gallery-of-training-run", "gallery {run}", "training run"),
    # --- best-of-n
    Cli("bestofn-no-config", "best-of-n", "config", usage=True),
    Cli("bestofn-missing-file", "best-of-n {tmp}/nope.yaml", "nope.yaml"),
    Cli("bestofn-top-k", "best-of-n {B} top_k=5", "top_k"),
    Cli("bestofn-pairwise-without-judge", "best-of-n {B} ranking=pairwise_wins", "pairwise_wins"),
    Cli("bestofn-corrupt-lora", "best-of-n {B} model.lora={lora_corrupt}", "corrupt.safetensors"),
    Cli("bestofn-output-under-file", "best-of-n {B} output_dir={file}/b", "a_file"),
    Cli("bestofn-guidance-negative", "best-of-n {B} sample.guidance_scale=-1", "sample.guidance_scale"),
    # --- serve-reward: argument errors only (nothing binds: make_server is replaced by a trap)
    Cli("serve-no-config", "serve-reward", "config", usage=True),
    Cli("serve-port-not-int", "serve-reward {S} --port http", "--port", usage=True),
    Cli("serve-missing-file", "serve-reward {tmp}/nope.yaml", "nope.yaml"),
    Cli("serve-port-range", "serve-reward {S} --port 70000", "--port"),
    Cli("serve-max-batch", "serve-reward {S} --max-batch 0", "--max-batch"),
    Cli("serve-max-body", "serve-reward {S} --max-body-mb 0", "--max-body-mb"),
    Cli("serve-public-host", "serve-reward {S} --host 0.0.0.0", "--allow-remote"),
    Cli("serve-no-reward", "serve-reward {cfg_serve_empty}", "reward"),
    Cli("serve-unknown-reward", "serve-reward {S} reward.0.name=no_such_reward", "no_such_reward"),
]

_TQDM = re.compile(r"\d+%\|")  # progress bars share stderr; they are not error lines


def _expand(case: Cli, world, tmp: Path) -> tuple[list[str], dict[str, Path]]:
    copies: dict[str, Path] = {}

    def copy(name: str) -> str:
        if name not in copies:
            copies[name] = tmp / f"copy_{name}"
            shutil.copytree(getattr(world, name), copies[name])
        return str(copies[name])

    fields: dict[str, Any] = {
        "tmp": str(tmp), "file": str(world.file), "nowrite": NOWRITE,
        "E": f"{QUICK_EVAL} output_dir={tmp}/out", "T": f"{QUICK_PRDP} output_dir={tmp}/out",
        "D": f"{world.cfg_ddpo} output_dir={tmp}/out", "B": f"{world.cfg_bestofn} output_dir={tmp}/out",
        "S": f"{world.cfg_serve} output_dir={tmp}/out",
    }
    for name in vars(world):
        if name.startswith(("lora_", "cfg_")):
            fields[name] = str(getattr(world, name))
    for name in ("run", "damaged", "evalrun"):
        if "{" + name + "}" in case.argv:
            fields[name] = copy(name)
    return shlex.split(case.argv.format(**fields)), copies


def _check_cli(case: Cli, world, tmp: Path, capfd, caplog) -> str | None:
    """None if the case is clean, else what is wrong with it."""
    argv, copies = _expand(case, world, tmp)
    capfd.readouterr()
    caplog.clear()
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    except BaseException:  # noqa: BLE001 - the real CLI would print this traceback
        rc = "raised:\n" + traceback.format_exc(limit=-3)
    _, err = capfd.readouterr()
    problems = []
    if not isinstance(rc, int) or rc == 0:
        problems.append(f"return code {rc!r}")
    if "Traceback" in err:
        problems.append("a traceback on stderr")
    lines = [line for line in err.splitlines() if line.strip() and not _TQDM.search(line)]
    errors = [line for line in lines if line.startswith("genreward: error:")]
    if len(errors) != 1:
        problems.append(f"{len(errors)} 'genreward: error:' lines")
    elif case.needle not in errors[0]:
        problems.append(f"{case.needle!r} not in {errors[0]!r}")
    if not case.usage and len(lines) > len(errors):
        problems.append("other lines on stderr: " + " | ".join(line for line in lines if line not in errors)[:300])
    noise = [f"{r.name}: {r.getMessage()[:120]}" for r in caplog.records
             if r.levelno >= logging.WARNING and not r.name.startswith("genreward")]
    if noise:
        problems.append("library log lines: " + " | ".join(noise)[:300])
    for name, copy in copies.items():
        if _sha_tree(copy) != world.hashes[name]:
            problems.append(f"the {name} folder changed")
    return "; ".join(problems) or None


@pytest.fixture()
def no_serving(monkeypatch):
    import genreward.serve

    def trap(*args, **kwargs):
        raise AssertionError("a bad serve-reward input reached make_server")

    monkeypatch.setattr(genreward.serve, "make_server", trap)


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input_is_one_line(case, world, tmp_path, capfd, caplog, no_serving):
    problem = _check_cli(case, world, tmp_path, capfd, caplog)
    assert problem is None, f"{case.id}: {problem}"


# ------------------------------------------------------------------------------------------- API cases


def _images(scale: float = 1.0, shift: float = 0.0, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * scale + shift


def _jpeg(images, prompts=("a", "b")):
    from genreward.rewards import build

    return build("jpeg_compressibility")(images, list(prompts))


def _clip(images, prompts=("a", "b")):
    from genreward.rewards import build

    return build("clip_score", model="tiny:clip")(images, list(prompts))


def _sample(pipe, **kwargs):
    from genreward.sampling import sample_trajectories

    return sample_trajectories(pipe, kwargs.pop("prompts", ["a cat"]), **{"num_steps": 2, **kwargs})


def _eval_config(**sample):
    from genreward.config import config_from_dict
    from genreward.schema import EvalConfig

    return config_from_dict({"output_dir": "x", "sample": sample}, EvalConfig)


def _moved(data: dict):
    """The generic renamed-key mechanism on a small schema (one key renamed in place, one moved to another section)."""
    from dataclasses import field, make_dataclass

    from genreward.config import config_from_dict

    inner = make_dataclass("Inner", [("every", int, 1)], namespace={"__moved_keys__": {"every_epochs": "every"}})
    ckpt = make_dataclass("Ckpt", [("resume_from", str, "")])
    out = make_dataclass("Out", [("render_every", int, 0)], namespace={"__moved_keys__": {"resume": "checkpoint.resume_from"}})
    top = make_dataclass("Top", [("inner", inner, field(default_factory=inner)), ("checkpoint", ckpt, field(default_factory=ckpt)),
                                 ("output", out, field(default_factory=out))],
                         namespace={"__moved_keys__": {"checkpoint_every": "inner.every", "output.resume_every": "inner.every"}})
    return config_from_dict(data, top)


def _lora_pipe(path):
    from genreward.models import load_pipeline

    return load_pipeline("tiny:sd", device="cpu", lora=str(path))


def _prompts(path, **kw):
    from genreward.prompts import load_prompts
    from genreward.schema import PromptsConfig

    return load_prompts(PromptsConfig(path=str(path), **kw))


@dataclass(frozen=True)
class Api:
    id: str
    call: Callable[[Any], Any]  # gets the fixture namespace (with .pipe and .tmp)
    exc: type[BaseException]
    needle: str


API_CASES = [
    # configs
    Api("config-missing-file", lambda f: __import__("genreward.config").config.read_yaml(f.tmp / "nope.yaml"), ConfigError, "nope.yaml"),
    Api("config-unknown-key", lambda f: _eval_config(num_stepz=3), ConfigError, "sample.num_stepz"),
    Api("config-guidance-negative", lambda f: _eval_config(guidance_scale=-1), ConfigError, "sample.guidance_scale"),
    Api("config-height-zero", lambda f: _eval_config(height=0), ConfigError, "sample.height"),
    Api("config-moved-in-place", lambda f: _moved({"inner": {"every_epochs": 2}}), ConfigError, "use 'inner.every'"),
    Api("config-moved-to-section", lambda f: _moved({"output": {"resume": "latest"}}), ConfigError, "use 'checkpoint.resume_from'"),
    Api("config-moved-top-level", lambda f: _moved({"checkpoint_every": 2}), ConfigError, "use 'inner.every'"),
    Api("config-moved-dotted-old-key", lambda f: _moved({"output": {"resume_every": 2}}), ConfigError, "use 'inner.every'"),
    # prompts
    Api("prompts-missing", lambda f: _prompts(f.tmp / "none.txt"), GenrewardError, "none.txt"),
    Api("prompts-missing-column", lambda f: _prompts(f.world.cfg_prompts, column="Text"), GenrewardError, "Text"),
    # models and LoRAs
    Api("pipeline-offline-hub-id", lambda f: __import__("genreward.models").models.load_pipeline("CompVis/stable-diffusion-v1-4"), OfflineModelError, "CompVis/stable-diffusion-v1-4"),
    Api("pipeline-unknown-spec", lambda f: __import__("genreward.models").models.load_pipeline("tiny:nope"), GenrewardError, "tiny:nope"),
    Api("lora-missing", lambda f: _lora_pipe(f.tmp / "none.safetensors"), GenrewardError, "none.safetensors"),
    Api("lora-corrupt", lambda f: _lora_pipe(f.world.lora_corrupt), GenrewardError, "corrupt.safetensors"),
    Api("lora-other-shapes", lambda f: _lora_pipe(f.world.lora_wide), GenrewardError, "wide.safetensors"),
    Api("lora-other-modules", lambda f: _lora_pipe(f.world.lora_renamed), GenrewardError, "renamed.safetensors"),
    Api("clip-unknown-spec", lambda f: __import__("genreward.models.clip").models.clip.load_clip("tiny:nope"), GenrewardError, "tiny:nope"),
    # sampling
    Api("sample-num-steps-zero", lambda f: _sample(f.pipe, num_steps=0), GenrewardError, "num_steps"),
    Api("sample-guidance-negative", lambda f: _sample(f.pipe, guidance_scale=-1.0), GenrewardError, "guidance_scale"),
    Api("sample-height-not-multiple", lambda f: _sample(f.pipe, height=33), GenrewardError, "height=33"),
    Api("sample-no-prompts", lambda f: _sample(f.pipe, prompts=[]), GenrewardError, "prompt"),
    Api("sample-seed-count", lambda f: _sample(f.pipe, seeds=[1, 2]), GenrewardError, "seeds"),
    # rewards and images
    Api("reward-unknown", lambda f: __import__("genreward.rewards").rewards.build("no_such_reward"), GenrewardError, "no_such_reward"),
    Api("reward-unknown-option", lambda f: __import__("genreward.rewards").rewards.build("jpeg_compressibility", colour=1), GenrewardError, "colour"),
    Api("reward-0-255-images", lambda f: _jpeg(_images(255.0)), GenrewardError, "[0, 1]"),
    Api("reward-minus1-1-images", lambda f: _jpeg(_images(2.0, -1.0)), GenrewardError, "[0, 1]"),
    Api("clip-0-255-images", lambda f: _clip(_images(255.0)), GenrewardError, "[0, 1]"),
    Api("clip-minus1-1-images", lambda f: _clip(_images(2.0, -1.0)), GenrewardError, "[0, 1]"),
    Api("reward-uint8-images", lambda f: _jpeg((_images() * 255).to(torch.uint8)), GenrewardError, "float"),
    Api("reward-wrong-shape", lambda f: _clip(torch.rand(2, 32, 32)), GenrewardError, "[B,3,H,W]"),
    Api("reward-prompt-count", lambda f: _clip(_images(), prompts=("a",)), GenrewardError, "one prompt per image"),
    Api("reward-hub-file-offline", lambda f: __import__("genreward.rewards").rewards.build("hpsv2"), OfflineModelError, "xswu/HPSv2"),
    # checkpoints and run folders
    Api("checkpoint-no-state", lambda f: _run_dir(f).load_state(f.tmp), GenrewardError, "trainer_state.json"),
    Api("checkpoint-lora-other-rank", lambda f: _load_lora_into(f, rank=4), GenrewardError, "rank"),
    Api("gallery-out-unwritable", lambda f: __import__("genreward.gallery").gallery.write_gallery(f.world.evalrun, out_path=NOWRITE + "/g.html"), GenrewardError, "/proc/genreward-no-such-dir"),
    Api("output-dir-under-file", lambda f: __import__("genreward.config").config.check_output_dir(f.world.file / "x"), GenrewardError, "a_file"),
]


def _run_dir(f):
    from trainers.run_dir import CheckpointSection, RunDir

    return RunDir(f.tmp, "epoch", CheckpointSection())


def _load_lora_into(f, rank: int):
    """A rank-``rank`` LoRA U-Net loading the fixture run's rank-2 checkpoint."""
    import copy

    from peft import LoraConfig

    from trainers.common import load_unet_weights

    unet = copy.deepcopy(f.pipe.unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    load_unet_weights(unet, f.world.run / "checkpoints" / "checkpoint-1", "lora")


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_api_bad_input_raises_one_line(case, world, tiny_pipe, tmp_path):
    f = SimpleNamespace(world=world, pipe=tiny_pipe, tmp=tmp_path)
    with pytest.raises(case.exc) as info:
        case.call(f)
    message = str(info.value)
    assert case.needle in message and "\n" not in message, message


# ------------------------------------------------------------------------------------------- behaviours


def test_nan_image_scores_nan(world):
    """An image with non-finite pixels has no meaningful score: every reward gives NaN for it (trainers skip
    non-finite rewards, evaluation records null), and the other images of the batch are scored as usual."""
    images = _images()
    images[1] = float("nan")
    for scores in (_jpeg(images).scores, _clip(images).scores):
        assert math.isfinite(float(scores[0])) and math.isnan(float(scores[1])), scores


def test_nan_rewards_stop_after_max_nonfinite_epochs(tmp_path, capfd):
    """Every reward NaN: the run stops after train.max_nonfinite_epochs epochs (logged), not at the end with exit 0."""
    out = tmp_path / "nan"
    rc = main(["train", *shlex.split(QUICK_PRDP), f"output_dir={out}", "reward.0.name=test_nan_reward", "prdp.epochs=5",
               "train.max_nonfinite_epochs=2"])
    err = capfd.readouterr().err
    assert rc == 2 and "epochs 1-2" in err, err
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 2


def test_range_tolerance_accepts_float_error():
    """Values a few 1e-3 outside [0, 1] (VAE decode rounding, resampling overshoot) are accepted."""
    images = _images().clamp(0, 1)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = -3e-3, 1.003
    assert _jpeg(images).scores.shape == (2,)


def test_unreachable_hub_fails_fast_and_quietly(monkeypatch, capfd, caplog, tmp_path):
    """Hub switched on but unreachable: one OfflineModelError line at once, not minutes of retry warnings."""
    from huggingface_hub import constants

    from genreward.models import hub

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_reachable", {})  # probe afresh
    from genreward.models import load_pipeline
    from genreward.rewards import build

    for make, needle in ((lambda: build("laion_aesthetic"), "trl-lib/ddpo-aesthetic-predictor"),
                         (lambda: load_pipeline("CompVis/stable-diffusion-v1-4"), "CompVis/stable-diffusion-v1-4")):
        capfd.readouterr()
        caplog.clear()
        start = time.perf_counter()
        with pytest.raises(OfflineModelError) as info:
            make()
        elapsed = time.perf_counter() - start
        message = str(info.value)
        _, err = capfd.readouterr()
        assert elapsed < 5, f"{elapsed:.1f}s before the error"
        assert needle in message and "unreachable" in message, message
        assert not err.strip(), err
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]


def test_long_library_messages_are_cut_at_a_word():
    from genreward.models.hub import first_line

    text = ("Cannot load model CompVis/stable-diffusion-v1-4: the model is not fully cached locally (Cannot find an "
            "appropriate cached snapshot folder for the specified revision on the local disk and outgoing traffic "
            "has been disabled)\nsecond line")
    cut = first_line(OSError(text), limit=120)
    assert cut.endswith("…") and len(cut) <= 121 and "second" not in cut, cut
    assert text.startswith(cut[:-1].rstrip()) and text[len(cut[:-1].rstrip())] in " ,;:(", cut
    assert first_line(OSError("short message")) == "short message"


def test_train_help_lists_trainers_without_importing_them():
    import subprocess
    import sys

    from trainers import TRAINERS

    code = ("import sys; from genreward.cli import main\ntry: main(['train', '--help'])\nexcept SystemExit: pass\n"
            "print('IMPORTED', sorted(m for m in sys.modules if m.startswith('trainers.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert all(name in proc.stdout for name in TRAINERS), proc.stdout
    assert "README.md" in proc.stdout, proc.stdout
    assert "IMPORTED []" in proc.stdout, proc.stdout


def test_unknown_command_hint_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["evl"])
    err = capsys.readouterr().err
    hint = [line for line in err.splitlines() if "genreward COMMAND --help" in line]
    assert len(hint) == 1 and all(c in hint[0] for c in ("train", "eval", "gallery", "best-of-n", "serve-reward")), err
