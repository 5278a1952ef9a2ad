"""The one sampler with per-step log-probabilities, for every model family.

Two step kernels, pure functions of tensors: ``ddim_step_with_logprob`` (SD U-Nets; docs/algorithms/ddpo.md §3–4)
and ``flow_step_with_logprob`` (flow-matching transformers: the Flow-GRPO SDE step, CPS and DanceGRPO;
docs/algorithms/flow_grpo.md §4). ``sample_trajectories`` is the one entry point: it asks the pipeline's model
family (:mod:`genreward.models.families`) to encode prompts, denoise, draw x_T and decode, runs the family's
kernel and returns a :class:`Trajectory`; ``step_log_prob`` recomputes the log-prob of stored transitions under a
given denoiser exactly as they were recorded (the trainers' hot path).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Literal, Sequence

import torch

from genreward.errors import GenrewardError

if TYPE_CHECKING:
    from genreward.models.families import Conditioning, ModelFamily

Reduction = Literal["mean", "sum"]
FlowKind = Literal["sde", "cps", "dance"]
KINDS = ("sde", "cps", "dance")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class Trajectory:
    """B sampled trajectories of T steps of one family's kernel.

    ``latents[:, k]`` is the latent before step k (``latents[:, 0]`` = x_T, ``latents[:, T]`` = x_0);
    ``log_probs[:, k]`` is log π(latents[:, k+1] | latents[:, k]) recorded at sampling time (None when no step is
    stochastic; NaN at a flow trajectory's deterministic steps). ``cond``/``uncond`` are the family's conditioning
    (uncond None when guidance is off). DDIM: ``eta`` is η. Flow: ``sigmas`` is the scheduler's table (T+1),
    ``noise_levels`` the per-step a (0 = exact Euler step), ``flow_kind`` the kernel.
    """

    prompts: list[str]
    latents: torch.Tensor  # [B, T+1, ...latent shape]
    timesteps: torch.Tensor  # [T], the model timesteps in sampling order
    log_probs: torch.Tensor | None  # [B, T] float32
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    cond: "Conditioning"
    uncond: "Conditioning | None"
    guidance_scale: float
    eta: float
    seeds: list[int] | None = None
    kernel: Literal["ddim", "flow"] = "ddim"
    sigmas: torch.Tensor | None = None  # flow: [T+1]
    noise_levels: torch.Tensor | None = None  # flow: [T]
    flow_kind: FlowKind = "sde"
    height: int | None = None
    width: int | None = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def stochastic(self) -> list[bool]:
        """Per step: whether it has a density (DDIM: every step with η > 0; flow: a > 0)."""
        if self.kernel == "ddim":
            return [self.eta > 0] * self.num_steps
        return [bool(a > 0) for a in self.noise_levels.tolist()]

    @property
    def prompt_embeds(self) -> torch.Tensor:
        """The conditional text embeddings (every family has ``encoder_hidden_states``)."""
        return self.cond["encoder_hidden_states"]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def _with(self, **fields) -> "Trajectory":
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        values.update(fields)
        return Trajectory(**values)

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> "Trajectory":
        """The sub-batch ``index`` (same type, per-sample tensors indexed on dim 0)."""
        idx = index if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)
        pick = (lambda xs: [xs[i] for i in idx.tolist()]) if not isinstance(idx, slice) else (lambda xs: list(xs[idx]))
        return self._with(
            prompts=pick(self.prompts),
            latents=self.latents[idx],
            log_probs=None if self.log_probs is None else self.log_probs[idx],
            images=self.images[idx],
            cond=self.cond.select(idx),
            uncond=None if self.uncond is None else self.uncond.select(idx),
            seeds=None if self.seeds is None else pick(self.seeds),
        )

    @staticmethod
    def cat(parts: Sequence["Trajectory"]) -> "Trajectory":
        from genreward.models.families import Conditioning

        first = parts[0]
        return first._with(
            prompts=[p for t in parts for p in t.prompts],
            latents=torch.cat([t.latents for t in parts]),
            log_probs=None if first.log_probs is None else torch.cat([t.log_probs for t in parts]),
            images=torch.cat([t.images for t in parts]),
            cond=Conditioning.cat([t.cond for t in parts]),
            uncond=None if first.uncond is None else Conditioning.cat([t.uncond for t in parts]),
            seeds=None if first.seeds is None else [s for t in parts for s in t.seeds],
        )


def _per_sample(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Scalar or [B] schedule value → [B, 1, 1, 1] broadcastable against latents."""
    x = x.reshape(-1) if x.ndim else x.reshape(1)
    return x.expand(batch).reshape(batch, 1, 1, 1) if x.numel() == 1 else x.reshape(batch, 1, 1, 1)


def ddim_mean_std(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean μ_θ and std σ_t of the DDIM transition x_t → x_{t'} (docs/algorithms/ddpo.md §3 steps 1–6), computed in fp32.

    Returns (mean, std [B,1,1,1], predicted x̂_0). The previous timestep is clamped to [0, T_train−1]
    exactly as ddpo-pytorch does, so the last step uses ᾱ_0 and keeps σ > 0.
    """
    cfg = scheduler.config
    if getattr(cfg, "thresholding", False) or getattr(cfg, "clip_sample", False):
        raise GenrewardError("the DDIM log-prob sampler needs clip_sample=False and thresholding=False in the scheduler config")
    batch = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device, dtype=torch.long)
    step = cfg.num_train_timesteps // scheduler.num_inference_steps
    t_prev = (t - step).clamp(0, cfg.num_train_timesteps - 1)
    alphas = scheduler.alphas_cumprod.to(device=sample.device, dtype=torch.float32)
    a_t = _per_sample(alphas[t], batch)
    a_prev = _per_sample(alphas[t_prev], batch)
    x_t = sample.float()
    out = model_output.float()
    if cfg.prediction_type == "epsilon":
        eps = out
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    elif cfg.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x_t - (1 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x_t
    elif cfg.prediction_type == "sample":
        x0 = out
        eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    else:
        raise GenrewardError(f"unsupported scheduler prediction_type '{cfg.prediction_type}'")
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std, x0


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Per-sample log N(x; mean, std²), reduced over non-batch dims by mean (DDPO default) or sum.

    ``x`` is treated as data: it is detached, so gradients flow only through ``mean``.
    """
    x = x.detach().float()
    elem = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return reduce_elements(elem, reduction)


def reduce_elements(elem: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Reduce per-element log-densities over all non-batch dims: ``mean`` (DDPO/PRDP convention) or ``sum``."""
    dims = tuple(range(1, elem.ndim))
    if reduction == "mean":
        return elem.mean(dim=dims)
    if reduction == "sum":
        return elem.sum(dim=dims)
    raise GenrewardError(f"log-prob reduction must be 'mean' or 'sum', got '{reduction}'")


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    variance_noise: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic DDIM step and log π(x_{t'} | x_t) (ddpo.md §3).

    Sampling mode (``prev_sample`` None): x_{t'} = μ_θ + σ_t·z with z from ``variance_noise`` or the
    generator(s) (one generator per sample keeps each sample independent of its batch), rounded to
    ``sample.dtype`` first, so the returned log-prob is that of the returned (stored) x_{t'} and
    re-evaluating it with ``prev_sample=`` gives the same value bit for bit. Evaluation mode: the log-prob
    of the given ``prev_sample``. The density arithmetic is fp32 in both. η must be > 0 (σ_t = 0 has no density).
    """
    if not eta > 0:
        raise GenrewardError(f"DDIM log-probabilities need eta > 0 (got eta={eta}); eta=0 is deterministic and has no density")
    mean, std, _ = ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        if variance_noise is None:
            variance_noise = randn_like_per_sample(mean, generator)
        # Round to the stored dtype *before* the density: the recorded log-prob must belong to the latent
        # the trajectory keeps (fp16/bf16 rounding of x_{t'} otherwise shifts the recomputed ratio).
        prev_sample = (mean + std * variance_noise.float()).to(sample.dtype)
    log_prob = gaussian_log_prob(prev_sample, mean, std, reduction)  # fp32 arithmetic at the stored value
    return prev_sample.to(sample.dtype), log_prob


def randn_like_per_sample(like: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``; one generator per sample when a list is given."""
    if isinstance(generator, (list, tuple)):
        return torch.stack(
            [torch.randn(like.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
        ).to(like.device)
    gen_device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=gen_device, dtype=torch.float32).to(like.device)



# ------------------------------------------------------------------- flow-matching step (Flow-GRPO, CPS, Dance)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least fp32: fp16/bf16/fp32 inputs compute in fp32, fp64 inputs stay fp64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _per_sample_flow(value: torch.Tensor, batch: int, ndim: int) -> torch.Tensor:
    """Scalar (0-dim or 1 element) stays 0-dim; [B] becomes [B, 1, …, 1] against an ``ndim``-dim latent."""
    if value.numel() == 1:
        return value.reshape(())
    if value.numel() != batch:
        raise ValueError(f"a per-sample value must have {batch} entries, got shape {tuple(value.shape)}")
    return value.reshape(batch, *([1] * (ndim - 1)))


def _batch_shape(value: torch.Tensor, batch: int, ndim: int) -> torch.Tensor:
    """Broadcast a 0-dim or [B, 1, …] per-sample value to [B, 1, …, 1]."""
    return value.reshape(-1, *([1] * (ndim - 1))).expand(batch, *([1] * (ndim - 1))) if value.ndim == 0 else value


def flow_mean_std(
    sigmas: torch.Tensor | Sequence[float],
    model_output: torch.Tensor,
    sample: torch.Tensor,
    step_index: int | torch.Tensor,
    noise_level: float | torch.Tensor,
    kind: FlowKind = "sde",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean μ, returned std and transition std τ of one step σ_i → σ_{i+1} (flow_grpo.md §4.2–4.4).

    ``sigmas`` is the full table (N+1 entries, last 0), ``step_index`` an int or a per-sample LongTensor [B],
    ``noise_level`` the kernel's a (``'sde'``, ``'cps'``) or η (``'dance'``), a float or per-sample [B].
    Arithmetic in at least fp32. Returns (mean [like sample], std [B,1,…,1], tau [B,1,…,1]) where std is what
    the step returns (s_i for ``'sde'``, the transition std for the others) and x_{i+1} = μ + τ·z.
    """
    if kind not in KINDS:
        raise GenrewardError(f"flow step kind must be one of {', '.join(KINDS)}, got '{kind}'")
    dtype = _compute_dtype(sample, model_output)
    device = sample.device
    batch, ndim = sample.shape[0], sample.ndim
    table = torch.as_tensor(sigmas).to(device=device, dtype=dtype).reshape(-1)
    if table.numel() < 2:
        raise ValueError(f"the sigma table needs at least 2 entries (N+1 for N steps), got {table.numel()}")
    idx = torch.as_tensor(step_index, dtype=torch.long)
    if idx.device.type == "cpu" and bool(((idx < 0) | (idx >= table.numel() - 1)).any()):  # no device sync
        raise ValueError(f"step index out of range for a {table.numel() - 1}-step table: {step_index}")
    idx = idx.to(device)
    sigma = _per_sample_flow(table[idx], batch, ndim)
    sigma_next = _per_sample_flow(table[idx + 1], batch, ndim)
    if isinstance(noise_level, (int, float)) and not noise_level >= 0:
        raise GenrewardError(f"noise_level must be >= 0, got {noise_level}")
    a = _per_sample_flow(torch.as_tensor(noise_level, dtype=dtype).to(device), batch, ndim)
    x = sample.to(dtype)
    v = model_output.to(dtype)
    dt = sigma_next - sigma  # Δ < 0
    if kind == "sde":
        # The first step (σ = 1) divides by 1 − σ_1 instead of 1 − σ: the official code's sigma_max is sigmas[1].
        sigma_tilde = torch.where(sigma == 1, table[1], sigma)
        std = a * torch.sqrt(sigma / (1 - sigma_tilde))
        mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
        tau = std * torch.sqrt(-dt)
    elif kind == "cps":
        std = sigma_next * torch.sin(a * (math.pi / 2))
        x0 = x - sigma * v
        x1 = x + (1 - sigma) * v
        mean = x0 * (1 - sigma_next) + x1 * torch.sqrt((sigma_next**2 - std**2).clamp(min=0))
        tau = std
    else:  # dance
        std = a * torch.sqrt(sigma - sigma_next)
        x0 = x - sigma * v
        score = -(x - x0 * (1 - sigma)) / sigma**2
        mean = x + dt * v + (-0.5 * a**2 * score) * dt
        tau = std
    return mean, _batch_shape(std, batch, ndim), _batch_shape(tau, batch, ndim)


def flow_step_with_logprob(
    sigmas: torch.Tensor | Sequence[float],
    model_output: torch.Tensor,
    sample: torch.Tensor,
    step_index: int | torch.Tensor,
    noise_level: float | torch.Tensor,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    kind: FlowKind = "sde",
    reduction: Reduction = "mean",
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stochastic flow-matching step and log π(x_{i+1} | x_i) (flow_grpo.md §4).

    Sampling mode (``prev_sample`` None): x_{i+1} = μ + τ·z with z = ``noise`` or drawn from ``generator``
    (one generator per sample keeps a sample independent of its batch), rounded to ``sample.dtype`` *before*
    the density, so the log-prob belongs to the stored latent and re-evaluating it with ``prev_sample=``
    gives the same value. Evaluation mode: the log-prob of the given ``prev_sample`` (detached: gradients
    reach only μ, i.e. ``model_output`` and ``sample``).

    log p: ``'sde'``/``'dance'`` the Gaussian log-density, ``'cps'`` the unnormalised −(x_{i+1} − μ)²;
    reduced over non-batch dims by ``reduction`` (mean = the official convention, or sum).
    ``noise_level`` 0 gives exactly the diffusers Euler step for sample and mean; its log p is NaN for
    ``'sde'``/``'dance'`` (no density; do not train on it) and 0 for ``'cps'``.

    Returns (prev_sample in ``sample.dtype``, log_prob [B] (fp32 or fp64), mean, std [B,1,…,1]) with std = s_i
    for ``'sde'`` (the transition std is s_i·sqrt(σ_i − σ_{i+1})) and the transition std for the others.
    """
    mean, std, tau = flow_mean_std(sigmas, model_output, sample, step_index, noise_level, kind)
    if prev_sample is None:
        if noise is None:
            noise = randn_like_per_sample(mean, generator)
        # Round to the stored dtype first: the recorded log-prob must be that of the latent the caller keeps.
        prev_sample = (mean + tau * noise.to(device=mean.device, dtype=mean.dtype)).to(sample.dtype)
    x_next = prev_sample.detach().to(mean.dtype)
    sq = (x_next - mean) ** 2
    if kind == "cps":
        log_prob = reduce_elements(-sq, reduction)
    else:
        elem = -sq / (2 * tau**2) - torch.log(tau) - _HALF_LOG_2PI
        log_prob = reduce_elements(elem, reduction)
        # τ = 0 (noise level 0) has no density: report NaN explicitly rather than a 0/0 or an inf.
        log_prob = torch.where(tau.reshape(-1) > 0, log_prob, torch.full_like(log_prob, float("nan")))
    return prev_sample.to(sample.dtype), log_prob, mean, std


def euler_step(
    sigmas: torch.Tensor | Sequence[float], model_output: torch.Tensor, sample: torch.Tensor, step_index: int | torch.Tensor
) -> torch.Tensor:
    """The deterministic Euler step x + (σ_{i+1} − σ_i)·v exactly as diffusers' ``FlowMatchEulerDiscreteScheduler``
    computes it (fp32, then cast to ``sample.dtype``; diffusers casts to the model output's dtype, the same thing
    when the two match): the a = 0 steps outside a Fast / MixGRPO window."""
    dtype = _compute_dtype(sample, model_output)
    table = torch.as_tensor(sigmas).to(device=sample.device, dtype=dtype).reshape(-1)
    idx = torch.as_tensor(step_index, dtype=torch.long).to(sample.device)
    dt = _per_sample_flow(table[idx + 1] - table[idx], sample.shape[0], sample.ndim)
    return (sample.to(dtype) + dt * model_output.to(dtype)).to(sample.dtype)



# ------------------------------------------------------------------------------ SD helpers (tensor API)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], negative_prompt: str | Sequence[str] = "") -> tuple[torch.Tensor, torch.Tensor]:
    """SD text embeddings (cond, uncond) [B, L, D] with the pipeline's own tokenizer and text encoder."""
    from genreward.models.families import family_of

    cond, uncond = family_of(pipe).encode(prompts, negative_prompt, guidance=True)
    return cond["encoder_hidden_states"], uncond["encoder_hidden_states"]


def guided_model_output(
    unet, latents: torch.Tensor, timestep, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float
) -> torch.Tensor:
    """SD U-Net prediction with classifier-free guidance ε_u + w·(ε_c − ε_u) on raw embeddings (one batched forward)."""
    from genreward.models.families.base import Conditioning, guided

    t = torch.as_tensor(timestep, device=latents.device)
    forward = lambda x, tt, c: unet(x, tt, encoder_hidden_states=c["encoder_hidden_states"]).sample  # noqa: E731
    un = None if uncond is None else Conditioning({"encoder_hidden_states": uncond})
    return guided(forward, latents, t, Conditioning({"encoder_hidden_states": cond}), un, guidance_scale)


def decode_latents(pipe, latents: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """VAE decode → images [B,3,H,W] in [0,1] (the pipeline's ``output_type='pt'`` math), for any family."""
    from genreward.models.families import family_of

    return family_of(pipe).decode(latents, height, width)


def initial_latents(pipe, batch: int, height: int, width: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """x_T ~ N(0, I) (×init_noise_sigma for DDIM), one generator per sample, in the denoiser's dtype."""
    from genreward.models.families import family_of

    family = family_of(pipe)
    return family.initial_latents(batch, height, width, generators, family.denoiser.dtype)


def check_guidance_scale(guidance_scale: float, key: str = "guidance_scale") -> None:
    """Guidance weight w: must be a finite number >= 0. CFG families: w <= 1 switches CFG off (the conditional
    prediction alone, as diffusers does), w > 1 extrapolates away from the unconditional one. FLUX: the embedded scale."""
    try:
        ok = not isinstance(guidance_scale, bool) and math.isfinite(float(guidance_scale)) and float(guidance_scale) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise GenrewardError(f"{key} must be a number >= 0 (1 or less switches classifier-free guidance off), "
                             f"got {guidance_scale!r}")


def _is_int(value) -> bool:
    try:
        return int(value) == value
    except (TypeError, ValueError, OverflowError):
        return False


def check_image_size(pipe, height: int | None, width: int | None, unet=None, prefix: str = "") -> None:
    """A one-line error naming the nearest valid sizes when ``height``/``width`` do not suit this pipeline
    (``None`` = the denoiser's native size). ``prefix`` names the config section, e.g. ``"sample."``.
    SD 1.x/2.x: multiples of 8 (VAE) × 8 (U-Net downsampling) = 64; SD3/FLUX: 8 × 2 (patches / packing) = 16."""
    from genreward.models.families import family_of

    if height is None and width is None:
        return
    family_of(pipe).check_size(height, width, prefix)


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample: sample i is reproducible whatever batch or process it lands in."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


# ------------------------------------------------------------------------------------------------ sampler

FLOW_NOISE_LEVEL = 0.7  # Flow-GRPO's a (docs/algorithms/flow_grpo.md §7)


@torch.no_grad()
def sample_trajectories(
    pipe,
    prompts: Sequence[str],
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    negative_prompt: str | Sequence[str] = "",
    seeds: Sequence[int] | None = None,
    latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    reduction: Reduction = "mean",
    batch_size: int | None = None,
    unet=None,
    progress: bool = False,
    noise_level: float | None = None,
    flow_kind: FlowKind = "sde",
    sde_window: tuple[int, int] | None = None,
    family: str | None = None,
) -> Trajectory:
    """Sample B trajectories, recording every latent and per-step log-prob (ddpo.md §4, flow_grpo.md §4).

    ``seeds`` (one per prompt) drive the initial latents and the step noise; ``latents`` overrides x_T.
    DDIM families: ``eta`` = 0 gives deterministic DDIM (images only, ``log_probs`` None). Flow families:
    ``noise_level`` is a (None = 0.7; 0 = the diffusers Euler ODE sampler exactly), ``flow_kind`` the kernel,
    ``sde_window`` = (start, size) makes only those steps stochastic (Flow-GRPO-Fast / MixGRPO). ``unet`` overrides
    the pipeline's denoiser (U-Net or transformer, e.g. a training copy); it runs in eval mode (no dropout) and
    gets its previous train/eval flags back afterwards. ``family`` overrides the detected model family.
    """
    from genreward.models.families import family_of

    fam = family_of(pipe, family)
    prompts = list(prompts)
    if not prompts:
        raise GenrewardError("sample_trajectories needs at least one prompt")
    if eta < 0:
        raise GenrewardError(f"eta must be >= 0, got {eta}")
    if isinstance(num_steps, bool) or not _is_int(num_steps) or num_steps < 1:
        raise GenrewardError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    check_guidance_scale(guidance_scale)
    fam.check_size(height, width)
    fam.check_negative_prompt(negative_prompt, "negative_prompt")
    if noise_level is not None and not (isinstance(noise_level, (int, float)) and math.isfinite(noise_level) and noise_level >= 0):
        raise GenrewardError(f"noise_level must be a number >= 0, got {noise_level!r}")
    if flow_kind not in KINDS:
        raise GenrewardError(f"flow_kind must be one of {', '.join(KINDS)}, got {flow_kind!r}")
    if seeds is None:
        seeds = list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise GenrewardError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    batch_size = batch_size or len(prompts)
    model = unet or fam.denoiser
    settings = dict(num_steps=int(num_steps), guidance_scale=float(guidance_scale), eta=float(eta), reduction=reduction,
                    noise_level=FLOW_NOISE_LEVEL if noise_level is None else float(noise_level), flow_kind=flow_kind,
                    sde_window=sde_window)
    parts = []
    chunks = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="sampling", unit="batch", leave=False)
    with eval_mode(model):
        for start in chunks:
            stop = start + batch_size
            negatives = negative_prompt if isinstance(negative_prompt, str) else list(negative_prompt)[start:stop]
            parts.append(_sample_batch(fam, model, prompts[start:stop], negatives, list(seeds[start:stop]),
                                       None if latents is None else latents[start:stop], height, width, **settings))
    return parts[0] if len(parts) == 1 else Trajectory.cat(parts)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode, then restore every submodule's own train/eval flag.

    Sampling must be deterministic given the seeds: in train mode dropout (e.g. LoRA dropout) draws a fresh
    mask on every forward, so the recorded log-probs would not be reproducible by a later recompute.
    Flags are restored per submodule (not ``train(was_training)``), so a mixed-mode model comes back as it was.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def flow_schedule(fam: "ModelFamily", num_steps: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [T+1], timesteps [T]) of a flow family's scheduler for this size, as its pipeline sets them."""
    from genreward.flow import scheduler_sigmas

    seq_len = fam.image_seq_len(height, width)
    sigmas = scheduler_sigmas(fam.scheduler, num_steps, image_seq_len=seq_len).to(device)
    return sigmas, sigmas[:-1] * fam.scheduler.config.num_train_timesteps


def _sample_batch(fam: "ModelFamily", model, prompts, negative_prompt, seeds, latents, height, width, *, num_steps,
                  guidance_scale, eta, reduction, noise_level, flow_kind, sde_window) -> Trajectory:
    device = model.device
    default_h, default_w = fam.default_size()
    height, width = height or default_h, width or default_w
    generators = make_generators(seeds, device)
    use_cfg = guidance_scale > 1.0 and fam.supports_negative_prompt
    cond, uncond = fam.encode(prompts, negative_prompt, use_cfg, height, width)
    x = (fam.initial_latents(len(prompts), height, width, generators, model.dtype) if latents is None
         else latents.to(device, model.dtype))
    all_latents, all_log_probs = [x], []
    flow = dict(kernel=fam.kernel)
    if fam.kernel == "ddim":
        scheduler = fam.scheduler
        scheduler.set_timesteps(num_steps, device=device)
        timesteps = scheduler.timesteps
        for t in timesteps:
            out = fam.denoise(model, x, t, cond, uncond, guidance_scale)
            if eta > 0:
                x, log_prob = ddim_step_with_logprob(scheduler, out, t, x, eta, generator=generators, reduction=reduction)
                all_log_probs.append(log_prob)
            else:
                mean, _, _ = ddim_mean_std(scheduler, out, t, x, 0.0)
                x = mean.to(x.dtype)
            all_latents.append(x)
        timesteps = timesteps.detach().clone().long()
    else:
        from genreward.flow import noise_levels

        sigmas, timesteps = flow_schedule(fam, num_steps, height, width, device)
        levels = torch.tensor(noise_levels(num_steps, noise_level, sde_window), dtype=torch.float32)
        for k, t in enumerate(timesteps):
            out = fam.denoise(model, x, t, cond, uncond, guidance_scale)
            if levels[k] > 0:
                x, log_prob, _, _ = flow_step_with_logprob(sigmas, out, x, k, float(levels[k]), kind=flow_kind,
                                                           reduction=reduction, generator=generators)
            else:
                x = euler_step(sigmas, out, x, k)
                log_prob = torch.full((x.shape[0],), float("nan"), device=device)
            all_log_probs.append(log_prob.float())
            all_latents.append(x)
        if not bool((levels > 0).any()):
            all_log_probs = []
        flow.update(sigmas=sigmas.detach().clone(), noise_levels=levels, flow_kind=flow_kind)
        timesteps = timesteps.detach().clone()
    images = fam.decode(x, height, width)
    return Trajectory(
        prompts=list(prompts),
        latents=torch.stack(all_latents, dim=1),
        timesteps=timesteps,
        log_probs=torch.stack(all_log_probs, dim=1) if all_log_probs else None,
        images=images,
        cond=cond,
        uncond=uncond if use_cfg else None,
        guidance_scale=guidance_scale,
        eta=eta,
        seeds=list(seeds),
        height=height,
        width=width,
        **flow,
    )


def step_log_prob(
    model,
    family: "ModelFamily",
    trajectory: Trajectory,
    step: int | torch.Tensor,
    index: torch.Tensor | slice | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """log π_θ(x_{k+1} | x_k, c) of the stored transition ``step`` under ``model`` (with the trajectory's guidance
    and kernel parameters), through ``family`` (:func:`genreward.models.families.family_of`).

    ``step`` is one step index for the whole sub-batch, or a LongTensor with one step per selected sample
    (DDPO shuffles the time order of each sample). Gradients flow through the model's prediction only (the
    stored next latent is data). ``index`` picks a sub-batch. The model is used in whatever mode it is in (this is
    also the loss's forward): callers that need ratio 1 against the recorded log-probs put it in eval mode, as
    :func:`sample_trajectories` does.
    """
    return step_terms(model, family, trajectory, step, index, reduction)[0]


def step_terms(
    model,
    family: "ModelFamily",
    trajectory: Trajectory,
    step: int | torch.Tensor,
    index: torch.Tensor | slice | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-prob [B], transition mean μ_θ, std [B,1,…]) of stored transitions; see :func:`step_log_prob`. The mean and
    std are what a KL to a reference needs (flow: the std the step returns, s_i for 'sde'; DDIM: σ_t)."""
    idx = slice(None) if index is None else index
    per_sample = isinstance(step, torch.Tensor) and step.ndim == 1
    if per_sample:
        rows = torch.arange(len(trajectory), device=step.device)[idx]
        steps = step.to(rows.device)
        x_t = trajectory.latents[rows, steps]
        x_next = trajectory.latents[rows, steps + 1]
        t = trajectory.timesteps.to(steps.device)[steps]
    else:
        steps = int(step)
        x_t = trajectory.latents[idx, steps]
        x_next = trajectory.latents[idx, steps + 1]
        t = trajectory.timesteps[steps]
    cond = trajectory.cond.select(idx)
    uncond = None if trajectory.uncond is None else trajectory.uncond.select(idx)
    if trajectory.kernel == "ddim":
        scheduler = family.scheduler
        if scheduler.num_inference_steps != trajectory.num_steps:
            scheduler.set_timesteps(trajectory.num_steps, device=trajectory.latents.device)
        out = family.denoise(model, x_t, t, cond, uncond, trajectory.guidance_scale)
        if not trajectory.eta > 0:
            raise GenrewardError(f"DDIM log-probabilities need eta > 0 (got eta={trajectory.eta}); eta=0 has no density")
        mean, std, _ = ddim_mean_std(scheduler, out, t, x_t, trajectory.eta)
        return gaussian_log_prob(x_next, mean, std, reduction), mean, std  # as ddim_step_with_logprob(prev_sample=)
    out = family.denoise(model, x_t, t.to(x_t.device), cond, uncond, trajectory.guidance_scale)
    levels = trajectory.noise_levels.to(x_t.device)
    level = levels[steps] if per_sample else float(levels[steps])
    _, log_prob, mean, std = flow_step_with_logprob(trajectory.sigmas, out, x_t, steps, level, prev_sample=x_next,
                                                    kind=trajectory.flow_kind, reduction=reduction)
    return log_prob, mean, std
