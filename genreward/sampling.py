"""The one DDIM sampler with per-step log-probabilities (DDPO/PRDP convention).

Spec: docs/algorithms/ddpo.md §3–4. ``ddim_step_with_logprob`` is the transition
π_θ(x_{t'} | x_t, c) and its Gaussian log-density; ``sample_trajectories`` runs the full CFG sampler and
returns a :class:`Trajectory`; ``step_log_prob`` recomputes the log-prob of stored transitions under a
given U-Net (the trainers' hot path).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch

from genreward.errors import GenrewardError

Reduction = Literal["mean", "sum"]
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class Trajectory:
    """B sampled trajectories of T DDIM steps.

    ``latents[:, k]`` is the latent before step k (``latents[:, 0]`` = x_T, ``latents[:, T]`` = x_0);
    ``log_probs[:, k]`` is log π(latents[:, k+1] | latents[:, k]) recorded at sampling time (None for η = 0).
    """

    prompts: list[str]
    latents: torch.Tensor  # [B, T+1, C, h, w]
    timesteps: torch.Tensor  # [T] (int64), the scheduler's timesteps in sampling order
    log_probs: torch.Tensor | None  # [B, T] float32
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    prompt_embeds: torch.Tensor  # [B, L, D]
    negative_prompt_embeds: torch.Tensor | None  # [B, L, D] (None when guidance is off)
    guidance_scale: float
    eta: float
    seeds: list[int] | None = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> "Trajectory":
        """The sub-batch ``index`` (same type, tensors indexed on dim 0)."""
        idx = index if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)
        pick = (lambda xs: [xs[i] for i in idx.tolist()]) if not isinstance(idx, slice) else (lambda xs: list(xs[idx]))
        return Trajectory(
            prompts=pick(self.prompts),
            latents=self.latents[idx],
            timesteps=self.timesteps,
            log_probs=None if self.log_probs is None else self.log_probs[idx],
            images=self.images[idx],
            prompt_embeds=self.prompt_embeds[idx],
            negative_prompt_embeds=None if self.negative_prompt_embeds is None else self.negative_prompt_embeds[idx],
            guidance_scale=self.guidance_scale,
            eta=self.eta,
            seeds=None if self.seeds is None else pick(self.seeds),
        )

    @staticmethod
    def cat(parts: Sequence["Trajectory"]) -> "Trajectory":
        first = parts[0]
        return Trajectory(
            prompts=[p for t in parts for p in t.prompts],
            latents=torch.cat([t.latents for t in parts]),
            timesteps=first.timesteps,
            log_probs=None if first.log_probs is None else torch.cat([t.log_probs for t in parts]),
            images=torch.cat([t.images for t in parts]),
            prompt_embeds=torch.cat([t.prompt_embeds for t in parts]),
            negative_prompt_embeds=None
            if first.negative_prompt_embeds is None
            else torch.cat([t.negative_prompt_embeds for t in parts]),
            guidance_scale=first.guidance_scale,
            eta=first.eta,
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


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], negative_prompt: str | Sequence[str] = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings (cond, uncond) [B, L, D] with the pipeline's own tokenizer and text encoder."""
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    cond, uncond = pipe.encode_prompt(
        list(prompts),
        device=pipe.unet.device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=negatives,
    )
    return cond, uncond


