"""Text-to-3D training: SDS from a 2D diffusion prior + VLM3D's differentiable VLM reward (+ other rewards).

One step (docs/algorithms/vlm3d_sds.md §2–§4): sample cameras → render the voxel grid → each loss term computes
its loss on *detached copies* of the renders and back-propagates λ·loss into those pixels → one backward
through the renderer with the summed pixel gradients (plus the regularisers). This is the same gradient
as backward of Σ λ_k·loss_k, but each part (render, VAE encode, U-Net, VLM forward/backward) can be
timed on its own. Every term is a :class:`LossTerm` named ``k`` whose ``loss_k`` is weighted by ``lambda_k``
in one loop (threestudio style), and the logged ``loss`` is exactly Σ λ_k·loss_k of the logged terms.

Every random draw of step s comes from a generator seeded by (train.seed, s), so a resumed run reproduces an
uninterrupted one bit for bit. The run folder (config, metrics, ``checkpoints/checkpoint-<steps done>/``
with the grids and the optimiser as safetensors, resume, SIGINT/SIGTERM) is :class:`trainers.run_dir.RunDir`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from genreward.errors import GenrewardError
from genreward.models.device import resolve_device
from trainers.common import Timer, derived_seed, peak_rss_mb
from trainers.run_dir import CheckpointSection, RunDir, fault_point, load_tree, save_tree
from trainers.sds3d.cameras import CameraBatch, orbit_cameras, sample_cameras, view_directions, view_prompt
from trainers.sds3d.render import VoxelGrid, extract_mesh, render, sparsity_loss, total_variation
from trainers.sds3d.schedules import Schedule, check_schedule, is_zero, scheduled

log = logging.getLogger("genreward.sds3d")


def _range(value: list[float], key: str, lo: float = -math.inf, hi: float = math.inf) -> None:
    if len(value) != 2 or not value[0] <= value[1] or value[0] < lo or value[1] > hi:
        raise ValueError(f"key '{key}' must be [min, max] with {lo:g} <= min <= max <= {hi:g}, got {value!r}")


def _positive(obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ValueError(f"key '{section}.{name}' must be > 0, got {value!r}")


@dataclass
class GridSection:
    """The voxel grid (vlm3d_sds.md §3)."""

    resolution: int = 64
    radius: float = 1.0
    density_init: Literal["blob_magic3d", "none"] = "blob_magic3d"
    blob_density: float = 10.0
    blob_radius: float = 0.5
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    learned_background: bool = False

    def __post_init__(self) -> None:
        if self.resolution < 2:
            raise ValueError(f"key 'grid.resolution' must be >= 2, got {self.resolution}")
        _positive(self, "grid", "radius", "blob_radius")
        if len(self.background) != 3 or any(not 0 <= c <= 1 for c in self.background):
            raise ValueError(f"key 'grid.background' must be three values in [0, 1], got {self.background!r}")


@dataclass
class RenderSection:
    resolution: int = 64  # training render size (DreamFusion: 64×64)
    num_samples: int = 64  # S samples per ray
    jitter: bool = True  # stratified jitter of the samples during training

    def __post_init__(self) -> None:
        _positive(self, "render", "resolution", "num_samples")


@dataclass
class CameraSection:
    """Training cameras; defaults = threestudio's dreamfusion-sd.yaml as shipped in the VLM3D fork."""

    batch_size: int = 1
    elevation_range: list[float] = field(default_factory=lambda: [-10.0, 45.0])
    azimuth_range: list[float] = field(default_factory=lambda: [-180.0, 180.0])
    distance_range: list[float] = field(default_factory=lambda: [1.5, 2.0])
    fovy_range: list[float] = field(default_factory=lambda: [40.0, 70.0])
    uniform_sphere_prob: float = 0.5
    batch_uniform_azimuth: bool = True
    camera_perturb: float = 0.1
    center_perturb: float = 0.2
    up_perturb: float = 0.02
    view_dependent_prompting: bool = True
    prompt_prefix: bool = False  # "front view of {prompt}" instead of "{prompt}, front view"
    front_threshold: float = 45.0
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"key 'camera.batch_size' must be >= 1, got {self.batch_size}")
        _range(self.elevation_range, "camera.elevation_range", -90, 90)
        _range(self.azimuth_range, "camera.azimuth_range")
        _range(self.distance_range, "camera.distance_range", 0)
        _range(self.fovy_range, "camera.fovy_range", 0, 180)
        if self.distance_range[0] <= 0 or self.fovy_range[0] <= 0:
            raise ValueError(f"key 'camera.distance_range'/'camera.fovy_range' must be > 0, got {self.distance_range!r}, {self.fovy_range!r}")
        if not 0 <= self.uniform_sphere_prob <= 1:
            raise ValueError(f"key 'camera.uniform_sphere_prob' must be in [0, 1], got {self.uniform_sphere_prob}")
        for name in ("camera_perturb", "center_perturb", "up_perturb"):
            if getattr(self, name) < 0:
                raise ValueError(f"key 'camera.{name}' must be >= 0, got {getattr(self, name)}")


