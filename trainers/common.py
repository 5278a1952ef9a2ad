"""Training machinery shared by every diffusion trainer (PRDP, DDPO, RPO), written once.

What lives here: config sections for training (the base config every policy trainer extends); accelerate
set-up (mixed precision, TF32, seeds, trackers); which parameters train (LoRA on the U-Net's attention
projections via peft, or the full U-Net) and the frozen reference model; the optimiser; checkpoints through the
one run folder (:mod:`trainers.run_dir`: diffusers-format weights + safetensors optimiser/RNG state + JSON
trainer state); periodic evaluation and the before/after gallery. The log-prob passes are free functions in
:mod:`trainers.passes`, the per-epoch reward statistics in :mod:`trainers.diagnostics`.

Multi-process rules (the bugs users hit elsewhere): the U-Net is wrapped by ``accelerator.prepare`` *after*
the LoRA adapters are injected, so DDP all-reduces the LoRA gradients; every rank calls ``save_checkpoint``
(only file writes are main-process-only, all ranks meet at a barrier), so saving never deadlocks; no-grad passes
use the unwrapped module so that ranks need not call DDP forwards in lockstep; stateful rewards update their
statistics with the rewards of every rank, so every rank holds the same state; resume loads on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch

from genreward.config import check_output_dir, to_dict
from genreward.errors import GenrewardError
from genreward.jsonl import read_jsonl
from genreward.models.device import resolve_dtype
from genreward.models.families import family_of
from genreward.models.hub import first_line
from genreward.prompts import PromptItem, load_prompts
from genreward.rewards.base import Reward, RewardSpec, build_from_spec
from genreward.sampling import Trajectory, check_image_size, sample_trajectories
from genreward.schema import EvalSection, ModelConfig, PromptsConfig, SampleConfig
from trainers import passes
from trainers.run_dir import CheckpointSection, RunDir, load_tree, rng_state, save_tree, set_rng_state

log = logging.getLogger("genreward.train")

LORA_TARGETS_DEFAULT = ["to_q", "to_k", "to_v", "to_out.0"]


# ----------------------------------------------------------------------------------------------- config


@dataclass
class LoraSection:
    """LoRA on the U-Net (peft). ``alpha`` None = ``rank`` (scale 1)."""

    rank: int = 4
    alpha: float | None = None
    targets: list[str] | None = None  # None = the model family's (SD: to_q/k/v/out.0; SD3/FLUX: + add_*_proj, to_add_out)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"key 'train.lora.rank' must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"key 'train.lora.alpha' must be > 0 or null (= rank), got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"key 'train.lora.dropout' must be in [0, 1), got {self.dropout}")
        if self.targets is not None and not self.targets:
            raise ValueError(f"key 'train.lora.targets' must name at least one module, e.g. {LORA_TARGETS_DEFAULT}")


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
    chunk_size: int = 8  # trajectories per U-Net call in the log-prob passes (memory, not the gradient batch)
    # PRDP/DDPO stop (one line, exit 2) after this many consecutive epochs in which no reward was finite
    # (a broken reward or a diverged policy would otherwise train on nothing to the end); 0 = never stop
    max_nonfinite_epochs: int = 3

    __moved_keys__ = {
        "batch_size": "train.chunk_size (trajectories per U-Net call in log-prob passes); DDPO's gradient "
        "minibatch is ddpo.minibatch_size",
    }

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"key 'train.chunk_size' must be >= 1, got {self.chunk_size}")
        if self.max_nonfinite_epochs < 0:
            raise ValueError(f"key 'train.max_nonfinite_epochs' must be >= 0 (0 = never stop), got {self.max_nonfinite_epochs}")


@dataclass
class LoggingSection:
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb
    project: str = "genreward"


@dataclass
class TrainEvalSection(EvalSection):
    """Held-out evaluation during training: before training, every ``every_epochs`` and at the end."""

    every: int = 0  # evaluate every N epochs; 0 = only before and after training
    enabled: bool = True
    rewards: list[RewardSpec] = field(default_factory=list)  # empty = the training reward (its state untouched)

    __moved_keys__ = {"every_epochs": "every"}


@dataclass
class RunConfig:
    """What every diffusion trainer's config has: where the run goes, the model, sampling and the machinery."""

    output_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


