"""Training machinery shared by every diffusion trainer (PRDP, DDPO, RPO), written once.

What lives here: config sections for training; accelerate set-up (mixed precision, TF32, seeds, trackers);
which parameters train (LoRA on the U-Net's attention projections via peft, or the full U-Net) and the frozen
reference model; the optimiser; batched log-prob passes over stored trajectories (no-grad and weighted
backward); checkpoint save/resume (accelerate state + diffusers-format weights); metrics.jsonl; periodic
evaluation and the before/after gallery.

Multi-process rules (the bugs users hit elsewhere): the U-Net is wrapped by ``accelerator.prepare`` *after*
the LoRA adapters are injected, so DDP all-reduces the LoRA gradients; every rank calls ``save_state``
(only file writes are main-process-only), so saving never deadlocks; no-grad passes use the unwrapped
module so that ranks need not call DDP forwards in lockstep.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import re
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch

from genreward.config import save_config, to_dict
from genreward.errors import GenrewardError
from genreward.jsonl import append_jsonl, read_jsonl
from genreward.models.device import resolve_dtype
from genreward.prompts import PromptItem, load_prompts
from genreward.rewards.base import Reward, RewardSpec, build_from_spec
from genreward.sampling import Trajectory, step_log_prob
from genreward.schema import EvalSection, ModelConfig, PromptsConfig, SampleConfig

log = logging.getLogger("genreward.train")

LORA_TARGETS_DEFAULT = ["to_q", "to_k", "to_v", "to_out.0"]


# ----------------------------------------------------------------------------------------------- config


@dataclass
class LoraSection:
    """LoRA on the U-Net (peft). ``alpha`` None = ``rank`` (scale 1)."""

    rank: int = 4
    alpha: float | None = None
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS_DEFAULT))
    dropout: float = 0.0


@dataclass
class OptimSection:
    """AdamW (or 8-bit AdamW from bitsandbytes) with global grad-norm clipping."""

    lr: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False


@dataclass
class TrainSection:
    """What trains and how the hardware is used."""

    trainable: Literal["lora", "full"] = "lora"
    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimSection = field(default_factory=OptimSection)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    allow_tf32: bool = True
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers"] = "sdpa"
    seed: int = 0
    batch_size: int = 8  # trajectories per U-Net forward in log-prob passes


@dataclass
class CheckpointSection:
    every_epochs: int = 10  # 0 = only at the end
    total_limit: int | None = None  # keep at most this many checkpoints (oldest removed)
    resume_from: str | None = None  # "latest" or a checkpoint folder


@dataclass
class LoggingSection:
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb
    project: str = "genreward"


@dataclass
class TrainEvalSection(EvalSection):
    """Held-out evaluation during training: before training, every ``every_epochs`` and at the end."""

    every_epochs: int = 0  # 0 = only before and after training
    enabled: bool = True
    rewards: list[RewardSpec] = field(default_factory=list)  # empty = the training reward


# ------------------------------------------------------------------------------------------- utilities


def stateful(reward: Reward) -> list[Reward]:
    """The reward itself if it carries state to checkpoint (running statistics, reference caches), else nothing."""
    return [reward] if hasattr(reward, "state_dict") and hasattr(reward, "load_state_dict") else []


def eval_reward_list(eval_cfg: "TrainEvalSection", training_reward: Reward) -> list[Reward]:
    """Rewards for held-out evaluation: the eval section's list, or the training reward itself (not re-loaded)."""
    if eval_cfg.rewards:
        return [build_from_spec(s) for s in eval_cfg.rewards]
    return [training_reward]


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, epoch, slot...): reproducible on any rank and after resume."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def param_digest(params: Sequence[torch.Tensor]) -> str:
    """SHA-256 of the exact bytes of the given tensors (bit-identical weights ⇔ equal digests)."""
    import hashlib

    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Timer:
    """Accumulates wall-clock seconds per named phase (synchronising CUDA so GPU time is counted)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _flat(prefix: str, value: Any, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


# -------------------------------------------------------------------------------------------- the run


class TrainingRun:
    """Everything a trainer's loop needs besides its algorithm: models, optimiser, logging, checkpoints."""

    def __init__(
        self,
        config: Any,
        model: ModelConfig,
        train: TrainSection,
        checkpoint: CheckpointSection,
        logging_cfg: LoggingSection,
        eval_cfg: TrainEvalSection,
        sample: SampleConfig,
        need_reference: bool,
        checkpoint_objects: Sequence[Any] = (),
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.config = config
        self.model_cfg, self.train_cfg, self.ckpt_cfg = model, train, checkpoint
        self.eval_cfg, self.sample_cfg = eval_cfg, sample
        self.output_dir = Path(config.output_dir)
        trackers = [t for t in logging_cfg.trackers if self._tracker_available(t)]
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            cpu=model.device == "cpu",
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        acc = self.accelerator
        if train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        set_seed(train.seed, device_specific=False)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir)
        acc.wait_for_everyone()
        if trackers:
            acc.init_trackers(logging_cfg.project, config=_flat("", to_dict(config), {}))
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.reward_means: list[float] = []  # reward_mean per logged epoch (sliding-window diagnostics)
        self._load_models(need_reference)
        for obj in checkpoint_objects:  # objects with state_dict()/load_state_dict(), e.g. DDPO's stat tracker
            acc.register_for_checkpointing(obj)
        self.start_epoch = self._maybe_resume()

    # ------------------------------------------------------------------------------------ models
    @staticmethod
    def _tracker_available(name: str) -> bool:
        if name == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                log.warning("tracker 'wandb' asked for but the wandb package is not installed; skipping it")
                return False
        elif name not in ("tensorboard",):
            raise GenrewardError(f"unknown tracker '{name}' in logging.trackers; use tensorboard or wandb")
        return True

    def _load_models(self, need_reference: bool) -> None:
        from genreward.models import load_pipeline

        acc, cfg = self.accelerator, self.train_cfg
        low_precision = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[cfg.mixed_precision]
        # Frozen weights in the low-precision dtype; trainable weights stay fp32 (autocast does the rest).
        pipe = load_pipeline(
            self.model_cfg.pipeline,
            device=acc.device,
            dtype=low_precision if cfg.trainable == "lora" else "fp32",
            unet=self.model_cfg.unet,
        )
        if cfg.trainable == "full":
            pipe.vae.to(dtype=resolve_dtype(low_precision))
            pipe.text_encoder.to(dtype=resolve_dtype(low_precision))
        if cfg.attention == "xformers":
            try:
                pipe.enable_xformers_memory_efficient_attention()
            except Exception as exc:
                raise GenrewardError(f"train.attention=xformers but xformers cannot be used here: {str(exc).splitlines()[0]}") from None
        unet = pipe.unet
        self.reference_unet = None
        if cfg.trainable == "lora":
            from peft import LoraConfig

            unet.add_adapter(
                LoraConfig(
                    r=cfg.lora.rank,
                    lora_alpha=cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank,
                    lora_dropout=cfg.lora.dropout,
                    init_lora_weights="gaussian",
                    target_modules=list(cfg.lora.targets),
                )
            )
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # LoRA weights train in fp32 even when the base is fp16/bf16
        else:
            if need_reference:
                self.reference_unet = copy.deepcopy(unet).requires_grad_(False).eval().to(resolve_dtype(low_precision))
            unet.requires_grad_(True)
        if self.model_cfg.lora is not None:
            raise GenrewardError("model.lora is for evaluation; to continue training a LoRA use checkpoint.resume_from")
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        params = [p for p in unet.parameters() if p.requires_grad]
        if not params:
            raise GenrewardError("no trainable parameters: check train.lora.targets against the U-Net's module names")
        self.num_trainable = sum(p.numel() for p in params)
        self.optimizer = self._optimizer(params)
        self.unet, self.optimizer = acc.prepare(unet, self.optimizer)
        self.pipe = pipe
        self.trainable_params = params
        self._register_checkpoint_hooks()

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        o = self.train_cfg.optim
        cls = torch.optim.AdamW
        if o.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise GenrewardError("train.optim.use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
            cls = bnb.optim.AdamW8bit
        return cls(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay, eps=o.adam_epsilon)

    @property
    def policy(self) -> torch.nn.Module:
        """The trainable U-Net without the DDP wrapper (for no-grad passes and evaluation)."""
        return self.accelerator.unwrap_model(self.unet)

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The frozen reference model π_ref: LoRA adapters disabled, or the frozen copy for full fine-tuning."""
        if self.reference_unet is not None:
            yield self.reference_unet
            return
        policy = self.policy
        policy.disable_adapters()
        try:
            yield policy
        finally:
            policy.enable_adapters()

    # ----------------------------------------------------------------------------- log-prob passes
    def chunks(self, total: int) -> list[slice]:
        bs = self.train_cfg.batch_size
        return [slice(i, min(i + bs, total)) for i in range(0, total, bs)]

    @torch.no_grad()
    def log_probs(self, traj: Trajectory, model: torch.nn.Module | None = None) -> torch.Tensor:
        """log π(x_{t'} | x_t, c) of every stored transition under ``model`` (default: the policy) → [B, T]."""
        model = model if model is not None else self.policy
        out = torch.empty(len(traj), traj.num_steps, device=traj.latents.device, dtype=torch.float32)
        with self.accelerator.autocast():
            for step in range(traj.num_steps):
                for idx in self.chunks(len(traj)):
                    out[idx, step] = step_log_prob(model, self.pipe.scheduler, traj, step, idx, self.sample_cfg.logprob_reduction)
        return out

    def backward_weighted(self, traj: Trajectory, weights: torch.Tensor) -> None:
        """Pass 2 of the exact two-pass gradient: backprop Σ_{i,t} w[i,t]·log π_θ(i,t), chunk by chunk.

        Gradients accumulate locally (``no_sync``) and are all-reduced across processes once, at the last chunk.
        """
        acc = self.accelerator
        jobs = [(step, idx) for step in range(traj.num_steps) for idx in self.chunks(len(traj))]
        for n, (step, idx) in enumerate(jobs):
            last = n == len(jobs) - 1
            ctx = contextlib.nullcontext() if last else acc.no_sync(self.unet)
            with ctx:
                with acc.autocast():
                    lp = step_log_prob(self.unet, self.pipe.scheduler, traj, step, idx, self.sample_cfg.logprob_reduction)
                surrogate = (weights[idx, step].to(lp.dtype).detach() * lp).sum()
                acc.backward(surrogate)

    def optimizer_step(self) -> float:
        """Clip the global grad-norm, step, zero grads; returns the pre-clip grad norm."""
        acc = self.accelerator
        max_norm = self.train_cfg.optim.max_grad_norm
        norm = acc.clip_grad_norm_(self.trainable_params, max_norm if max_norm > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else float("nan")

    # -------------------------------------------------------------------------------- prompts
    def load_prompts(self, prompts: PromptsConfig) -> list[PromptItem]:
        return load_prompts(prompts)

    def local_slice(self, total: int, what: str) -> slice:
        """This process's contiguous share of ``total`` items (must divide evenly across processes)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if total % world:
            raise GenrewardError(f"{what}={total} must be divisible by the number of processes ({world})")
        per = total // world
        return slice(rank * per, (rank + 1) * per)

    # ------------------------------------------------------------------------------ logging
    def log_metrics(self, record: dict) -> None:
        """One line in metrics.jsonl (main process) and the trackers; ``record['epoch']`` is the step."""
        acc = self.accelerator
        if "reward_mean" in record:
            self.reward_means.append(record["reward_mean"])
        if acc.is_main_process:
            append_jsonl(self.metrics_path, record)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if acc.trackers:
            acc.log(scalars, step=int(record.get("epoch", 0)))

    def gather_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(rewards.contiguous())

    # --------------------------------------------------------------------------- checkpoints
    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def _register_checkpoint_hooks(self) -> None:
        """Save/load the U-Net in diffusers format inside accelerate's state folder (not a raw state dict)."""
        acc, trainable = self.accelerator, self.train_cfg.trainable

        def save_hook(models, weights, output_dir):
            if acc.is_main_process:
                for model in models:
                    save_unet_weights(acc.unwrap_model(model), output_dir, trainable)
            while weights:
                weights.pop()

        def load_hook(models, input_dir):
            while models:
                load_unet_weights(acc.unwrap_model(models.pop()), input_dir, trainable)

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    def save_checkpoint(self, epoch: int, extra: dict | None = None) -> Path:
        """``checkpoints/checkpoint-EPOCH``: accelerate state (optimiser, RNG, registered objects) + weights.

        Called on every process (accelerate's own collectives inside), so multi-GPU saving cannot hang.
        """
        acc = self.accelerator
        path = self.checkpoints_dir / f"checkpoint-{epoch}"
        acc.save_state(str(path))
        if acc.is_main_process:
            (path / "trainer_state.json").write_text(json.dumps({"epoch": epoch, **(extra or {})}) + "\n")
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return path

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def _prune_checkpoints(self) -> None:
        limit = self.ckpt_cfg.total_limit
        if limit is None:
            return
        for old in self.list_checkpoints()[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _maybe_resume(self) -> int:
        """Load the requested checkpoint; return the first epoch still to train (0 for a fresh run)."""
        spec = self.ckpt_cfg.resume_from
        if not spec:
            if self.accelerator.is_main_process and self.metrics_path.exists():
                self.metrics_path.unlink()  # a fresh run starts a fresh log
            return 0
        if spec == "latest":
            found = self.list_checkpoints()
            if not found:
                log.warning("checkpoint.resume_from=latest but %s holds no checkpoint; starting from scratch", self.checkpoints_dir)
                return 0
            path = found[-1]
        else:
            path = Path(spec)
            if not (path / "trainer_state.json").is_file():
                raise GenrewardError(f"checkpoint.resume_from: {path} is not a genreward checkpoint (no trainer_state.json)")
        self.resume_path = path
        self.accelerator.load_state(str(path))
        state = json.loads((path / "trainer_state.json").read_text())
        epoch = int(state["epoch"])
        if self.accelerator.is_main_process and self.metrics_path.exists():
            kept = [r for r in read_jsonl(self.metrics_path) if int(r.get("epoch", -1)) <= epoch]
            self.metrics_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
            self.reward_means = [r["reward_mean"] for r in kept if r.get("reward_mean") is not None]
        self.accelerator.wait_for_everyone()
        log.info("resumed from %s (epoch %d done)", path, epoch)
        return epoch + 1

    # ---------------------------------------------------------------------------- evaluation
    def evaluate(self, tag: str, items: list[PromptItem], rewards: list[Reward]) -> dict[str, float] | None:
        """Evaluate the current policy on held-out prompts into ``eval/<tag>`` (main process only)."""
        from genreward.evaluation import evaluate

        acc = self.accelerator
        summary = None
        if acc.is_main_process:
            was_training = self.policy.training
            self.policy.eval()
            with acc.autocast():
                result = evaluate(
                    self.pipe,
                    items,
                    rewards,
                    self.output_dir / "eval" / tag,
                    self.sample_cfg,
                    images_per_prompt=self.eval_cfg.images_per_prompt,
                    seed=self.eval_cfg.seed,
                    eta=self.eval_cfg.eta,
                    unet=self.policy,
                    progress=False,
                )
            self.policy.train(was_training)
            summary = result.summary
        acc.wait_for_everyone()
        return summary

    def check_replicas(self) -> bool:
        """Hash the trainable weights on every process; all must agree (DDP correctness), recorded in replicas.json."""
        from accelerate.utils import gather_object

        digests = gather_object([param_digest(self.trainable_params)])
        identical = len(set(digests)) == 1
        if self.accelerator.is_main_process:
            (self.output_dir / "replicas.json").write_text(json.dumps({"digests": digests, "identical": identical}) + "\n")
            if not identical:
                log.error("trainable weights differ across processes: %s", digests)
        return identical

    def end_of_epoch(self, epoch: int, total_epochs: int, eval_items: list[PromptItem], eval_rewards: list[Reward]) -> None:
        """Periodic checkpoint and held-out evaluation (the last epoch is handled by :meth:`finish`)."""
        done = epoch + 1
        if done >= total_epochs:
            return
        if self.ckpt_cfg.every_epochs and done % self.ckpt_cfg.every_epochs == 0:
            self.save_checkpoint(epoch)
        if eval_items and self.eval_cfg.every_epochs and done % self.eval_cfg.every_epochs == 0:
            self.evaluate(f"epoch_{done:05d}", eval_items, eval_rewards)

    def finish(self, final_epoch: int, eval_items: list[PromptItem] | None, eval_rewards: list[Reward] | None) -> dict:
        """Final checkpoint, final evaluation, before/after gallery and reward curve."""
        from genreward.gallery import write_gallery

        acc = self.accelerator
        out: dict[str, Any] = {}
        last = self.list_checkpoints()
        if not last or int(last[-1].name.split("-")[1]) != final_epoch:
            self.save_checkpoint(final_epoch)
        out["checkpoint"] = str(self.checkpoints_dir / f"checkpoint-{final_epoch}")
        out["replicas_identical"] = self.check_replicas()
        if eval_items and self.eval_cfg.enabled:
            out["final"] = self.evaluate("final", eval_items, eval_rewards)
            if acc.is_main_process:
                before = self.output_dir / "eval" / "before"
                final = self.output_dir / "eval" / "final"
                out["gallery"] = str(
                    write_gallery(final, compare_dir=before if before.is_dir() else None, out_path=self.output_dir / "gallery.html")
                )
        if acc.is_main_process and self.metrics_path.exists():
            out["reward_curve"] = str(plot_reward_curve(self.metrics_path, self.output_dir / "reward_curve.png"))
        acc.wait_for_everyone()
        acc.end_training()
        return out


def training_progress(acc, start: int, total: int):
    """Epoch progress bar on the main process only."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="epochs", unit="epoch", disable=not acc.is_main_process)


# ------------------------------------------------------------------------------------- weights I/O


def save_unet_weights(unet: torch.nn.Module, folder: str | Path, trainable: str) -> None:
    """Diffusers format: ``pytorch_lora_weights.safetensors`` (loadable by ``pipe.load_lora_weights``) or ``unet/``."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if trainable == "lora":
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state, safe_serialization=True)
    else:
        unet.save_pretrained(str(folder / "unet"), safe_serialization=True)


def load_unet_weights(unet: torch.nn.Module, folder: str | Path, trainable: str) -> None:
    """Inverse of :func:`save_unet_weights` into an existing (LoRA-injected, for ``lora``) U-Net."""
    folder = Path(folder)
    if trainable == "lora":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict

        state, _ = StableDiffusionPipeline.lora_state_dict(str(folder))
        unet_state = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise GenrewardError(f"LoRA checkpoint {folder} does not match the model (unexpected keys, e.g. {unexpected[0]})")
    else:
        from diffusers import UNet2DConditionModel

        loaded = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
        unet.load_state_dict(loaded.state_dict())


def plot_reward_curve(metrics_path: Path, out_path: Path, key: str = "reward_mean") -> Path:
    """reward mean ± std per epoch from metrics.jsonl, as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(metrics_path) if key in r and "epoch" in r]
    epochs = [r["epoch"] for r in rows]
    mean = np.array([r[key] for r in rows], dtype=float)
    std = np.array([r.get("reward_std", 0.0) for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(epochs, mean, marker="o", label=key)
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, label="± std")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward")
    ax.set_title(rows[0].get("reward_name", "reward") if rows else "reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
