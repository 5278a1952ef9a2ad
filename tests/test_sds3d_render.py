"""sds3d renderer, cameras, schedules and mesh export (docs/algorithms/vlm3d_sds.md §10 items 6–9, 13), offline, no models."""

from __future__ import annotations

import math

import pytest
import torch

from genreward.rewards.base import RewardOutput, register
from trainers.sds3d import SDS3DConfig, SDS3DSystem
from trainers.sds3d.cameras import (
    camera_rays,
    look_at,
    orbit_cameras,
    sample_cameras,
    spherical_to_position,
    view_directions,
    view_prompt,
)
from trainers.sds3d.outputs import write_obj, write_ply
from trainers.sds3d.render import VoxelGrid, composite, extract_mesh, render, sparsity_loss, total_variation
from trainers.sds3d.schedules import scheduled

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def _front_camera(distance: float = 2.0, fovy: float = 60.0, azimuth: float = 0.0, elevation: float = 0.0):
    return orbit_cameras(1, elevation, distance, fovy, start_azimuth=azimuth)


# ------------------------------------------------------------------------ grid conventions


def test_grid_axis_order_x_is_width_y_is_height_z_is_depth() -> None:
    """Voxel [k, j, i] sits at world (x_i, y_j, z_k): an asymmetric voxel is found only at its own position."""
    g = 9
    grid = VoxelGrid(resolution=g, density_init="none")
    with torch.no_grad():
        grid.density_raw[0, 0, 4, 0, 8] = 50.0  # z = 0, y = −1, x = +1
    sigma, _ = grid.query(torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, -1.0, 1.0]]))
    assert sigma[0] > 49.0
    assert sigma[1] < 1.0 and sigma[2] < 1.0  # x↔y and x↔z swaps miss it
    pts = grid.voxel_points()
    torch.testing.assert_close(pts[4, 0, 8], torch.tensor([1.0, -1.0, 0.0]))


def test_camera_convention_z_up_azimuth0_on_plus_x() -> None:
    pos = spherical_to_position(torch.tensor([0.0, 90.0, 0.0]), torch.tensor([0.0, 0.0, 90.0]), torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(pos, torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 2.0, 0.0]]), atol=1e-6, rtol=0)
    cams = _front_camera()
    origins, dirs = camera_rays(cams, 5, 5)
    torch.testing.assert_close(dirs[0, 2, 2], torch.tensor([-1.0, 0.0, 0.0]), atol=1e-6, rtol=0)  # centre ray → origin
    assert dirs[0, 0, 2, 2] > 0.0  # top row of the image looks up (+z)
    assert dirs[0, 2, 4, 1] > 0.0  # right column: camera at +x looking at −x, right is +y
    c2w = look_at(torch.tensor([[0.0, -3.0, 0.0]]))
    torch.testing.assert_close(c2w[0, :3, :3] @ c2w[0, :3, :3].T, torch.eye(3), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------ §10 item 6


def test_spec10_6_empty_grid_renders_background_and_zero_opacity() -> None:
    grid = VoxelGrid(resolution=8, density_init="none", background=(0.2, 0.4, 0.6))
    with torch.no_grad():
        grid.density_raw.fill_(-1e4)
    out = render(grid, orbit_cameras(3, 20.0, 2.0, 50.0), 12, 12, num_samples=16, return_weights=True)
    assert torch.equal(out.opacity, torch.zeros_like(out.opacity))
    expected = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1).expand_as(out.rgb)
    torch.testing.assert_close(out.rgb, expected, atol=0, rtol=0)