@dataclass
class PolicyConfig(RunConfig):
    """Score-function trainers (PRDP, DDPO): a prompt set, a reward (weighted list) and held-out evaluation."""

    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    reward: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="jpeg_compressibility")])
    eval: TrainEvalSection = field(default_factory=TrainEvalSection)


# ------------------------------------------------------------------------------------------- utilities


def stateful_objects(reward: Reward) -> dict[str, Reward]:
    """``{"reward": reward}`` if it carries state to checkpoint (running statistics, reference caches), else ``{}``."""
    return {"reward": reward} if hasattr(reward, "state_dict") and hasattr(reward, "load_state_dict") else {}


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


# ------------------------------------------------------------------------------------- accelerate set-up


def tracker_available(name: str) -> bool:
    """Whether tracker ``name`` can run here: wandb without its package is skipped with a warning; unknown names stop."""
    if name == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            log.warning("tracker 'wandb' asked for but the wandb package is not installed; skipping it")
            return False
    elif name not in ("tensorboard",):
        raise GenrewardError(f"unknown tracker '{name}' in logging.trackers; use tensorboard or wandb")
    return True


def make_accelerator(output_dir: Path, logging_cfg: "LoggingSection", device: str | None = None,
                     mixed_precision: str = "no"):
    """The one accelerate set-up of every trainer: mixed precision, CPU when asked, trackers logging under
    ``<output_dir>/logs``. Trackers start with :func:`start_trackers` once the run folder is ready."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = [t for t in logging_cfg.trackers if tracker_available(t)]
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=device == "cpu",
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")),
    )


def start_trackers(acc, config: Any) -> None:
    """Start the accelerator's trackers with the flattened config as hyper-parameters (no-op without trackers)."""
    if acc.log_with:
        acc.init_trackers(config.logging.project, config=_flat("", to_dict(config), {}))


def log_record(acc, run_dir: RunDir, record: dict) -> None:
    """One line in metrics.jsonl (main process) and its finite scalars to the trackers, at the run's unit."""
    run_dir.log(record)
    if acc.trackers:
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        acc.log(scalars, step=int(record.get(run_dir.unit, 0)))