@dataclass
class GuidanceSection:
    """SDS from an SD-family pipeline (vlm3d_sds.md §2)."""

    pipeline: str = "tiny:sd"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    guidance_scale: float = 100.0
    cfg_convention: Literal["threestudio", "standard"] = "threestudio"
    negative_prompt: str = ""
    min_step_percent: float | list[float] = 0.02
    max_step_percent: float | list[float] = 0.98
    weighting: Literal["sds", "uniform", "fantasia3d"] = "sds"
    grad_clip: float | None = None
    resolution: int | None = None  # None = the U-Net's native size (512 for SD 2.1-base)
    latent_mode: Literal["sample", "mean"] = "sample"

    def __post_init__(self) -> None:
        for name in ("min_step_percent", "max_step_percent"):
            value = getattr(self, name)
            check_schedule(value, f"guidance.{name}")
            ends = [value] if isinstance(value, (int, float)) else list(value)[-3:-1]
            if any(not 0 <= v <= 1 for v in ends):
                raise ValueError(f"key 'guidance.{name}' values must lie in [0, 1], got {value!r}")
        _positive(self, "guidance", "grad_clip", "resolution")


@dataclass
class VLMSection:
    """The VLM3D judge term (vlm3d_sds.md §4)."""

    enabled: bool = True
    model: str = "tiny:qwen2-vl"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    num_views: int = 4  # views per query, evenly spaced in azimuth from the step's first camera
    arrangement: Literal["separate", "grid2x2"] = "separate"
    image_size: int = 256  # each view is resized to this before the judge's own smart resize (256 → 252)
    render_resolution: int | None = None  # None = render.resolution
    form: Literal["log_odds", "prob"] = "log_odds"
    stop_step: int = 10000  # the term is switched off from this step on (VLM3D: after 10,000 calls)
    template: str | None = None
    criteria: str | None = None

    def __post_init__(self) -> None:
        if self.num_views < 1:
            raise ValueError(f"key 'vlm.num_views' must be >= 1, got {self.num_views}")
        if self.arrangement == "grid2x2" and self.num_views != 4:
            raise ValueError(f"key 'vlm.num_views' must be 4 with vlm.arrangement=grid2x2, got {self.num_views}")
        _positive(self, "vlm", "image_size", "render_resolution")
        if self.stop_step < 0:
            raise ValueError(f"key 'vlm.stop_step' must be >= 0, got {self.stop_step}")


@dataclass
class RewardTermSpec:
    """Any other differentiable reward as a loss term: loss_<label> = −mean(score), weight scheduled."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    weight: float | list[float] = 1.0
    label: str | None = None

    def __post_init__(self) -> None:
        check_schedule(self.weight, f"rewards.{self.label or self.name}.weight")

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class LossSection:
    """λ of every loss term: a number or a threestudio schedule [start_step, start_value, end_value, end_step]."""

    lambda_sds: float | list[float] = 1.0
    lambda_vlm: float | list[float] = field(default_factory=lambda: [0, 90.0, 0.0, 5000])
    lambda_sparsity: float | list[float] = 1.0
    lambda_tv_density: float | list[float] = 0.0
    lambda_tv_color: float | list[float] = 0.0

    def __post_init__(self) -> None:
        for name in ("lambda_sds", "lambda_vlm", "lambda_sparsity", "lambda_tv_density", "lambda_tv_color"):
            check_schedule(getattr(self, name), f"loss.{name}")


@dataclass
class GridOptimSection:
    """Adam on the voxel grids (threestudio's grid-encoding settings); the diffusion trainers use ``trainers.common.OptimSection``."""

    lr: float = 0.01  # both grids (threestudio's grid-encoding lr)
    lr_background: float = 0.001
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-15

    def __post_init__(self) -> None:
        _positive(self, "optim", "lr", "lr_background", "eps")
        if len(self.betas) != 2 or any(not 0 <= b < 1 for b in self.betas):
            raise ValueError(f"key 'optim.betas' must be two values in [0, 1), got {self.betas!r}")


@dataclass
class TrainSection3D:
    steps: int = 10000
    seed: int = 0
    device: str = "auto"
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"key 'train.steps' must be >= 1, got {self.steps}")
        if self.log_every < 1:
            raise ValueError(f"key 'train.log_every' must be >= 1, got {self.log_every}")