def guided_model_output(
    unet, latents: torch.Tensor, timestep, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float
) -> torch.Tensor:
    """U-Net prediction with classifier-free guidance: ε_u + w·(ε_c − ε_u) (one batched forward)."""
    t = torch.as_tensor(timestep, device=latents.device)
    if uncond is None or guidance_scale == 1.0:
        return unet(latents, t, encoder_hidden_states=cond).sample
    t_both = torch.cat([t, t]) if t.ndim == 1 else t  # per-sample timesteps repeat for the [uncond, cond] batch
    pred = unet(torch.cat([latents, latents]), t_both, encoder_hidden_states=torch.cat([uncond, cond])).sample
    pred_uncond, pred_cond = pred.chunk(2)
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode → images [B,3,H,W] in [0,1] (same math as the pipeline's ``output_type='pt'``)."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def initial_latents(pipe, batch: int, height: int, width: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """x_T ~ N(0, I)·init_noise_sigma, one generator per sample, in the U-Net's dtype."""
    shape = (batch, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    dummy = torch.empty(shape, device=pipe.unet.device)
    noise = randn_like_per_sample(dummy, list(generators))
    return (noise * pipe.scheduler.init_noise_sigma).to(pipe.unet.dtype)


def check_guidance_scale(guidance_scale: float, key: str = "guidance_scale") -> None:
    """Classifier-free guidance weight w: must be a finite number >= 0. w <= 1 switches CFG off (the sampler then
    uses the conditional prediction alone, as diffusers does); w > 1 extrapolates away from the unconditional one."""
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


def image_size_multiple(pipe, unet=None) -> tuple[int, int, int]:
    """(multiple, VAE factor, U-Net downsampling): image sides must be multiples of VAE factor × U-Net downsampling.

    The VAE maps ``f`` pixels to one latent, and the U-Net halves the latent once per down block but the last, so
    other sizes are silently cropped (the VAE floors) or interpolated inside the U-Net. SD 1.x/2.x: 8 × 8 = 64.
    """
    unet = unet or pipe.unet
    vae = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    blocks = getattr(unet.config, "block_out_channels", None) or getattr(unet.config, "down_block_types", ())
    down = 2 ** max(len(blocks) - 1, 0)
    return vae * down, vae, down


def check_image_size(pipe, height: int | None, width: int | None, unet=None, prefix: str = "") -> None:
    """A one-line error naming the nearest valid sizes when ``height``/``width`` do not suit this pipeline
    (``None`` = the U-Net's native size). ``prefix`` names the config section, e.g. ``"sample."``."""
    if height is None and width is None:
        return
    multiple, vae, down = image_size_multiple(pipe, unet)
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if isinstance(value, bool) or not _is_int(value) or value < 1:
            raise GenrewardError(f"{prefix}{name} must be a positive integer, got {value!r}")
        if value % multiple:
            lower = value // multiple * multiple
            options = " or ".join(str(v) for v in (lower, lower + multiple) if v > 0)
            raise GenrewardError(
                f"{prefix}{name}={value} does not suit this model: image sizes must be multiples of {multiple} "
                f"(VAE factor {vae} × U-Net downsampling {down}); use {options}"
            )


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample: sample i is reproducible whatever batch or process it lands in."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


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
    batch_size: int | None = None,
    height: int | None = None,
    width: int | None = None,
    reduction: Reduction = "mean",
    unet=None,
    progress: bool = False,
) -> Trajectory:
    """Sample B trajectories with CFG, recording every latent and per-step log-prob (ddpo.md §4).

    ``seeds`` (one per prompt) drive the initial latents and the step noise; ``latents`` overrides x_T.
    ``eta = 0`` gives deterministic DDIM (images only, ``log_probs`` None). ``unet`` overrides the
    pipeline's U-Net (e.g. a training copy); the rest of the pipeline is used as is. The U-Net runs in
    eval mode (no dropout) and gets its previous train/eval flags back afterwards.
    """
    prompts = list(prompts)
    if not prompts:
        raise GenrewardError("sample_trajectories needs at least one prompt")
    if eta < 0:
        raise GenrewardError(f"eta must be >= 0, got {eta}")
    if isinstance(num_steps, bool) or not _is_int(num_steps) or num_steps < 1:
        raise GenrewardError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    check_guidance_scale(guidance_scale)
    check_image_size(pipe, height, width, unet=unet)
    if seeds is None:
        seeds = list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise GenrewardError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    batch_size = batch_size or len(prompts)
    unet = unet or pipe.unet
    parts = []
    chunks = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="sampling", unit="batch", leave=False)
    with eval_mode(unet):
        for start in chunks:
            stop = start + batch_size
            parts.append(
                _sample_batch(
                    pipe,
                    prompts[start:stop],
                    num_steps,
                    guidance_scale,
                    eta,
                    negative_prompt if isinstance(negative_prompt, str) else list(negative_prompt)[start:stop],
                    list(seeds[start:stop]),
                    None if latents is None else latents[start:stop],
                    height,
                    width,
                    reduction,
                    unet,
                )
            )
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