class TrainingRun:
    """Everything a trainer's loop needs besides its algorithm: models, optimiser, logging, checkpoints.

    Built from the config alone (its ``model``, ``sample``, ``train``, ``checkpoint``, ``logging`` and, when present,
    ``eval`` sections). ``unit`` is what the trainer counts and names checkpoints by (``checkpoint-<N>`` = N units
    done). ``checkpoint_objects`` maps names to objects with JSON-able ``state_dict()/load_state_dict()`` (DDPO's
    tracker, stateful rewards); they are saved in the trainer state and restored on every rank.

    ``train_mode``: score-function trainers (PRDP, DDPO) keep the policy in eval mode, so sampling, the no-grad
    recompute and the loss pass evaluate one and the same function (with LoRA dropout in train mode each pass
    would draw its own mask and the importance ratio would not start at 1); trainers that regress a denoising
    loss (RPO) pass ``train_mode=True`` and get dropout. ``families``: the model families the trainer supports
    (None = all); another one stops with one line after the models load, before the run folder is written.

    The run folder is checked before anything loads and written only after the models loaded, so a bad input
    never touches an earlier run's files.
    """

    def __init__(
        self,
        config: Any,
        need_reference: bool,
        unit: Literal["epoch", "step"] = "epoch",
        checkpoint_objects: dict[str, Any] | None = None,
        train_mode: bool = False,
        families: Sequence[str] | None = None,
    ) -> None:
        from accelerate.utils import set_seed

        self.config = config
        self.model_cfg, self.train_cfg, self.ckpt_cfg = config.model, config.train, config.checkpoint
        self.sample_cfg = config.sample
        self.eval_cfg = getattr(config, "eval", None)
        self.output_dir = Path(config.output_dir)
        self.checkpoint_objects = dict(checkpoint_objects or {})
        self._train_mode = train_mode
        check_output_dir(self.output_dir)  # under a file, unwritable: one line before anything loads
        self.run_dir = RunDir(self.output_dir, unit, config.checkpoint)
        resume = self.run_dir.prepare()  # raises on a conflicting folder / damaged named checkpoint; writes nothing
        if resume is not None:
            self._check_checkpoint_kind(resume)  # rank / trainable mismatch: one line, before the models load
        self.accelerator = make_accelerator(self.output_dir, config.logging, device=self.model_cfg.device,
                                            mixed_precision=self.train_cfg.mixed_precision)
        acc = self.accelerator
        self.run_dir.is_main = acc.is_main_process
        if acc.distributed_type.name == "FSDP":
            # Under FULL_SHARD each rank holds shards: sampling, the no-grad passes, checkpoints and the replica hash
            # would read partial weights. Refused until that path is verified on GPUs (FSDP needs an accelerator;
            # it cannot be exercised on the CPU machines this project is tested on).
            raise GenrewardError("FSDP is not supported by the training core yet; launch with data parallelism "
                                 "(configs/accelerate/ddp.yaml), with train.trainable=lora for large models")
        if self.train_cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        set_seed(self.train_cfg.seed, device_specific=False)
        self._load_models(need_reference)
        if families is not None and self.family.name not in families:
            raise GenrewardError(f"trainer {getattr(config, 'trainer', '?')} runs on {', '.join(families)} models; "
                                 f"model.pipeline {self.model_cfg.pipeline!r} is a {self.family.name} model "
                                 f"(prdp, ddpo and grpo run on every family)")
        check_image_size(self.pipe, self.sample_cfg.height, self.sample_cfg.width, unet=self.policy, prefix="sample.")
        self.reward_means: list[float] = []  # reward_mean per logged epoch (sliding-window diagnostics)
        self.resume_path: Path | None = resume
        self.resume_state: dict[str, Any] = {}
        self.start = 0
        self._nonfinite_epochs = 0  # consecutive epochs without one finite reward (train.max_nonfinite_epochs)
        if resume is not None:
            self._load_checkpoint(resume)  # a checkpoint that does not fit stops here, the folder untouched
        # Inputs are valid, the models and the checkpoint loaded: now the run folder may change.
        self.run_dir.start(config, resume)
        if resume is not None:
            self.reward_means = [r["reward_mean"] for r in self.run_dir.metrics() if r.get("reward_mean") is not None]
        acc.wait_for_everyone()
        start_trackers(acc, config)
        self.last_saved = self.start if resume is not None else None
        # Trainer hooks: writers of extra checkpoint files (called with the folder being written, before its
        # manifest; e.g. NFT's old policy and EMA as safetensors) and a context manager active during evaluation.
        self.extra_checkpoint_writers: list[Callable[[Path], None]] = []
        self.eval_weights: Callable[[], contextlib.AbstractContextManager] | None = None
        self.run_dir.catch_signals()

    @staticmethod
    def load_eval_prompts(config: Any) -> list[PromptItem]:
        """The held-out prompt set of ``config.eval`` (empty when evaluation is off); loaded before the run starts."""
        return load_prompts(config.eval.prompts) if config.eval.enabled else []

    # ------------------------------------------------------------------------------------ compat names
    @property
    def metrics_path(self) -> Path:
        return self.run_dir.metrics_path

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir.checkpoints_dir

    @property
    def start_epoch(self) -> int:
        """First unit still to run (0 for a fresh run); named for PRDP/DDPO's epochs."""
        return self.start

    # ------------------------------------------------------------------------------------ models
    def _load_models(self, need_reference: bool) -> None:
        from genreward.models import load_pipeline

        acc, cfg = self.accelerator, self.train_cfg
        if self.model_cfg.lora is not None:
            raise GenrewardError("model.lora is for evaluation; to continue training a LoRA use checkpoint.resume_from")
        low_precision = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[cfg.mixed_precision]
        # Frozen weights in the low-precision dtype; trainable weights stay fp32 (autocast does the rest).
        pipe = load_pipeline(
            self.model_cfg.pipeline,
            device=acc.device,
            dtype=low_precision if cfg.trainable == "lora" else "fp32",
            unet=self.model_cfg.unet,
            family=self.model_cfg.family,
        )
        self.family = family_of(pipe, self.model_cfg.family)
        unet = self.family.denoiser  # U-Net or transformer: "unet" below names whichever denoises
        if cfg.trainable == "full":
            for name, module in pipe.components.items():
                if isinstance(module, torch.nn.Module) and module is not unet:
                    module.to(dtype=resolve_dtype(low_precision))
        if cfg.attention == "xformers":
            try:
                pipe.enable_xformers_memory_efficient_attention()
            except Exception as exc:
                raise GenrewardError(f"train.attention=xformers but xformers cannot be used here: {str(exc).splitlines()[0]}") from None
        self.reference_unet = None
        if cfg.trainable == "lora":
            from peft import LoraConfig

            targets = list(cfg.lora.targets) if cfg.lora.targets is not None else list(self.family.lora_targets)
            try:
                unet.add_adapter(
                    LoraConfig(
                        r=cfg.lora.rank,
                        lora_alpha=cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank,
                        lora_dropout=cfg.lora.dropout,
                        init_lora_weights="gaussian",
                        target_modules=targets,
                    )
                )
            except ValueError as exc:  # peft: no module matches (NoMatchingPeftModuleError), unsupported layer type
                raise GenrewardError(
                    f"train.lora.targets={targets} does not fit the {self.family.denoiser_attr} of {self.model_cfg.pipeline!r}: "
                    f"{first_line(exc, 160)} (family {self.family.name} targets e.g. {', '.join(self.family.lora_targets)})"
                ) from None
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # LoRA weights train in fp32 even when the base is fp16/bf16
        else:
            if need_reference:
                self.reference_unet = copy.deepcopy(unet).requires_grad_(False).eval().to(resolve_dtype(low_precision))
            unet.requires_grad_(True)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train(self._train_mode)
        if not self._train_mode and cfg.trainable == "lora" and cfg.lora.dropout > 0:
            log.warning("train.lora.dropout=%g has no effect in this trainer: the policy runs in eval mode so that sampled "
                        "and recomputed log-probs match", cfg.lora.dropout)
        params = [p for p in unet.parameters() if p.requires_grad]
        if not params:
            raise GenrewardError("no trainable parameters: check train.lora.targets against the U-Net's module names")
        self.num_trainable = sum(p.numel() for p in params)
        self.optimizer = self._optimizer(params)
        self.unet, self.optimizer = acc.prepare(unet, self.optimizer)
        self.pipe = pipe
        self.trainable_params = params

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

    # ----------------------------------------------------------------------------- sampling & passes
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], model: torch.nn.Module | None = None, **overrides: Any) -> Trajectory:
        """Trajectories of the policy (or ``model``) with the config's sampler settings (``overrides`` win)."""
        s = self.sample_cfg
        kwargs = dict(num_steps=s.num_steps, guidance_scale=s.guidance_scale, eta=s.eta, negative_prompt=s.negative_prompt,
                      batch_size=s.batch_size, height=s.height, width=s.width, reduction=s.logprob_reduction,
                      noise_level=s.noise_level, flow_kind=s.flow_kernel,
                      sde_window=tuple(s.sde_window) if s.sde_window is not None else None, family=self.family.name)
        kwargs.update(overrides)
        with self.accelerator.autocast():
            return sample_trajectories(self.pipe, list(prompts), seeds=list(seeds), unet=model if model is not None else self.policy, **kwargs)

    def log_probs(self, traj: Trajectory, model: torch.nn.Module | None = None) -> torch.Tensor:
        """log π(x_{t'} | x_t, c) of every stored transition under ``model`` (default: the policy) → [B, T]."""
        with self.accelerator.autocast():
            return passes.recompute_log_probs(model if model is not None else self.policy, self.family, traj,
                                              self.train_cfg.chunk_size, self.sample_cfg.logprob_reduction)

    def backward_weighted(self, traj: Trajectory, weights: torch.Tensor) -> None:
        """Pass 2 of the exact two-pass gradient (see :func:`trainers.passes.backward_weighted`)."""
        passes.backward_weighted(self.unet, self.family, traj, weights, self.train_cfg.chunk_size,
                                 self.sample_cfg.logprob_reduction, self.accelerator)

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

    def reward_context(self) -> dict[str, Any]:
        """Call-context keys that let stateful rewards update with the rewards of every rank (same state everywhere)."""
        if self.accelerator.num_processes == 1:
            return {}
        from accelerate.utils import gather_object

        return {"gather": lambda t: self.accelerator.gather(t.contiguous()), "gather_prompts": lambda p: list(gather_object(list(p)))}

    # ------------------------------------------------------------------------------ logging
    def log_metrics(self, record: dict) -> None:
        """One line in metrics.jsonl (main process) and the trackers."""
        acc = self.accelerator
        if "reward_mean" in record:
            self.reward_means.append(record["reward_mean"])
        log_record(acc, self.run_dir, record)

    def gather_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(rewards.contiguous())

    def check_finite_rewards(self, rewards: torch.Tensor, epoch: int, reward_name: str) -> None:
        """After an epoch is logged: stop with one line once ``train.max_nonfinite_epochs`` consecutive epochs had no
        finite reward on any process (a broken reward, or NaN images from a diverged policy, trains on nothing).
        Epoch ``epoch`` is 0-based; the stop happens at a unit boundary, like a signal's, without a new checkpoint."""
        limit = self.train_cfg.max_nonfinite_epochs
        count = torch.isfinite(rewards.detach().float()).sum().reshape(1).to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count)
        self._nonfinite_epochs = self._nonfinite_epochs + 1 if float(count.sum()) == 0 else 0
        if not limit or self._nonfinite_epochs < limit:
            return
        first, last = epoch + 2 - self._nonfinite_epochs, epoch + 1
        self.run_dir.release_signals()
        self.accelerator.end_training()
        resume = (f"; the last checkpoint is {self.run_dir.checkpoint_path(self.last_saved)}"
                  if self.last_saved is not None else "")
        raise GenrewardError(
            f"reward {reward_name!r} gave no finite score (all NaN/inf) in {self._nonfinite_epochs} epochs in a row "
            f"(epochs {first}-{last}; see {self.metrics_path}): check the reward, or the images for NaN (a diverged "
            f"policy); stopped by train.max_nonfinite_epochs={limit} (0 = never stop){resume}"
        )

    # --------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, done: int, extra: dict | None = None) -> Path:
        """``checkpoints/checkpoint-<done>``: diffusers-format weights, optimiser/RNG state (safetensors), trainer
        state (JSON: counters, ``extra``, checkpoint objects). Called on every process; main writes, all meet."""
        acc = self.accelerator
        acc.wait_for_everyone()
        policy, trainable = self.policy, self.train_cfg.trainable

        def write_files(folder: Path) -> None:
            save_unet_weights(policy, folder, trainable, self.family)
            save_tree(self.optimizer.state_dict(), folder / "optimizer.safetensors")
            save_tree(rng_state(), folder / "rng.safetensors")
            for writer in self.extra_checkpoint_writers:
                writer(folder)

        state: dict[str, Any] = {"extra": extra or {},
                                 "objects": {name: obj.state_dict() for name, obj in self.checkpoint_objects.items()}}
        if getattr(acc, "scaler", None) is not None:
            state["grad_scaler"] = acc.scaler.state_dict()
        path = self.run_dir.save(done, write_files, state)
        self.last_saved = done
        acc.wait_for_everyone()
        return path

    def _check_checkpoint_kind(self, path: Path) -> None:
        """Before anything loads: the checkpoint holds what ``train.trainable`` (and, for LoRA, ``train.lora.rank``)
        says, else one line naming the setting to change."""
        trainable = self.train_cfg.trainable
        lora_file = Path(path) / LORA_WEIGHTS_FILE
        held = "lora" if lora_file.is_file() else "full" if (Path(path) / "unet").is_dir() else None
        if held is not None and held != trainable:
            what = "LoRA weights" if held == "lora" else "a full U-Net (unet/)"
            raise GenrewardError(f"checkpoint {path} holds {what} but train.trainable is {trainable!r}; "
                                 f"resume with train.trainable={held}")
        if held == "lora":
            rank = lora_rank(lora_file)
            if rank is not None and rank != self.train_cfg.lora.rank:
                raise GenrewardError(f"checkpoint {path} has LoRA rank {rank} but train.lora.rank is "
                                     f"{self.train_cfg.lora.rank}; resume with train.lora.rank={rank}")

    def _load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimiser, RNG, grad scaler and checkpoint objects on this rank (no pickle anywhere).

        Runs before the run folder is written (:meth:`RunDir.start`), so a checkpoint that does not fit leaves it as it was."""
        acc = self.accelerator
        state = self.run_dir.load_state(path)
        try:
            load_unet_weights(self.policy, path, self.train_cfg.trainable, self.family)
            self.optimizer.load_state_dict(load_tree(path / "optimizer.safetensors"))
            set_rng_state(load_tree(path / "rng.safetensors"))
        except GenrewardError:
            raise
        except Exception as exc:  # a checkpoint of another model / trainable setting
            raise GenrewardError(f"checkpoint {path} does not fit this run ({type(exc).__name__}: {first_line(exc)})") from None
        if "grad_scaler" in state and getattr(acc, "scaler", None) is not None:
            acc.scaler.load_state_dict(state["grad_scaler"])
        for name, obj in self.checkpoint_objects.items():
            if name in state.get("objects", {}):
                obj.load_state_dict(state["objects"][name])
        self.resume_state = state.get("extra", {})
        self.start = int(state["done"])
        log.info("resumed from %s (%d %ss done)", path, self.start, self.run_dir.unit)

    def list_checkpoints(self) -> list[Path]:
        return [p for _, p in self.run_dir.list_checkpoints()]

    def check_stop(self, done: int, extra: dict | None = None) -> None:
        """At a unit boundary: if any rank got SIGINT/SIGTERM, save ``checkpoint-<done>`` and stop cleanly."""
        acc = self.accelerator
        flag = torch.tensor([1.0 if self.run_dir.stop_signal is not None else 0.0], device=acc.device)
        if acc.num_processes > 1:
            flag = acc.gather(flag)
        if float(flag.max()) == 0.0:
            return
        path = self.save_checkpoint(done, extra) if self.last_saved != done else self.run_dir.checkpoint_path(done)
        acc.end_training()
        raise self.run_dir.interrupted(path)

    # ---------------------------------------------------------------------------- evaluation
    def evaluate(self, tag: str, items: list[PromptItem], rewards: list[Reward]) -> dict[str, float] | None:
        """Evaluate the current policy on held-out prompts into ``eval/<tag>`` (main process only)."""
        from genreward.evaluation import evaluate

        acc = self.accelerator
        summary = None
        if acc.is_main_process:
            weights = self.eval_weights() if self.eval_weights is not None else contextlib.nullcontext()
            with weights, acc.autocast():
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
        """After epoch index ``epoch``: periodic checkpoint and evaluation, then a stop if a signal arrived."""
        done = epoch + 1
        if done < total_epochs:
            if self.run_dir.due(done, total_epochs):
                self.save_checkpoint(done)
            if eval_items and self.eval_cfg.every and done % self.eval_cfg.every == 0:
                self.evaluate(f"epoch_{done:05d}", eval_items, eval_rewards)
        self.check_stop(done)

    def finish(self, total: int, eval_items: list[PromptItem] | None, eval_rewards: list[Reward] | None) -> dict:
        """Final checkpoint (``checkpoint-<total>``), final evaluation, before/after gallery and reward curve."""
        from genreward.gallery import write_gallery

        acc = self.accelerator
        out: dict[str, Any] = {}
        if self.last_saved != total:
            self.save_checkpoint(total)
        out["checkpoint"] = str(self.run_dir.checkpoint_path(total))
        out["replicas_identical"] = self.check_replicas()
        if eval_items and self.eval_cfg.enabled:
            out["final"] = self.evaluate("final", eval_items, eval_rewards)
            if acc.is_main_process:
                before = self.output_dir / "eval" / "before"
                final = self.output_dir / "eval" / "final"
                out["gallery"] = str(
                    write_gallery(final, compare_dir=before if before.is_dir() else None, out_path=self.output_dir / "gallery.html")
                )
        if acc.is_main_process and self.run_dir.metrics():
            out["reward_curve"] = str(plot_reward_curve(self.metrics_path, self.output_dir / "reward_curve.png"))
        acc.wait_for_everyone()
        self.run_dir.release_signals()
        acc.end_training()
        return out


def training_progress(acc, start: int, total: int, unit: str = "epoch"):
    """Progress bar over epochs or steps, on the main process only."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"{unit}s", unit=unit, disable=not acc.is_main_process)