def test_spec10_6_opaque_grid_renders_first_voxel_hit() -> None:
    """Front half (+x) red, back half blue, σ huge: from +x we see red, from −x blue, opacity ≈ 1."""
    g = 16
    grid = VoxelGrid(resolution=g, density_init="none", background=(0.0, 1.0, 0.0))
    with torch.no_grad():
        grid.density_raw.fill_(1e4)
        x = grid.voxel_points()[..., 0]
        grid.color_raw[0, 0] = torch.where(x > 0, 20.0, -20.0)
        grid.color_raw[0, 1] = -20.0
        grid.color_raw[0, 2] = torch.where(x > 0, -20.0, 20.0)
    for azimuth, colour in ((0.0, (1.0, 0.0, 0.0)), (180.0, (0.0, 0.0, 1.0))):
        out = render(grid, _front_camera(distance=2.5, fovy=30.0, azimuth=azimuth), 16, 16, num_samples=64)
        torch.testing.assert_close(out.opacity, torch.ones_like(out.opacity), atol=1e-4, rtol=0)
        centre = out.rgb[0, :, 4:12, 4:12]
        torch.testing.assert_close(centre, torch.tensor(colour).view(3, 1, 1).expand_as(centre), atol=1e-4, rtol=0)


def test_spec10_6_weights_nonnegative_and_sum_at_most_one() -> None:
    torch.manual_seed(0)
    grid = VoxelGrid(resolution=12)
    with torch.no_grad():
        grid.density_raw.normal_(0, 5)
        grid.color_raw.normal_(0, 2)
    out = render(grid, orbit_cameras(4, 30.0, 1.8, 60.0), 10, 10, num_samples=32, generator=torch.Generator().manual_seed(1),
                 return_weights=True)
    assert (out.weights >= 0).all()
    assert (out.weights.sum(-1) <= 1.0 + 1e-6).all()
    torch.testing.assert_close(out.opacity[:, 0], out.weights.sum(-1))
    assert ((out.rgb >= 0) & (out.rgb <= 1)).all()
    # the quadrature itself: Σw = 1 − exp(−Σσδ)
    sigma, deltas = torch.rand(5, 7) * 3, torch.rand(5, 7)
    _, opacity, _, w = composite(sigma, torch.rand(5, 7, 3), torch.cumsum(deltas, -1), deltas, torch.zeros(3))
    torch.testing.assert_close(opacity, 1 - torch.exp(-(sigma * deltas).sum(-1)))


# ------------------------------------------------------------------------ §10 item 7


def test_spec10_7_blob_init_centre_ray_opaque_missing_ray_empty() -> None:
    grid = VoxelGrid(resolution=32)  # blob_magic3d, zero raw grids
    out = render(grid, _front_camera(distance=2.0, fovy=60.0), 33, 33, num_samples=64)
    assert out.opacity[0, 0, 16, 16] > 0.5
    # corner rays pass ≥ 1.2 from the centre (blob radius ≈ 0.5)
    for i, j in ((0, 0), (0, 32), (32, 0), (32, 32)):
        assert out.opacity[0, 0, i, j] < 1e-3
    assert out.rgb[0, :, 16, 16].sub(0.5).abs().max() < 0.05  # grey blob (colour_raw = 0 → 0.5)


# ------------------------------------------------------------------------ §10 item 8


def test_spec10_8_pixel_loss_gradients_reach_both_grids() -> None:
    grid = VoxelGrid(resolution=16, learned_background=True)
    out = render(grid, orbit_cameras(2, 10.0, 2.0, 60.0), 12, 12, num_samples=24, generator=torch.Generator().manual_seed(0))
    loss = (out.rgb - torch.tensor([0.9, 0.1, 0.2]).view(1, 3, 1, 1)).pow(2).mean() + sparsity_loss(out.opacity)
    loss = loss + total_variation(grid.density_raw) + total_variation(grid.color_raw)
    loss.backward()
    for p in (grid.density_raw, grid.color_raw, grid.background_raw):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_total_variation_zero_on_constant_grid_positive_otherwise() -> None:
    assert float(total_variation(torch.ones(1, 3, 5, 5, 5))) == 0.0
    v = torch.zeros(1, 1, 4, 4, 4)
    v[0, 0, 1, 2, 3] = 1.0
    assert float(total_variation(v)) > 0.0


# ------------------------------------------------------------------------ §10 item 9