def _sample_batch(pipe, prompts, num_steps, guidance_scale, eta, negative_prompt, seeds, latents, height, width, reduction, unet):
    device = unet.device
    height = height or unet.config.sample_size * pipe.vae_scale_factor
    width = width or unet.config.sample_size * pipe.vae_scale_factor
    generators = make_generators(seeds, device)
    cond, uncond = encode_prompts(pipe, prompts, negative_prompt)
    use_cfg = guidance_scale > 1.0
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    x = initial_latents(pipe, len(prompts), height, width, generators) if latents is None else latents.to(device, unet.dtype)
    all_latents, all_log_probs = [x], []
    for t in timesteps:
        model_input = scheduler.scale_model_input(x, t)
        out = guided_model_output(unet, model_input, t, cond, uncond if use_cfg else None, guidance_scale)
        if eta > 0:
            x, log_prob = ddim_step_with_logprob(scheduler, out, t, x, eta, generator=generators, reduction=reduction)
            all_log_probs.append(log_prob)
        else:
            mean, _, _ = ddim_mean_std(scheduler, out, t, x, 0.0)
            x = mean.to(x.dtype)
        all_latents.append(x)
    images = decode_latents(pipe, x)
    return Trajectory(
        prompts=list(prompts),
        latents=torch.stack(all_latents, dim=1),
        timesteps=timesteps.detach().clone().long(),
        log_probs=torch.stack(all_log_probs, dim=1) if all_log_probs else None,
        images=images,
        prompt_embeds=cond,
        negative_prompt_embeds=uncond if use_cfg else None,
        guidance_scale=guidance_scale,
        eta=eta,
        seeds=list(seeds),
    )


def step_log_prob(
    unet,
    scheduler,
    trajectory: Trajectory,
    step: int | torch.Tensor,
    index: torch.Tensor | slice | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """log π_θ(x_{t'} | x_t, c) of the stored transition ``step`` under ``unet`` (with the trajectory's CFG).

    ``step`` is one step index for the whole sub-batch, or a LongTensor with one step per selected sample
    (DDPO shuffles the time order of each sample). Gradients flow through the U-Net's prediction only (the
    stored next latent is data). ``index`` picks a sub-batch. The scheduler is set to the trajectory's steps.
    The U-Net is used in whatever mode it is in (this is also the loss's forward): callers that need ratio 1
    against the recorded log-probs put it in eval mode, as :func:`sample_trajectories` does.
    """
    idx = slice(None) if index is None else index
    if scheduler.num_inference_steps != trajectory.num_steps:
        scheduler.set_timesteps(trajectory.num_steps, device=trajectory.latents.device)
    if isinstance(step, torch.Tensor) and step.ndim == 1:
        rows = torch.arange(len(trajectory), device=step.device)[idx]
        steps = step.to(rows.device)
        x_t = trajectory.latents[rows, steps]
        x_next = trajectory.latents[rows, steps + 1]
        t = trajectory.timesteps.to(steps.device)[steps]
    else:
        x_t = trajectory.latents[idx, step]
        x_next = trajectory.latents[idx, step + 1]
        t = trajectory.timesteps[step]
    cond = trajectory.prompt_embeds[idx]
    uncond = None if trajectory.negative_prompt_embeds is None else trajectory.negative_prompt_embeds[idx]
    model_input = scheduler.scale_model_input(x_t, t)
    out = guided_model_output(unet, model_input, t, cond, uncond, trajectory.guidance_scale)
    _, log_prob = ddim_step_with_logprob(scheduler, out, t, x_t, trajectory.eta, prev_sample=x_next, reduction=reduction)
    return log_prob