@dataclass
class OutputSection:
    render_every: int = 500  # multi-view strip renders/step-XXXXXX.png (0 = never)
    render_views: int = 4
    eval_resolution: int = 128
    eval_elevation: float = 15.0
    eval_distance: float = 1.5
    eval_fovy: float = 70.0
    turntable_frames: int = 120
    fps: int = 30
    gif: bool = True
    mp4: bool = True
    mesh: bool = True
    mesh_threshold: float = 5.0  # density level of the marching-cubes surface (the blob init spans 0…10)
    gallery: bool = True

    # checkpointing moved to the run folder's own section, the same for every trainer
    __moved_keys__ = {"resume": "checkpoint.resume_from", "checkpoint_every": "checkpoint.every"}

    def __post_init__(self) -> None:
        if self.render_every < 0:
            raise ValueError(f"key 'output.render_every' must be >= 0, got {self.render_every}")
        _positive(self, "output", "render_views", "eval_resolution", "eval_distance", "eval_fovy", "turntable_frames", "fps")


@dataclass
class SDS3DConfig:
    output_dir: str
    trainer: Literal["sds3d"] = "sds3d"
    prompt: str = "a DSLR photo of a hamburger"
    grid: GridSection = field(default_factory=GridSection)
    render: RenderSection = field(default_factory=RenderSection)
    camera: CameraSection = field(default_factory=CameraSection)
    guidance: GuidanceSection = field(default_factory=GuidanceSection)
    vlm: VLMSection = field(default_factory=VLMSection)
    rewards: list[RewardTermSpec] = field(default_factory=list)
    loss: LossSection = field(default_factory=LossSection)
    optim: GridOptimSection = field(default_factory=GridOptimSection)
    train: TrainSection3D = field(default_factory=TrainSection3D)
    output: OutputSection = field(default_factory=OutputSection)
    # checkpoint.every counts steps: checkpoints/checkpoint-<steps done>/ (grids + optimiser, safetensors)
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(every=1000))

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("key 'prompt' must be a non-empty string, got ''")
        keys = [r.key for r in self.rewards]
        if len(set(keys)) != len(keys) or set(keys) & {"sds", "vlm", "sparsity", "tv_density", "tv_color"}:
            raise ValueError(f"key 'rewards' labels must be unique and not sds/vlm/sparsity/tv_*, got {keys!r}")


# -------------------------------------------------------------------------------------------- the system


@dataclass
class StepContext:
    """What the loss terms of one step see: its cameras, the training render and a detached copy of its pixels."""

    step: int
    generator: torch.Generator
    jitter: torch.Generator | None
    cams: CameraBatch
    out: Any  # RenderOutput of the training cameras (with graph to the grids)
    pixels: torch.Tensor  # out.rgb detached, requires_grad: terms on the renders back-propagate into it


@dataclass
class TermOutput:
    """``loss`` (a scalar); ``on`` = the detached render copy it was computed from (λ·loss is back-propagated into
    that copy at once, ``rgb`` is the copy's original with graph, ``grad_key`` names its logged gradient norm), or
    None for a term on the graph itself (the regularisers: λ·loss joins the one backward through the renderer)."""

    loss: torch.Tensor
    details: dict[str, float] = field(default_factory=dict)
    on: torch.Tensor | None = None
    rgb: torch.Tensor | None = None
    grad_key: str | None = None


