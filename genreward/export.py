"""``genreward export``: a training run (or one of its checkpoints) → a diffusers folder a user can push to a hub.

* From a run folder (``config.yaml`` + ``checkpoints/checkpoint-<N>/``) the newest checkpoint whose
  ``manifest.json`` verifies (every listed file has its size and sha256) is used; a checkpoint folder given
  directly must verify too. The run's ``config.yaml`` names the base model (``model.pipeline``/``model.unet``).
* Default: a complete pipeline folder (``pipe.save_pretrained``) with the fine-tuned weights in it: a LoRA
  (``pytorch_lora_weights.safetensors``) fused into the U-Net, or a full U-Net (``unet/``) in place of the
  base's. ``lora_only``: just the adapter, in diffusers format. Either way ``README.md`` is a model card
  (base, trainer, rewards, units done, before/after evaluation means, how it was made).
* A LoRA trained with ``train.lora.alpha`` ≠ rank has its scale ``alpha/rank`` folded into the up weights, so
  the written adapter (or the fused U-Net) gives the trained model with diffusers' default scale 1.
* An nft checkpoint's eval-EMA adapter (``ema/``) is what the run evaluated, so it is exported by default.
* Everything is checked before a model loads, and the output is written into a temporary sibling folder that
  is renamed into place at the end: a failed export leaves no half-written ``OUT``.

Only the few lines of checkpoint verification needed here are repeated from ``trainers.run_dir`` (genreward/
must not import trainers/, tests/test_layering.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genreward.errors import GenrewardError

LORA_FILE = "pytorch_lora_weights.safetensors"
MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
EMA_FOLDER = "ema"
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------------- checkpoints


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_problem(folder: Path) -> str | None:
    """None if ``folder``'s manifest lists ``trainer_state.json`` and every listed file has its size and sha256."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (the checkpoint was not completed)"
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        if STATE_FILE not in entries:
            return f"{manifest} does not list {STATE_FILE}"
        for rel, want in entries.items():
            path = Path(folder) / rel
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != want.get("size") or _sha256(path) != want.get("sha256"):
                return f"{path} does not match its size/sha256 in the manifest (damaged or changed)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest} is not a valid manifest"
    return None


def resolve_checkpoint(source: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint folder, run folder or None)`` for a run folder or a checkpoint folder; one line otherwise."""
    src = Path(source).expanduser()
    if not src.is_dir():
        raise GenrewardError(f"{source} {'is not a folder' if src.exists() else 'does not exist'}: "
                             "give a training run folder (output_dir) or one of its checkpoints/checkpoint-<N> folders")
    if (src / MANIFEST).is_file() or (src / STATE_FILE).is_file():
        problem = checkpoint_problem(src)
        if problem:
            raise GenrewardError(f"checkpoint {src} does not verify: {problem}")
        run = src.parent.parent if src.parent.name == "checkpoints" and (src.parent.parent / "config.yaml").is_file() else None
        return src, run
    checkpoints = src / "checkpoints"
    if not (src / "config.yaml").is_file() or not checkpoints.is_dir():
        raise GenrewardError(f"{source} is not a training run folder (no config.yaml and checkpoints/) nor a checkpoint "
                             f"folder (no {MANIFEST})")
    found = sorted(((int(m.group(1)), p) for p in checkpoints.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.fullmatch(p.name))),
                   reverse=True)
    skipped = []
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, src
        skipped.append(f"{path.name}: {problem}")
    detail = f" ({'; '.join(skipped)})" if skipped else " (checkpoints/ is empty)"
    raise GenrewardError(f"run folder {source} has no verified checkpoint{detail}")


# ------------------------------------------------------------------------------------------------ export


@dataclass
class ExportPlan:
    checkpoint: Path
    run: Path | None
    config: dict
    state: dict
    kind: str  # "lora" or "unet"
    weights: Path  # the LoRA file or the unet/ folder
    ema: bool
    out: Path


def plan_export(source: str | Path, out: str | Path, lora_only: bool = False, ema: bool | None = None,
                base: str | None = None) -> ExportPlan:
    """Every check, nothing loaded or written: the checkpoint, its weights, the base model's name and ``out``."""
    from genreward.config import check_output_dir, read_yaml

    ckpt, run = resolve_checkpoint(source)
    config = read_yaml(run / "config.yaml") if run is not None else {}
    if base is not None:
        config = {**config, "model": {**(config.get("model") or {}), "pipeline": base}}
    if not (config.get("model") or {}).get("pipeline"):
        raise GenrewardError(f"no config.yaml found for checkpoint {ckpt} (looked in {ckpt.parent.parent}) and so no base "
                             "model: export from the run folder, or name the base with --base")
    try:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    ema_file = ckpt / EMA_FOLDER / LORA_FILE
    use_ema = ema_file.is_file() if ema is None else bool(ema)
    if use_ema and not ema_file.is_file():
        raise GenrewardError(f"checkpoint {ckpt} holds no EMA weights ({EMA_FOLDER}/{LORA_FILE})")
    if use_ema:
        kind, weights = "lora", ema_file
    elif (ckpt / LORA_FILE).is_file():
        kind, weights = "lora", ckpt / LORA_FILE
    elif (ckpt / "unet").is_dir():
        kind, weights = "unet", ckpt / "unet"
    else:
        raise GenrewardError(f"checkpoint {ckpt} holds neither LoRA weights ({LORA_FILE}) nor a U-Net (unet/): nothing to "
                             f"export (trainer {config.get('trainer', '?')!r} does not fine-tune a diffusion U-Net?)")
    if lora_only and kind != "lora":
        raise GenrewardError(f"--lora-only needs a LoRA checkpoint, but {ckpt} holds a full U-Net (unet/); export the "
                             "whole pipeline instead")
    target = check_output_dir(out, key="OUT")
    if target.is_dir() and any(target.iterdir()):
        raise GenrewardError(f"OUT {out} exists and is not empty: choose a new folder (nothing was written)")
    if target.resolve() == ckpt.resolve() or ckpt.resolve() in target.resolve().parents:
        raise GenrewardError(f"OUT {out} lies inside the checkpoint {ckpt}: choose a folder outside it")
    return ExportPlan(ckpt, run, config, state, kind, weights, use_ema, target)