def test_spec10_9_sampled_cameras_lie_in_configured_ranges() -> None:
    ranges = dict(elevation_range=(-10.0, 45.0), azimuth_range=(-180.0, 180.0), distance_range=(1.5, 2.0), fovy_range=(40.0, 70.0))
    elev, azim, dist, fov = [], [], [], []
    for s in range(200):
        c = sample_cameras(4, torch.Generator().manual_seed(s), **ranges)
        elev.append(c.elevation), azim.append(c.azimuth), dist.append(c.distance), fov.append(torch.rad2deg(c.fovy))
        assert c.c2w.shape == (4, 4, 4)
    elev, azim, dist, fov = (torch.cat(x) for x in (elev, azim, dist, fov))
    assert elev.min() >= -10.0 - 1e-4 and elev.max() <= 45.0 + 1e-4
    assert azim.min() >= -180.0 and azim.max() <= 180.0
    assert dist.min() >= 1.5 and dist.max() <= 2.0
    assert fov.min() >= 40.0 - 1e-4 and fov.max() <= 70.0 + 1e-4
    assert elev.max() > 40 and elev.min() < -5 and dist.max() > 1.95  # the ranges are actually covered
    # batch-uniform azimuth: one camera per quarter of the circle
    c = sample_cameras(4, torch.Generator().manual_seed(3), **ranges)
    quarters = ((c.azimuth + 180.0) // 90.0).long().tolist()
    assert sorted(quarters) == [0, 1, 2, 3]
    # without perturbation the camera sits exactly at the sampled spherical position
    c = sample_cameras(3, torch.Generator().manual_seed(4), camera_perturb=0, center_perturb=0, up_perturb=0, **ranges)
    torch.testing.assert_close(c.c2w[:, :3, 3], spherical_to_position(c.elevation, c.azimuth, c.distance))


def test_spec10_9_view_dependent_prompts() -> None:
    e = torch.tensor([0.0, 0.0, 0.0, 0.0, 70.0, 70.0, 0.0, 0.0])
    a = torch.tensor([0.0, 180.0, 90.0, -90.0, 0.0, 180.0, 44.0, -170.0])
    assert view_directions(e, a) == ["front", "back", "side", "side", "overhead", "overhead", "front", "back"]
    assert view_directions(torch.tensor([0.0]), torch.tensor([360.0])) == ["front"]  # wrapped to [−180, 180)
    assert view_prompt("a cat", "front") == "a cat, front view"
    assert view_prompt("a cat", "back", prefix=True) == "back view of a cat"


# ------------------------------------------------------------------------ §10 item 13


def test_spec10_13_lambda_vlm_schedule_and_switch_off() -> None:
    mvdream = [0, 300.0, 1.0, 10000]
    assert scheduled(mvdream, 0) == 300.0
    assert scheduled(mvdream, 5000) == pytest.approx(150.5)
    assert scheduled(mvdream, 10000) == 1.0 and scheduled(mvdream, 25000) == 1.0
    assert scheduled([300.0, 1.0, 10000], 5000) == pytest.approx(150.5)  # 3-element form starts at step 0
    cfg = SDS3DConfig(output_dir="unused")
    cfg.loss.lambda_vlm = mvdream
    cfg.vlm.stop_step = 10000
    system = SDS3DSystem(cfg, guidance=object(), vlm_term=object(), reward_terms=[])
    assert system.lambdas(0)["lambda_vlm"] == 300.0
    assert system.lambdas(5000)["lambda_vlm"] == pytest.approx(150.5)
    assert system.lambdas(9999)["lambda_vlm"] == pytest.approx(1.0, abs=0.05)
    assert system.lambdas(10000)["lambda_vlm"] == 0.0 and system.lambdas(15000)["lambda_vlm"] == 0.0
    # SD-2.1 pipeline: 90 → 0 over 0–5000
    assert scheduled([0, 90.0, 0.0, 5000], 2500) == pytest.approx(45.0)


# ------------------------------------------------------------------------ optimisation sanity


@register("sds3d_test_target_color")
class TargetColor:
    """Differentiable test reward: −mean squared distance of every pixel to a target colour."""

    differentiable = True

    def __init__(self, color=(0.9, 0.2, 0.1)):
        self.name = "sds3d_test_target_color"
        self.color = torch.tensor([float(c) for c in color]).view(1, 3, 1, 1)

    def __call__(self, images, prompts, **context):
        return RewardOutput(scores=-(images - self.color.to(images)).pow(2).mean(dim=(1, 2, 3)))


def test_optimisation_converges_to_target_colour_from_every_view() -> None:
    """No diffusion prior: a target-colour reward alone must paint the grid that colour from all views."""
    target = (0.9, 0.2, 0.1)
    cfg = SDS3DConfig(output_dir="unused")
    cfg.grid.resolution, cfg.grid.density_init, cfg.grid.background = 12, "none", [0.0, 0.0, 0.0]
    cfg.render.resolution, cfg.render.num_samples = 12, 16
    cfg.camera.batch_size = 2
    cfg.loss.lambda_sds, cfg.loss.lambda_sparsity = 0.0, 0.0
    cfg.vlm.enabled = False
    cfg.optim.lr = 0.2
    cfg.train.device = "cpu"
    from trainers.sds3d.trainer import RewardTermSpec

    cfg.rewards = [RewardTermSpec(name="sds3d_test_target_color", options={"color": list(target)}, weight=1.0, label="target")]
    system = SDS3DSystem(cfg)
    assert system.guidance is None and system.vlm_term is None  # nothing loaded when λ = 0 / disabled
    before = system.render_orbit(8, 12)
    first = system.step()["loss_target"]
    for _ in range(119):
        last = system.step()["loss_target"]
    after = system.render_orbit(8, 12)
    goal = torch.tensor(target).view(1, 3)
    err_before = (before.mean(dim=(2, 3)) - goal).abs().max()
    err_after = (after.mean(dim=(2, 3)) - goal).abs().max(dim=1).values  # per view
    assert err_before > 0.3
    assert (err_after < 0.05).all(), err_after
    assert last < 0.05 * first


# ------------------------------------------------------------------------ mesh


def test_mesh_of_blob_is_a_sphere_and_files_parse(tmp_path) -> None:
    grid = VoxelGrid(resolution=32)
    with torch.no_grad():
        grid.color_raw[0, 0] = 3.0  # reddish
    verts, faces, colors = extract_mesh(grid, threshold=5.0)
    r = verts.norm(dim=-1)
    # σ = softplus(10(1 − r/0.5)) = 5 ⇔ r ≈ 0.2503
    assert abs(float(r.mean()) - 0.2503) < 0.01 and float(r.std()) < 0.01
    assert faces.min() >= 0 and faces.max() < verts.shape[0]
    assert (colors[:, 0] > 0.9).all()
    # outward winding: face normals point away from the centre
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    normals = torch.cross(b - a, c - a, dim=-1)
    assert ((normals * (a + b + c)).sum(-1) > 0).float().mean() > 0.99
    # a blob moved to +x appears at +x (axis order of marching cubes → world)
    shifted = VoxelGrid(resolution=32, density_init="none")
    with torch.no_grad():
        pts = shifted.voxel_points()
        shifted.density_raw[0, 0] = 10 * (1 - (pts - torch.tensor([0.5, 0.0, -0.25])).norm(dim=-1) / 0.3)
    v2, _, _ = extract_mesh(shifted, threshold=5.0)
    torch.testing.assert_close(v2.mean(0), torch.tensor([0.5, 0.0, -0.25]), atol=0.02, rtol=0)
    ply = write_ply(tmp_path / "m.ply", verts, faces, colors).read_text().splitlines()
    assert f"element vertex {verts.shape[0]}" in ply and f"element face {faces.shape[0]}" in ply
    obj = write_obj(tmp_path / "m.obj", verts, faces, colors).read_text().splitlines()
    assert sum(l.startswith("v ") for l in obj) == verts.shape[0] and sum(l.startswith("f ") for l in obj) == faces.shape[0]
    assert len(obj[1].split()) == 7  # v x y z r g b
    with pytest.raises(ValueError, match="no surface"):
        extract_mesh(grid, threshold=1e6)