# ------------------------------------------------------------------------------------- weights I/O


def save_unet_weights(unet: torch.nn.Module, folder: str | Path, trainable: str, family=None) -> None:
    """Diffusers format of the denoiser (U-Net or transformer): ``pytorch_lora_weights.safetensors`` that the family's
    pipeline class loads with ``load_lora_weights``, or the full model folder (``unet/`` / ``transformer/``).
    ``family`` None = SD (a U-Net)."""
    from genreward.models.families import SDFamily

    family = family or SDFamily(None)
    folder = Path(folder)
    if trainable == "lora":
        from peft.utils import get_peft_model_state_dict

        family.save_lora(get_peft_model_state_dict(unet), str(folder))
    else:
        unet.save_pretrained(str(folder / family.denoiser_attr), safe_serialization=True)


LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


def lora_rank(path: str | Path) -> int | None:
    """The rank of the LoRA weights in a safetensors file (read from the header: no tensor is loaded), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if "lora_A" in key or "lora.down" in key or "lora_down" in key:
                    return int(fh.get_slice(key).get_shape()[0])
    except Exception:  # unreadable: the loader reports it
        return None
    return None


def _peft_rank(unet: torch.nn.Module) -> int | None:
    config = getattr(unet, "peft_config", {}).get("default")
    return getattr(config, "r", None)


def load_unet_weights(unet: torch.nn.Module, folder: str | Path, trainable: str, family=None) -> None:
    """Inverse of :func:`save_unet_weights` into an existing (LoRA-injected, for ``lora``) denoiser."""
    from genreward.models.families import SDFamily

    family = family or SDFamily(None)
    folder = Path(folder)
    if trainable == "lora":
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict

        held, wanted = lora_rank(folder / LORA_WEIGHTS_FILE), _peft_rank(unet)
        if held is not None and wanted is not None and held != wanted:
            raise GenrewardError(f"LoRA checkpoint {folder} has rank {held} but the model's LoRA has rank {wanted} "
                                 f"(train.lora.rank={held} fits it)")
        own = family.lora_state(str(folder))
        result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(own), adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise GenrewardError(f"LoRA checkpoint {folder} does not match the model (unexpected keys, e.g. {unexpected[0]})")
    else:
        loaded = type(unet).from_pretrained(str(folder / family.denoiser_attr))
        unet.load_state_dict(loaded.state_dict())


def plot_reward_curve(metrics_path: Path, out_path: Path, key: str = "reward_mean") -> Path:
    """reward mean ± std per epoch from metrics.jsonl, as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(metrics_path) if key in r and ("epoch" in r or "step" in r)]
    epochs = [r["epoch"] if "epoch" in r else r["step"] for r in rows]
    mean = np.array([r[key] for r in rows], dtype=float)
    std = np.array([r.get("reward_std", 0.0) for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(epochs, mean, marker="o", label=key)
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, label="± std")
    ax.set_xlabel("epoch" if rows and "epoch" in rows[0] else "step")
    ax.set_ylabel("reward")
    ax.set_title(rows[0].get("reward_name", "reward") if rows else "reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
