"""Cameras for text-to-3D: random training views, view-dependent prompts, fixed evaluation orbits.

Conventions (threestudio's): world up is +z; a camera at elevation e, azimuth a and distance d sits at
d·(cos e cos a, cos e sin a, sin e) and looks at the origin, so azimuth 0 looks at the object's front
from +x. Camera-to-world matrices use the OpenGL camera frame (x right, y up, looking along −z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

DIRECTIONS = ("side", "front", "back", "overhead")  # the order threestudio checks them in (later wins)


@dataclass
class CameraBatch:
    """B cameras: ``c2w [B,4,4]``, vertical FOV in radians ``[B]``, and the sampled spherical coordinates."""

    c2w: torch.Tensor
    fovy: torch.Tensor
    elevation: torch.Tensor  # degrees, before perturbation
    azimuth: torch.Tensor  # degrees, before perturbation
    distance: torch.Tensor

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def to(self, device: torch.device | str) -> "CameraBatch":
        return CameraBatch(*(getattr(self, f).to(device) for f in ("c2w", "fovy", "elevation", "azimuth", "distance")))

    def __getitem__(self, index: slice | int) -> "CameraBatch":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return CameraBatch(*(getattr(self, f)[index] for f in ("c2w", "fovy", "elevation", "azimuth", "distance")))


def spherical_to_position(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Camera positions ``[B,3]`` (z up) from elevation/azimuth in degrees and distance."""
    e, a = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    return torch.stack([distance * e.cos() * a.cos(), distance * e.cos() * a.sin(), distance * e.sin()], dim=-1)


def look_at(position: torch.Tensor, center: torch.Tensor | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world ``[B,4,4]`` for cameras at ``position [B,3]`` looking at ``center`` with ``up`` (+z)."""
    b = position.shape[0]
    center = torch.zeros_like(position) if center is None else center
    up = torch.tensor([0.0, 0.0, 1.0]).expand(b, 3).to(position) if up is None else up
    forward = F.normalize(center - position, dim=-1)
    right = F.normalize(torch.cross(forward, up, dim=-1), dim=-1)
    true_up = torch.cross(right, forward, dim=-1)
    c2w = torch.eye(4, dtype=position.dtype, device=position.device).repeat(b, 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, true_up, -forward, position
    return c2w


def camera_rays(cameras: CameraBatch, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pinhole rays through pixel centres: origins and unit directions, each ``[B,H,W,3]``."""
    device, dtype = cameras.c2w.device, cameras.c2w.dtype
    focal = 0.5 * height / torch.tan(0.5 * cameras.fovy)  # [B]
    j, i = torch.meshgrid(torch.arange(height, device=device, dtype=dtype), torch.arange(width, device=device, dtype=dtype), indexing="ij")
    x = (i + 0.5 - 0.5 * width)[None] / focal[:, None, None]
    y = -(j + 0.5 - 0.5 * height)[None] / focal[:, None, None]
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [B,H,W,3]
    dirs = torch.einsum("bij,bhwj->bhwi", cameras.c2w[:, :3, :3], dirs_cam)
    dirs = F.normalize(dirs, dim=-1)
    origins = cameras.c2w[:, None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def sample_cameras(
    batch_size: int,
    generator: torch.Generator,
    elevation_range: Sequence[float] = (-10.0, 90.0),
    azimuth_range: Sequence[float] = (-180.0, 180.0),
    distance_range: Sequence[float] = (1.0, 1.5),
    fovy_range: Sequence[float] = (40.0, 70.0),
    uniform_sphere_prob: float = 0.5,
    batch_uniform_azimuth: bool = True,
    camera_perturb: float = 0.1,
    center_perturb: float = 0.2,
    up_perturb: float = 0.02,
) -> CameraBatch:
    """Random training cameras in the given ranges (threestudio ``RandomCameraDataModule`` semantics).

    Elevation: with probability ``uniform_sphere_prob`` area-uniform on the sphere band, else uniform
    in angle. Azimuth: stratified over the batch when ``batch_uniform_azimuth``. The returned
    elevation/azimuth are the sampled (unperturbed) values that choose the view-dependent prompt.
    """
    b, g = int(batch_size), generator
    lo, hi = (math.radians(v) for v in elevation_range)
    if torch.rand((), generator=g).item() < uniform_sphere_prob:
        s = torch.rand(b, generator=g) * (math.sin(hi) - math.sin(lo)) + math.sin(lo)
        elevation = torch.rad2deg(torch.asin(s.clamp(-1, 1)))
    else:
        elevation = torch.rad2deg(torch.rand(b, generator=g) * (hi - lo) + lo)
    a0, a1 = azimuth_range
    if batch_uniform_azimuth:
        azimuth = (torch.rand(b, generator=g) + torch.arange(b)) / b * (a1 - a0) + a0
    else:
        azimuth = torch.rand(b, generator=g) * (a1 - a0) + a0
    distance = torch.rand(b, generator=g) * (distance_range[1] - distance_range[0]) + distance_range[0]
    fovy = torch.rand(b, generator=g) * (fovy_range[1] - fovy_range[0]) + fovy_range[0]
    position = spherical_to_position(elevation, azimuth, distance)
    position = position + torch.randn(b, 3, generator=g) * camera_perturb
    center = torch.randn(b, 3, generator=g) * center_perturb
    up = torch.tensor([0.0, 0.0, 1.0]) + torch.randn(b, 3, generator=g) * up_perturb
    return CameraBatch(look_at(position, center, up), torch.deg2rad(fovy), elevation, azimuth, distance)


def orbit_cameras(n: int, elevation: float, distance: float, fovy: float, start_azimuth: float = 0.0) -> CameraBatch:
    """``n`` unperturbed cameras evenly spaced in azimuth (turntables, periodic renders, VLM view sets)."""
    azimuth = start_azimuth + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    elevation_t = torch.full((n,), float(elevation))
    distance_t = torch.full((n,), float(distance))
    position = spherical_to_position(elevation_t, azimuth, distance_t)
    return CameraBatch(look_at(position), torch.full((n,), math.radians(fovy)), elevation_t, azimuth, distance_t)


def wrap_azimuth(azimuth_deg: torch.Tensor) -> torch.Tensor:
    """Azimuth wrapped to [−180, 180)."""
    return torch.remainder(azimuth_deg + 180.0, 360.0) - 180.0


def view_directions(
    elevation_deg: torch.Tensor,
    azimuth_deg: torch.Tensor,
    front_threshold: float = 45.0,
    back_threshold: float = 45.0,
    overhead_threshold: float = 60.0,
) -> list[str]:
    """The view name per camera: side / front / back / overhead, checked in that order, the last match wins."""
    a = wrap_azimuth(azimuth_deg)
    conditions = {
        "side": torch.ones_like(a, dtype=torch.bool),
        "front": (a > -front_threshold) & (a < front_threshold),
        "back": (a > 180.0 - back_threshold) | (a < -180.0 + back_threshold),
        "overhead": elevation_deg > overhead_threshold,
    }
    names = []
    for k in range(a.shape[0]):
        chosen = "side"
        for name in DIRECTIONS:
            if bool(conditions[name][k]):
                chosen = name
        names.append(chosen)
    return names


def view_prompt(prompt: str, direction: str, prefix: bool = False) -> str:
    """``"{prompt}, front view"`` (or ``"front view of {prompt}"`` with ``prefix``)."""
    return f"{direction} view of {prompt}" if prefix else f"{prompt}, {direction} view"