@dataclass
class LossTerm:
    """One term of the objective: ``loss_<name>`` weighted by ``lambda_<name>`` (see :meth:`SDS3DSystem.lambdas`).

    A term with λ = 0 at a step is skipped, unless ``always`` (cheap diagnostics, e.g. the sparsity value)."""

    name: str
    compute: Callable[[StepContext], TermOutput]
    always: bool = False


class SDS3DSystem:
    """The 3D state, its optimiser, and the loss terms; ``step(s)`` runs one optimisation step."""

    def __init__(self, config: SDS3DConfig, guidance: Any = None, vlm_term: Any = None, reward_terms: list | None = None):
        from trainers.sds3d.guidance import SDSGuidance
        from trainers.sds3d.terms import RewardTerm, VLMTerm

        self.cfg = config
        self.device = resolve_device(config.train.device)
        g = config.grid
        self.grid = VoxelGrid(g.resolution, g.radius, g.density_init, g.blob_density, g.blob_radius, g.background,
                              g.learned_background).to(self.device)
        groups = [{"params": [self.grid.density_raw, self.grid.color_raw], "lr": config.optim.lr}]
        if self.grid.background_raw is not None:
            groups.append({"params": [self.grid.background_raw], "lr": config.optim.lr_background})
        self.optimizer = torch.optim.Adam(groups, betas=tuple(config.optim.betas), eps=config.optim.eps)
        self.step_count = 0
        self.timer = Timer()

        self.guidance = guidance
        if self.guidance is None and not is_zero(config.loss.lambda_sds):
            from genreward.models.pipeline import load_pipeline

            gc = config.guidance
            pipe = load_pipeline(gc.pipeline, device=self.device, dtype=gc.dtype)
            from genreward.models.families import family_of

            if family_of(pipe).name != "sd":
                raise GenrewardError(f"trainer sds3d takes its guidance from sd models; guidance.pipeline {gc.pipeline!r} "
                                     f"is a {family_of(pipe).name} model")
            self.guidance = SDSGuidance(pipe, gc.guidance_scale, gc.cfg_convention, gc.weighting, gc.min_step_percent,
                                        gc.max_step_percent, gc.grad_clip, gc.resolution, gc.latent_mode, gc.negative_prompt)
        self.vlm_term = vlm_term
        vc = config.vlm
        if self.vlm_term is None and vc.enabled and not is_zero(config.loss.lambda_vlm) and vc.stop_step > 0:
            self.vlm_term = VLMTerm(vc.model, vc.arrangement, vc.form, vc.image_size, vc.template, vc.criteria,
                                    device=self.device, dtype=vc.dtype)
        self.reward_terms = reward_terms if reward_terms is not None else [
            (spec, RewardTerm(spec.name, spec.options, spec.key)) for spec in config.rewards
        ]
        self.terms = self.loss_terms()

    # ------------------------------------------------------------------ schedules

    def lambdas(self, step: int) -> dict[str, float]:
        """Every λ at ``step``; λ_vlm is 0 from ``vlm.stop_step`` on (VLM3D switches the judge off)."""
        loss = self.cfg.loss
        out = {name: scheduled(getattr(loss, name), step) for name in
               ("lambda_sds", "lambda_vlm", "lambda_sparsity", "lambda_tv_density", "lambda_tv_color")}
        if not self.cfg.vlm.enabled or step >= self.cfg.vlm.stop_step:
            out["lambda_vlm"] = 0.0
        for spec, _ in self.reward_terms:
            out[f"lambda_{spec.key}"] = scheduled(spec.weight, step)
        return out

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(derived_seed(self.cfg.train.seed, step))

    def cameras(self, generator: torch.Generator) -> CameraBatch:
        c = self.cfg.camera
        return sample_cameras(c.batch_size, generator, c.elevation_range, c.azimuth_range, c.distance_range, c.fovy_range,
                              c.uniform_sphere_prob, c.batch_uniform_azimuth, c.camera_perturb, c.center_perturb, c.up_perturb)

    def prompts(self, cams: CameraBatch) -> list[str]:
        c = self.cfg.camera
        if not c.view_dependent_prompting:
            return [self.cfg.prompt] * len(cams)
        dirs = view_directions(cams.elevation, cams.azimuth, c.front_threshold, c.back_threshold, c.overhead_threshold)
        return [view_prompt(self.cfg.prompt, d, c.prompt_prefix) for d in dirs]

    def vlm_cameras(self, cams: CameraBatch) -> CameraBatch:
        """The judge's view set: ``num_views`` cameras evenly spaced in azimuth from the step's first camera."""
        return orbit_cameras(self.cfg.vlm.num_views, float(cams.elevation[0]), float(cams.distance[0]),
                             math.degrees(float(cams.fovy[0])), float(cams.azimuth[0]))

    # ------------------------------------------------------------------ loss terms

    def loss_terms(self) -> list[LossTerm]:
        """Every term, in the order it is applied (the order fixes the random draws and the summation order):
        the terms on the training renders (sds, reward terms), the judge on its own views (vlm), the regularisers."""
        terms: list[LossTerm] = []
        if self.guidance is not None:
            terms.append(LossTerm("sds", self._sds))
        for spec, term in self.reward_terms:
            terms.append(LossTerm(spec.key, self._reward(spec.key, term)))
        if self.vlm_term is not None:
            terms.append(LossTerm("vlm", self._vlm))
        terms.append(LossTerm("sparsity", self._sparsity, always=True))
        terms.append(LossTerm("tv_density", self._tv("density_raw")))
        terms.append(LossTerm("tv_color", self._tv("color_raw")))
        return terms

    def _sds(self, ctx: StepContext) -> TermOutput:
        sds = self.guidance(ctx.pixels, self.prompts(ctx.cams), ctx.step, ctx.generator, self.timer)
        return TermOutput(sds["loss_sds"], {"t": float(sds["t"].float().mean())}, ctx.pixels, ctx.out.rgb, "pixel_grad_norm")

    def _reward(self, key: str, term: Any) -> Callable[[StepContext], TermOutput]:
        def compute(ctx: StepContext) -> TermOutput:
            with self.timer(f"{key}_forward"):
                loss, details = term(ctx.pixels, [self.cfg.prompt] * len(ctx.cams))
            return TermOutput(loss, details, ctx.pixels, ctx.out.rgb, "pixel_grad_norm")

        return compute

    def _vlm(self, ctx: StepContext) -> TermOutput:
        cfg = self.cfg
        vres = cfg.vlm.render_resolution or cfg.render.resolution
        with self.timer("render"):
            vout = render(self.grid, self.vlm_cameras(ctx.cams), vres, vres, cfg.render.num_samples, generator=ctx.jitter)
        views = vout.rgb.detach().requires_grad_(True)
        with self.timer("vlm_forward"):
            loss, details = self.vlm_term(views, cfg.prompt)
        return TermOutput(loss, details, views, vout.rgb, "vlm_pixel_grad_norm")

    def _sparsity(self, ctx: StepContext) -> TermOutput:
        with self.timer("render"):
            return TermOutput(sparsity_loss(ctx.out.opacity))

    def _tv(self, attr: str) -> Callable[[StepContext], TermOutput]:
        def compute(ctx: StepContext) -> TermOutput:
            with self.timer("render"):
                return TermOutput(total_variation(getattr(self.grid, attr)))

        return compute

    # ------------------------------------------------------------------ one step

    def step(self) -> dict[str, float]:
        """One optimisation step; returns the metrics record (every loss term, λ, timings).

        Every term k gives ``loss_k``; ``loss`` = Σ λ_k·loss_k over the terms run. Terms on detached render copies
        back-propagate λ_k·loss_k into their copy at once; one backward through the renderer then carries the
        summed pixel gradients and the regularisers to the grids (the same gradient as backward of the sum)."""
        step = self.step_count
        cfg, timer = self.cfg, self.timer
        gen = self.generator(step)
        lam = self.lambdas(step)
        cams = self.cameras(gen)
        res, s = cfg.render.resolution, cfg.render.num_samples
        jitter = gen if cfg.render.jitter else None
        record: dict[str, float] = {"step": step}
        self.optimizer.zero_grad(set_to_none=True)

        with timer("render"):
            out = render(self.grid, cams, res, res, s, generator=jitter)
        ctx = StepContext(step, gen, jitter, cams, out, out.rgb.detach().requires_grad_(True))
        copies: list[TermOutput] = []  # one per detached render copy that received gradients, first-seen order
        reg: torch.Tensor | None = None
        total = 0.0
        for term in self.terms:
            weight = lam[f"lambda_{term.name}"]
            if weight == 0 and not term.always:
                continue
            term_out = term.compute(ctx)
            if term_out.on is not None:
                with timer(f"{term.name}_backward"):
                    (weight * term_out.loss).backward()
                if not any(c.on is term_out.on for c in copies):
                    copies.append(term_out)
            else:
                reg = weight * term_out.loss if reg is None else reg + weight * term_out.loss
            record[f"loss_{term.name}"] = float(term_out.loss.detach())
            record.update(term_out.details)
            total += weight * record[f"loss_{term.name}"]
        for c in copies:
            record[c.grad_key] = float(c.on.grad.norm())

        with timer("render"):
            pixel_part = sum((c.rgb * c.on.grad.to(c.rgb)).sum() for c in copies)
            surrogate = pixel_part if reg is None else reg + pixel_part
            if isinstance(surrogate, torch.Tensor):
                surrogate.backward()
        with timer("optimizer"):
            self.optimizer.step()
        record["loss"] = total
        record.update({k: v for k, v in lam.items()})
        record["opacity_mean"] = float(out.opacity.detach().mean())
        self.step_count += 1
        return record

    # ------------------------------------------------------------------ renders / state

    @torch.no_grad()
    def render_orbit(self, n: int, resolution: int) -> torch.Tensor:
        """``n`` evaluation views ``[n,3,R,R]`` on the fixed orbit (elevation/distance/FOV from ``output``)."""
        o = self.cfg.output
        cams = orbit_cameras(n, o.eval_elevation, o.eval_distance, o.eval_fovy)
        frames = [render(self.grid, cams[i], resolution, resolution, self.cfg.render.num_samples).rgb for i in range(n)]
        return torch.cat(frames).clamp(0, 1).cpu()

    GRID_FILE = "grid.safetensors"
    OPTIMIZER_FILE = "optimizer.safetensors"

    def write_checkpoint(self, folder: Path) -> None:
        """The files of a checkpoint: ``grid.safetensors`` (every grid tensor by name) + ``optimizer.safetensors``."""
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.grid.state_dict().items()}, str(folder / self.GRID_FILE))
        save_tree(self.optimizer.state_dict(), folder / self.OPTIMIZER_FILE)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"step": self.step_count, "prompt": self.cfg.prompt, "grid_resolution": self.grid.resolution}

    def load_checkpoint(self, folder: Path, state: dict[str, Any]) -> None:
        """Grids, optimiser and step from a checkpoint (one-line errors when it belongs to another run)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if state.get("prompt", self.cfg.prompt) != self.cfg.prompt:
            raise GenrewardError(f"checkpoint {folder} was trained for prompt {state['prompt']!r}, the config says "
                                 f"{self.cfg.prompt!r}; resume with the same prompt or start another output_dir")
        grid_file = folder / self.GRID_FILE
        try:
            tensors = load_file(str(grid_file), device=str(self.device))
            self.grid.load_state_dict(tensors)
        except (OSError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GenrewardError(f"{grid_file}: does not fit this config's grid ({first[:200]})") from None
        try:
            self.optimizer.load_state_dict(load_tree(folder / self.OPTIMIZER_FILE, self.device))
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise GenrewardError(f"{folder / self.OPTIMIZER_FILE}: cannot load the optimiser state ({type(exc).__name__})") from None
        self.step_count = int(state["done"])


def export_mesh(system: SDS3DSystem, out: Path) -> dict[str, str]:
    """``mesh.ply`` + ``mesh.obj``; a threshold outside the density range is logged loudly, not fatal."""
    from trainers.sds3d.outputs import write_obj, write_ply

    try:
        verts, faces, colors = extract_mesh(system.grid, system.cfg.output.mesh_threshold)
    except ValueError as exc:
        log.warning("no mesh written: %s (set output.mesh_threshold)", exc)
        print(f"WARNING: no mesh written: {exc} (set output.mesh_threshold)")
        return {"mesh_error": str(exc)}
    return {"mesh_ply": str(write_ply(out / "mesh.ply", verts, faces, colors)),
            "mesh_obj": str(write_obj(out / "mesh.obj", verts, faces, colors)),
            "mesh_faces": str(int(faces.shape[0]))}


def train(config: SDS3DConfig) -> dict:
    """Optimise a voxel grid for ``config.prompt``; writes renders, turntable, mesh, metrics, checkpoints, gallery."""
    from tqdm.auto import tqdm

    from trainers.sds3d.outputs import check_mp4_support, save_strip, write_run_gallery, write_turntable

    o = config.output
    if o.mp4:
        check_mp4_support()  # before anything is loaded or written
    out = Path(config.output_dir)
    rd = RunDir(out, "step", config.checkpoint)
    resume = rd.prepare()  # a conflicting folder or a damaged named checkpoint stops here, nothing written
    start_wall = time.perf_counter()
    system = SDS3DSystem(config)
    load_s = time.perf_counter() - start_wall
    if resume is not None:
        system.load_checkpoint(resume, rd.load_state(resume))
        log.info("resumed from %s at step %d", resume, system.step_count)
    rd.start(config, resume)
    rd.catch_signals()

    steps = config.train.steps
    if system.step_count > steps:
        raise GenrewardError(f"checkpoint {resume} is at step {system.step_count}, past train.steps={steps}")

    def save(done: int) -> Path:
        return rd.save(done, system.write_checkpoint, system.checkpoint_state())

    record: dict[str, float] = {}
    loop_start = time.perf_counter()
    first = system.step_count
    try:
        with tqdm(total=steps, initial=system.step_count, desc="sds3d", unit="step") as bar:
            while system.step_count < steps:
                t0 = time.perf_counter()
                record = system.step()
                record["step_seconds"] = time.perf_counter() - t0
                if not all(math.isfinite(v) for v in record.values() if isinstance(v, float)):
                    bad = {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
                    raise GenrewardError(f"sds3d step {record['step']}: non-finite values {bad}; lower optim.lr or the λ schedules")
                fault_point("unit")
                done = system.step_count
                if record["step"] % config.train.log_every == 0 or done == steps:
                    rd.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                bar.update(1)
                if o.render_every and done % o.render_every == 0:
                    save_strip(system.render_orbit(o.render_views, o.eval_resolution), out / "renders" / f"step-{done:06d}.png")
                saved = save(done) if rd.due(done, steps) or done == steps else None
                if rd.stop_signal is not None:
                    raise rd.interrupted(saved or save(done))
        loop_s = time.perf_counter() - loop_start
        if first == steps and resume != rd.checkpoint_path(steps):
            save(steps)  # resumed from a final checkpoint elsewhere: this folder gets its own
    finally:
        rd.release_signals()
    if not record:  # resumed from the final checkpoint: report the last logged step
        rows = [r for r in rd.metrics() if "loss" in r]
        record = rows[-1] if rows else {}

    result: dict[str, Any] = {"steps": steps, "steps_run": steps - first, "load_seconds": round(load_s, 2),
                              "loop_seconds": round(loop_s, 2),
                              "iterations_per_second": round((steps - first) / loop_s, 3) if loop_s > 0 and steps > first else None}
    t0 = time.perf_counter()
    final_views = system.render_orbit(o.render_views, o.eval_resolution)
    save_strip(final_views, out / "renders" / "final.png")
    frames = system.render_orbit(o.turntable_frames, o.eval_resolution)
    written = write_turntable(frames, out, o.fps, o.gif, o.mp4)
    result["turntable"] = ", ".join(str(p) for p in written)
    if o.mesh:
        result.update(export_mesh(system, out))
    if o.gallery:
        media = [(p.suffix.lstrip("."), p.name) for p in written if p.suffix == ".gif"] + [("final views", "renders/final.png")]
        scores = {k: v for k, v in record.items() if k.startswith("loss")}
        result["gallery"] = str(write_run_gallery(out, config.prompt, media, scores))
    result["export_seconds"] = round(time.perf_counter() - t0, 2)
    result["timing_seconds"] = {k: round(v, 3) for k, v in system.timer.seconds.items()}
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["checkpoint"] = str(rd.checkpoint_path(steps))
    result["final"] = {k: round(v, 5) for k, v in record.items() if k.startswith(("loss", "vlm_"))}
    (out / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