def _lora_scale(config: dict) -> float:
    lora = ((config.get("train") or {}).get("lora") or {})
    rank, alpha = lora.get("rank"), lora.get("alpha")
    return float(alpha) / float(rank) if alpha is not None and rank else 1.0


def write_adapter(src: Path, dst: Path, scale: float = 1.0) -> Path:
    """Copy a diffusers LoRA file to ``dst/pytorch_lora_weights.safetensors``, its up weights times ``scale``."""
    dst.mkdir(parents=True, exist_ok=True)
    if scale == 1.0:
        shutil.copyfile(src, dst / LORA_FILE)
        return dst / LORA_FILE
    from safetensors.torch import load_file, save_file

    state = load_file(str(src))
    up = (".lora.up.", ".lora_B.", ".lora_up.")
    state = {k: v * scale if any(u in k for u in up) else v for k, v in state.items()}
    save_file(state, str(dst / LORA_FILE), metadata={"format": "pt"})
    return dst / LORA_FILE


def export(source: str | Path, out: str | Path, lora_only: bool = False, ema: bool | None = None,
           base: str | None = None) -> Path:
    """Write the exported model and its ``README.md`` into ``out`` (see the module docstring); returns ``out``."""
    plan = plan_export(source, out, lora_only=lora_only, ema=ema, base=base)
    target = plan.out
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.parent / f".{target.name}.export-tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        scale = _lora_scale(plan.config) if plan.kind == "lora" else 1.0
        if lora_only:
            write_adapter(plan.weights, stage, scale)
        else:
            _write_pipeline(plan, stage, scale)
        (stage / "README.md").write_text(model_card(plan, lora_only, scale), encoding="utf-8")
        if target.is_dir():
            target.rmdir()  # empty (checked above)
        os.replace(stage, target)
    except OSError as exc:
        raise GenrewardError(f"cannot write OUT {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def _write_pipeline(plan: ExportPlan, stage: Path, scale: float) -> None:
    from genreward.models import load_pipeline

    model = plan.config.get("model") or {}
    if plan.kind == "unet":
        pipe = load_pipeline(model["pipeline"], device="cpu", dtype="fp32", unet=str(plan.weights))
    else:
        adapter = write_adapter(plan.weights, stage / ".adapter", scale)
        pipe = load_pipeline(model["pipeline"], device="cpu", dtype="fp32", unet=model.get("unet"), lora=str(adapter.parent))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        shutil.rmtree(stage / ".adapter")
    pipe.save_pretrained(str(stage), safe_serialization=True)


# -------------------------------------------------------------------------------------------- model card


def _read_summary(folder: Path) -> dict[str, float] | None:
    try:
        data = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {str(k): v for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else None


def _total_units(config: dict, unit: str) -> int | None:
    section = config.get(str(config.get("trainer"))) or {}
    keys = ("epochs",) if unit == "epoch" else ("max_train_steps", "max_steps", "steps")
    for key in keys:
        if isinstance(section.get(key), int):
            return section[key]
    return None


def _evaluation(plan: ExportPlan, done: int | None, total: int | None) -> tuple[dict | None, dict | None, str]:
    """(before, after, which eval folder 'after' is) — 'after' only from an evaluation of this very checkpoint."""
    if plan.run is None:
        return None, None, ""
    evals = plan.run / "eval"
    before = _read_summary(evals / "before")
    newest = max((int(m.group(1)) for p in (plan.run / "checkpoints").iterdir() if (m := _CHECKPOINT_RE.fullmatch(p.name))),
                 default=None)
    if done is not None and (done == total or (total is None and done == newest)) and _read_summary(evals / "final"):
        return before, _read_summary(evals / "final"), "eval/final"
    tag = f"epoch_{done:05d}" if done is not None else ""
    if tag and _read_summary(evals / tag):
        return before, _read_summary(evals / tag), f"eval/{tag}"
    return before, None, ""


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(plan: ExportPlan, lora_only: bool, scale: float = 1.0) -> str:
    """A hub-ready README.md: YAML front matter, what the model is, how it was trained, evaluated and made."""
    import genreward

    cfg = plan.config
    model = cfg.get("model") or {}
    base, base_unet = str(model.get("pipeline")), model.get("unet")
    trainer = str(cfg.get("trainer", "unknown"))
    train = cfg.get("train") or {}
    unit = str(plan.state.get("unit", "epoch"))
    done = plan.state.get("done") if isinstance(plan.state.get("done"), int) else None
    total = _total_units(cfg, unit)
    on_hub = bool(_HUB_ID_RE.match(base)) and not Path(base).exists()
    tags = ["diffusers", "text-to-image", "genreward", trainer] + (["lora"] if plan.kind == "lora" else [])
    lines = ["---", "library_name: diffusers", "pipeline_tag: text-to-image"]
    if on_hub:
        lines.append(f"base_model: {base}")
    lines += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    what = "LoRA adapter" if lora_only else "pipeline"
    lines += [f"# {plan.out.name}", "",
              f"A {what} for `{base}` fine-tuned with the **{trainer}** trainer of genreward (reward fine-tuning of "
              "diffusion models).", ""]

    lines += ["## Training", "", f"- base model: `{base}`" + ("" if on_hub else " (not a hub id: a genreward built-in or local model)")]
    if base_unet:
        lines.append(f"- base U-Net: `{base_unet}` (replaced the pipeline's U-Net before training)")
    lines.append(f"- trainer: `{trainer}`")
    rewards = cfg.get("reward") or []
    if isinstance(rewards, dict):
        rewards = [rewards]
    for r in rewards:
        if isinstance(r, dict):
            extras = [f"weight {_fmt(r['weight'])}"] if r.get("weight") not in (None, 1.0) else []
            extras += [f"label `{r['label']}`"] if r.get("label") else []
            extras += [f"options `{json.dumps(r['options'], sort_keys=True)}`"] if r.get("options") else []
            lines.append(f"- reward: `{r.get('name')}`" + (f" ({', '.join(extras)})" if extras else ""))
    progress = f"{done}" + (f" of {total}" if total is not None else "") if done is not None else "unknown"
    lines.append(f"- {unit}s done: {progress} (checkpoint `{plan.checkpoint.name}`)")
    if plan.kind == "lora":
        lora = train.get("lora") or {}
        lines.append(f"- trained weights: LoRA rank {lora.get('rank', '?')}, alpha {lora.get('alpha') or lora.get('rank', '?')}, "
                     f"on {', '.join(map(str, lora.get('targets') or [])) or 'the attention projections'}"
                     + (" (the eval-EMA of the LoRA, which the run evaluated)" if plan.ema else ""))
    else:
        lines.append("- trained weights: the full U-Net")
    optim, sample, prompts = train.get("optim") or {}, cfg.get("sample") or {}, cfg.get("prompts") or {}
    if optim.get("lr") is not None:
        lines.append(f"- learning rate {_fmt(optim['lr'])}, seed {train.get('seed', '?')}, "
                     f"mixed precision `{train.get('mixed_precision', 'no')}`")
    if sample:
        lines.append(f"- sampling: {sample.get('num_steps')} DDIM steps, guidance scale {_fmt(sample.get('guidance_scale'))}, "
                     f"eta {_fmt(sample.get('eta'))}")
    if prompts.get("path"):
        lines.append(f"- training prompts: `{prompts['path']}`" + (f" (first {prompts['limit']})" if prompts.get("limit") else ""))
    trainer_section = cfg.get(trainer)
    if isinstance(trainer_section, dict) and trainer_section:
        lines.append(f"- `{trainer}` settings: `{json.dumps(trainer_section, sort_keys=True)}`")
    lines.append("")

    before, after, where = _evaluation(plan, done, total)
    lines += ["## Evaluation", ""]
    if before or after:
        ev = cfg.get("eval") or {}
        ep = ev.get("prompts") or {}
        lines.append(f"Mean reward over held-out prompts (`{ep.get('path', '?')}`" + (f", first {ep['limit']}" if ep.get("limit") else "")
                     + f", {ev.get('images_per_prompt', '?')} image(s) per prompt, seed {ev.get('seed', '?')}), from the run's "
                     f"`eval/before/summary.json`" + (f" and `{where}/summary.json`" if after else "") + ":")
        lines += ["", "| reward | before | after | change |", "|---|---|---|---|"]
        for name in list(dict.fromkeys([*(before or {}), *(after or {})])):
            b, a = (before or {}).get(name), (after or {}).get(name)
            change = f"{a - b:+.4g}" if a is not None and b is not None else "–"
            lines.append(f"| {name} | {_fmt(b) if b is not None else '–'} | {_fmt(a) if a is not None else '–'} | {change} |")
        if not after:
            lines += ["", f"The run folder holds no evaluation of this checkpoint ({plan.checkpoint.name}); only the base model's."]
    else:
        lines.append("No evaluation summary was found in the run folder (eval disabled, or exported from a lone checkpoint).")
    lines.append("")

    lines += ["## Usage", "", "```python", "from diffusers import DiffusionPipeline", ""]
    if lora_only:
        lines += [f'pipe = DiffusionPipeline.from_pretrained("{base if on_hub else "<base model>"}")',
                  f'pipe.load_lora_weights("<this repo or folder>")  # {LORA_FILE}']
    else:
        lines += ['pipe = DiffusionPipeline.from_pretrained("<this repo or folder>")']
    lines += ['image = pipe("a photo of a cat", num_inference_steps=50).images[0]', "```", ""]
    if lora_only and not on_hub:
        lines += [f"The base `{base}` is not on a hub; genreward loads it with "
                  f"`genreward.models.load_pipeline({base!r}, lora=<this folder>)`.", ""]

    how = (f"Exported on {time.strftime('%Y-%m-%d')} with genreward {genreward.__version__} (`genreward export"
           f"{' --lora-only' if lora_only else ''}`) from `{plan.checkpoint.name}`, whose files were first checked against "
           "the sha256 sums in its manifest. ")
    if lora_only:
        how += f"The adapter is in diffusers format (`{LORA_FILE}`, U-Net layers only)"
    elif plan.kind == "lora":
        how += "The base pipeline was loaded, the LoRA loaded with `load_lora_weights`, merged with `fuse_lora` and unloaded, " \
               "and the pipeline saved with `save_pretrained` (fp32 safetensors, DDIM scheduler, no safety checker)"
    else:
        how += "The fine-tuned U-Net replaced the base pipeline's, and the pipeline was saved with `save_pretrained` " \
               "(fp32 safetensors, DDIM scheduler, no safety checker)"
    if scale != 1.0:
        how += (f"; the LoRA scale alpha/rank = {scale:.4g} is folded into its up weights, so diffusers' default scale 1 "
                "gives the trained model")
    lines += ["## How this was made", "", how + ".", ""]
    return "\n".join(lines)
