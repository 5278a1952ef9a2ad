"""Text-to-3D: SDS from a 2D diffusion prior + VLM3D's differentiable VLM reward, on a voxel grid.

``trainer: sds3d`` — see docs/sds3d.md and docs/algorithms/vlm3d_sds.md. The pieces: :mod:`.render` (voxel grid,
compositing, regularisers, marching cubes), :mod:`.cameras`, :mod:`.schedules`, :mod:`.guidance` (SDS),
:mod:`.terms` (VLM judge and reward loss terms), :mod:`.outputs` (turntable, mesh, gallery),
:mod:`.trainer` (config and loop).
"""

from trainers.sds3d.trainer import SDS3DConfig, SDS3DSystem, train

__all__ = ["SDS3DConfig", "SDS3DSystem", "train"]
