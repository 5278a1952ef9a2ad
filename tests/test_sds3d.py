"""sds3d: SDS (docs/algorithms/vlm3d_sds.md §10 items 1–5), the VLM reward term (items 10–12; 11 on the library
processor is also in tests/test_vlm_judge.py), a tiny end-to-end run, resume, config errors. Offline:
tiny:sd + tiny:qwen2-vl with random weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from genreward.config import load_config
from genreward.errors import GenrewardError
from trainers import get_trainer
from trainers.sds3d import SDS3DConfig, SDS3DSystem, train
from trainers.sds3d.guidance import cfg_combine, sds_surrogate_loss, sds_weight, timestep_bounds
from trainers.sds3d.render import render
from trainers.sds3d.terms import VLMTerm, tile_2x2

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
TINY = Path(__file__).resolve().parents[1] / "configs" / "sds3d_tiny.yaml"
SMALL = ["grid.resolution=12", "render.resolution=16", "render.num_samples=12", "vlm.render_resolution=16",
         "output.eval_resolution=16", "output.turntable_frames=6", "output.render_views=2", "train.device=cpu"]


def _config(tmp: Path | str, *overrides: str) -> SDS3DConfig:
    return load_config(TINY, SDS3DConfig, [f"output_dir={tmp}", *SMALL, *overrides])


@pytest.fixture(scope="module")
def system() -> SDS3DSystem:
    return SDS3DSystem(_config("unused"))


def _views(system: SDS3DSystem, n: int = 4, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    from trainers.sds3d.cameras import orbit_cameras

    out = render(system.grid, orbit_cameras(n, 15.0, 1.8, 50.0), 16, 16, 12)
    pixels = out.rgb.detach().requires_grad_(grad)
    return out.rgb, pixels


# ------------------------------------------------------------------------ SDS items 1–5


def test_spec10_1_perfect_noise_predictor_gives_zero_sds_gradient(system: SDS3DSystem) -> None:
    # pure form: ε̂ = ε ⇒ grad = 0 exactly
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    eps = torch.randn(2, 4, 8, 8)
    loss, grad = sds_surrogate_loss(z, eps, eps, torch.rand(2, 1, 1, 1))
    loss.backward()
    assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(z.grad, torch.zeros_like(z))
    # through the real guidance path: a mock U-Net that returns exactly the injected noise (both branches)
    g = system.guidance
    seen = {}
    encode = g.encode

    def spy(images, generator=None):
        seen["z"] = encode(images, generator)
        return seen["z"]

    def oracle(z_in, t_in, embeds):
        ab = g.alphas_cumprod[t_in].view(-1, 1, 1, 1)
        z0 = torch.cat([seen["z"].detach()] * 2)
        return (z_in.float() - ab.sqrt() * z0) / (1 - ab).sqrt()

    try:
        g.encode, g.noise_predictor = spy, oracle
        rgb, pixels = _views(system, 2)
        out = g(pixels, ["a cat, front view", "a cat, back view"], 0, torch.Generator().manual_seed(0))
        out["loss_sds"].backward()
    finally:
        g.encode, g.noise_predictor = encode, None
    assert out["grad"].abs().max() < 1e-4 * max(1.0, float(out["noise"].abs().max()))
    assert pixels.grad.abs().max() < 1e-4


def test_spec10_2_surrogate_gradient_is_weighted_residual_over_batch(system: SDS3DSystem) -> None:
    torch.manual_seed(0)
    for b in (1, 3):
        z = torch.randn(b, 4, 8, 8, requires_grad=True)
        eps_pred, eps = torch.randn(b, 4, 8, 8), torch.randn(b, 4, 8, 8)
        w = torch.rand(b, 1, 1, 1)
        loss, grad = sds_surrogate_loss(z, eps_pred, eps, w)
        loss.backward()
        torch.testing.assert_close(z.grad, w * (eps_pred - eps) / b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(loss, 0.5 * (w * (eps_pred - eps)).pow(2).sum() / b)
    # and the guidance uses exactly that on its latents, with w(t) = 1 − ᾱ_t ("sds" weighting)
    g = system.guidance
    _, pixels = _views(system, 2)
    out = g(pixels, ["a cat, side view"] * 2, 0, torch.Generator().manual_seed(1))
    ab = g.alphas_cumprod[out["t"]].view(-1, 1, 1, 1)
    torch.testing.assert_close(out["grad"], (1 - ab) * (out["eps_pred"] - out["noise"]))
    torch.testing.assert_close(out["loss_sds"].detach(), 0.5 * out["grad"].pow(2).sum() / 2)
    assert torch.allclose(sds_weight(ab, "fantasia3d"), ab.sqrt() * (1 - ab)) and torch.equal(sds_weight(ab, "uniform"), torch.ones_like(ab))


def test_spec10_3_frozen_unet_and_vae_get_no_grad_render_does(system: SDS3DSystem) -> None:
    system.grid.zero_grad(set_to_none=True)
    rgb, pixels = _views(system, 2)
    out = system.guidance(pixels, ["a cat, front view"] * 2, 0, torch.Generator().manual_seed(2))
    out["loss_sds"].backward()
    pipe = system.guidance.pipe
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0  # through the VAE encoder
    (rgb * pixels.grad).sum().backward()
    assert system.grid.density_raw.grad.abs().sum() > 0 and system.grid.color_raw.grad.abs().sum() > 0
    system.grid.zero_grad(set_to_none=True)


def test_spec10_4_timestep_annealing_matches_threestudio_and_samples_stay_in_range(system: SDS3DSystem) -> None:
    lo_sched, hi_sched = [0, 0.98, 0.02, 8000], [0, 0.98, 0.50, 8000]
    # threestudio C(): linear between (start_step, start_value) and (end_step, end_value), clamped; t = int(1000·p)
    expected = {0: (980, 980), 4000: (500, 740), 8000: (20, 500), 10000: (20, 500)}
    for step, bounds in expected.items():
        assert timestep_bounds(lo_sched, hi_sched, step) == bounds
    assert timestep_bounds(0.02, 0.98, 123) == (20, 980)
    g = system.guidance
    old = g.min_step_percent, g.max_step_percent
    g.min_step_percent, g.max_step_percent = [0, 0.98, 0.02, 40], [0, 0.98, 0.5, 40]
    g.noise_predictor = lambda z, t, e: torch.zeros_like(z)
    try:
        _, pixels = _views(system, 1, grad=False)
        pixels = pixels.expand(6, -1, -1, -1)
        for step in (0, 10, 20, 40, 60):
            lo, hi = timestep_bounds(g.min_step_percent, g.max_step_percent, step)
            for seed in range(2):
                t = g(pixels, ["x"] * 6, step, torch.Generator().manual_seed(seed))["t"]
                assert ((t >= lo) & (t <= hi)).all(), (step, t, lo, hi)
    finally:
        g.min_step_percent, g.max_step_percent = old
        g.noise_predictor = None


def test_spec10_5_cfg_threestudio_s_equals_standard_omega_s_plus_1(system: SDS3DSystem) -> None:
    u, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for s in (0.0, 7.5, 100.0):
        torch.testing.assert_close(cfg_combine(u, c, s, "threestudio"), cfg_combine(u, c, s + 1, "standard"))
    # end to end through the real tiny U-Net
    g = system.guidance
    _, pixels = _views(system, 1, grad=False)
    old = g.guidance_scale, g.cfg_convention
    try:
        g.guidance_scale, g.cfg_convention = 100.0, "threestudio"
        a = g(pixels, ["a cat"], 0, torch.Generator().manual_seed(3))["grad"]
        g.guidance_scale, g.cfg_convention = 101.0, "standard"
        b = g(pixels, ["a cat"], 0, torch.Generator().manual_seed(3))["grad"]
    finally:
        g.guidance_scale, g.cfg_convention = old
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
    assert a.abs().sum() > 0


# ------------------------------------------------------------------------ VLM items 10–12


def test_spec10_10_loss_is_negative_log_odds_and_prob_form(system: SDS3DSystem) -> None:
    term: VLMTerm = system.vlm_term
    _, views = _views(system, 4, grad=False)
    loss, details = term(views, "a cat")
    judge = term.judge
    units = judge._image_units(term.judge_input(views)[0])
    logits = judge.answer_logits([(units, judge.question("a cat", multiview=True))])[:, 0][0]
    lsm = torch.log_softmax(logits, -1)
    torch.testing.assert_close(loss, lsm[judge.no_id] - lsm[judge.yes_id], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, logits[judge.no_id] - logits[judge.yes_id], atol=1e-4, rtol=1e-4)
    # probability form: p_No − p_Yes with the softmax over the two logits
    prob_term = VLMTerm(form="prob", image_size=term.image_size, judge=None, model="tiny:qwen2-vl", device="cpu")
    p_loss, _ = prob_term(views, "a cat")
    p = torch.softmax(torch.stack([logits[judge.yes_id], logits[judge.no_id]]), 0)
    torch.testing.assert_close(p_loss, p[1] - p[0], atol=1e-5, rtol=1e-4)


def test_spec10_11_grid2x2_canvas_matches_library_processor() -> None:
    """The 2×2 arrangement: exact tiling, and the torch pixel path equals Qwen2VLImageProcessor on the canvas."""
    from transformers import Qwen2VLImageProcessor

    from genreward.models import vlm

    views = torch.randint(0, 256, (4, 3, 28, 28)).float() / 255
    canvas = tile_2x2(views)[0]
    assert torch.equal(canvas[:, :28, :28], views[0]) and torch.equal(canvas[:, :28, 28:], views[1])
    assert torch.equal(canvas[:, 28:, :28], views[2]) and torch.equal(canvas[:, 28:, 28:], views[3])
    with pytest.raises(GenrewardError, match="4 views"):
        tile_2x2(views[:3])
    _, _, info = vlm.load_vlm("tiny:qwen2-vl", device="cpu")
    ref = Qwen2VLImageProcessor()(images=[canvas], do_rescale=False, return_tensors="pt")
    ours, grid = vlm.qwen_patchify(vlm.qwen_resize_normalise(canvas[None], info), info)
    assert torch.equal(grid, ref["image_grid_thw"])
    torch.testing.assert_close(ours, ref["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arrangement", ["separate", "grid2x2"])
def test_spec10_12_vlm_loss_gradients_reach_renders_and_grids_not_vlm(system: SDS3DSystem, arrangement: str) -> None:
    term = system.vlm_term if arrangement == "separate" else VLMTerm(arrangement="grid2x2", image_size=28, device="cpu")
    system.grid.zero_grad(set_to_none=True)
    rgb, views = _views(system, 4)
    loss, details = term(views, "a teapot")
    loss.backward()
    assert torch.isfinite(loss) and set(details) == {"vlm_log_odds", "vlm_p_yes"}
    assert torch.isfinite(views.grad).all() and (views.grad.abs().flatten(1).sum(1) > 0).all()  # every view
    assert all(p.grad is None for p in term.judge.model.parameters())
    (rgb * views.grad).sum().backward()
    for p in (system.grid.density_raw, system.grid.color_raw):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    system.grid.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------ end to end


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]


def _grid(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "grid.safetensors"))


def test_tiny_run_outputs_and_resume_reproduces_uninterrupted(tmp_path: Path) -> None:
    steps = ["train.steps=6", "vlm.stop_step=4", "loss.lambda_vlm=[0,90.0,0.0,6]", "output.render_every=3",
             "guidance.min_step_percent=[0,0.98,0.02,6]", "guidance.max_step_percent=[0,0.98,0.5,6]"]
    full = tmp_path / "full"
    result = train(_config(full, *steps, "checkpoint.every=3"))
    for name in ("turntable.gif", "turntable.mp4", "mesh.ply", "mesh.obj", "gallery.html", "config.yaml",
                 "renders/step-000003.png", "renders/final.png", "checkpoints/checkpoint-3/grid.safetensors",
                 "checkpoints/checkpoint-3/optimizer.safetensors", "checkpoints/checkpoint-6/manifest.json",
                 "checkpoints/checkpoint-6/trainer_state.json"):
        assert (full / name).is_file() and (full / name).stat().st_size > 0, name
    assert not list((full / "checkpoints").glob("*/*.pt"))  # no pickle anywhere
    assert "turntable.gif" in (full / "gallery.html").read_text()
    rows = _metrics(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(6))
    for r in rows:
        for k, v in r.items():
            assert not isinstance(v, float) or v == v and abs(v) != float("inf"), (k, v)
    assert all("loss_sds" in r and "loss_sparsity" in r for r in rows)
    assert all("loss_vlm" in r for r in rows[:4]) and not any("loss_vlm" in r for r in rows[4:])
    assert all(r["pixel_grad_norm"] > 0 and r["vlm_pixel_grad_norm"] > 0 for r in rows[:4])
    assert rows[0]["lambda_vlm"] == 90.0 and rows[5]["lambda_vlm"] == 0.0
    assert set(result["timing_seconds"]) >= {"render", "vae_encode", "unet", "vlm_forward", "vlm_backward"}

    # interrupted after 3 steps, then resumed from the checkpoint
    part = tmp_path / "part"
    quick = ["output.mp4=false", "output.mesh=false", "output.gallery=false"]
    train(_config(part, *steps, "train.steps=3", *quick))
    train(_config(part, *steps, "checkpoint.resume_from=latest", *quick))
    state = json.loads((part / "checkpoints/checkpoint-6/trainer_state.json").read_text())
    assert state["done"] == state["step"] == 6 and state["unit"] == "step"
    a, b = _grid(full / "checkpoints/checkpoint-6"), _grid(part / "checkpoints/checkpoint-6")
    assert set(a) == set(b) == {"density_raw", "color_raw", "background_fixed"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _metrics(full / "metrics.jsonl") == _metrics(part / "metrics.jsonl")


def test_loss_is_sum_of_lambda_times_every_logged_term(tmp_path: Path) -> None:
    """One generic loop: every term k logs loss_k and lambda_k, and loss = Σ λ_k·loss_k (incl. reward terms, tv)."""
    config = _config(tmp_path, "loss.lambda_tv_density=0.5", "loss.lambda_tv_color=[0,0.0,1.0,4]", "vlm.stop_step=2",
                     "rewards=[{name: clip_score, options: {model: tiny:clip}, weight: [0, 2.0, 1.0, 4]}]")
    system = SDS3DSystem(config)
    assert [t.name for t in system.terms] == ["sds", "clip_score", "vlm", "sparsity", "tv_density", "tv_color"]
    seen = set()
    for step in range(3):
        record = system.step()
        terms = [k[len("loss_"):] for k in record if k.startswith("loss_")]
        seen.update(terms)
        assert all(f"lambda_{k}" in record for k in terms)
        assert record["loss"] == pytest.approx(sum(record[f"lambda_{k}"] * record[f"loss_{k}"] for k in terms), rel=1e-12, abs=0)
        # a term whose λ is 0 at this step is not run (sparsity is always logged)
        assert ("loss_tv_color" in record) == (step > 0) and ("loss_vlm" in record) == (step < 2)
    assert seen == {"sds", "clip_score", "vlm", "sparsity", "tv_density", "tv_color"}


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "override, needle",
    [
        ("camera.elevation_range=[30,10]", "camera.elevation_range"),
        ("loss.lambda_vlm=[0,1]", "loss.lambda_vlm"),
        ("loss.lambda_sds=[0,1,0,0]", "loss.lambda_sds"),
        ("vlm.arrangement=tiles", "vlm.arrangement"),
        ("grid.resolution=1", "grid.resolution"),
        ("guidance.max_step_percent=1.5", "guidance.max_step_percent"),
        ("guidance.cfg_convention=dreamfusion", "guidance.cfg_convention"),
        ("vlm.num_views=3 vlm.arrangement=grid2x2", "vlm.num_views"),
        ("optim.lr=-1", "optim.lr"),
        ("grid.background=[1,2,0]", "grid.background"),
    ],
)
def test_bad_config_values_are_one_line_errors_naming_key_and_value(tmp_path: Path, override: str, needle: str) -> None:
    with pytest.raises(GenrewardError) as exc:
        _config(tmp_path, *override.split())
    msg = str(exc.value)
    assert "\n" not in msg and needle in msg, msg
    value = override.split()[0].split("=", 1)[1]
    assert value.replace(" ", "") in msg.replace(" ", "").replace("'", "").replace(".0", ""), msg


def test_registry_resume_and_mp4_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_cls, fn = get_trainer("sds3d")
    assert config_cls is SDS3DConfig and fn is train
    with pytest.raises(GenrewardError, match="is not a folder"):
        train(_config(tmp_path / "r", f"checkpoint.resume_from={tmp_path / 'nope'}", "output.mp4=false"))
    assert not (tmp_path / "r").exists()  # nothing written before the inputs are checked
    for old, new in (("output.resume=latest", "checkpoint.resume_from"), ("output.checkpoint_every=5", "checkpoint.every")):
        with pytest.raises(GenrewardError) as exc:
            _config(tmp_path / "r", old)
        assert f"use '{new}'" in str(exc.value) and old.split("=")[0] in str(exc.value), str(exc.value)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails
    with pytest.raises(GenrewardError, match="imageio-ffmpeg") as exc:
        train(_config(tmp_path / "m"))
    assert "output.mp4=false" in str(exc.value)
    with pytest.raises(GenrewardError, match="not differentiable"):
        from trainers.sds3d.terms import RewardTerm

        RewardTerm("jpeg_compressibility")
