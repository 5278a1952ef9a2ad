"""Files a text-to-3D run leaves behind: multi-view strips, turntable GIF/MP4, coloured mesh, gallery page.

Tensor → uint8/PNG conversion goes through :mod:`genreward.images` only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from genreward.errors import GenrewardError
from genreward.images import save_png, to_uint8
from genreward.jsonl import append_jsonl

log = logging.getLogger("genreward.sds3d")


def check_mp4_support() -> None:
    """One-line error up front (not after hours of training) when MP4 writing cannot work."""
    try:
        import imageio_ffmpeg  # noqa: F401

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # ImportError, or RuntimeError when no ffmpeg binary is found
        raise GenrewardError(
            f"output.mp4=true needs imageio-ffmpeg with an ffmpeg binary ({type(exc).__name__}: {exc}); "
            "pip install imageio-ffmpeg, or set output.mp4=false"
        ) from None


def save_strip(views: torch.Tensor, path: str | Path) -> Path:
    """Views ``[V,3,H,W]`` side by side in one PNG."""
    return save_png(torch.cat(list(views), dim=-1), path)


def write_turntable(frames: torch.Tensor, folder: str | Path, fps: int = 30, gif: bool = True, mp4: bool = True) -> list[Path]:
    """``turntable.gif`` / ``turntable.mp4`` from frames ``[N,3,H,W]`` in [0,1]; MP4 problems raise GenrewardError."""
    import imageio.v2 as imageio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = list(to_uint8(frames))
    written = []
    if gif:
        path = folder / "turntable.gif"
        imageio.mimsave(path, arrays, duration=1000.0 / fps, loop=0)
        written.append(path)
    if mp4:
        check_mp4_support()
        path = folder / "turntable.mp4"
        try:
            # macro_block_size=1: keep the exact size (no silent resize); H.264 wants even sides, we check that
            h, w = arrays[0].shape[:2]
            if h % 2 or w % 2:
                raise GenrewardError(f"turntable.mp4 needs even frame sides, got {h}x{w}; set output.eval_resolution to an even number")
            imageio.mimwrite(path, arrays, fps=fps, codec="libx264", macro_block_size=1, pixelformat="yuv420p")
        except GenrewardError:
            raise
        except Exception as exc:
            raise GenrewardError(f"could not write {path}: {type(exc).__name__}: {exc}") from None
        written.append(path)
    return written


def write_ply(path: str | Path, verts: torch.Tensor, faces: torch.Tensor, colors: torch.Tensor) -> Path:
    """ASCII PLY with per-vertex uchar RGB (opens in MeshLab, Blender, trimesh)."""
    path = Path(path)
    rgb = (colors.clamp(0, 1) * 255).round().to(torch.uint8).tolist()
    lines = [
        "ply", "format ascii 1.0", "comment genreward sds3d marching cubes", f"element vertex {verts.shape[0]}",
        "property float x", "property float y", "property float z",
        "property uchar red", "property uchar green", "property uchar blue",
        f"element face {faces.shape[0]}", "property list uchar int vertex_indices", "end_header",
    ]
    lines += [f"{x:.6f} {y:.6f} {z:.6f} {r} {g} {b}" for (x, y, z), (r, g, b) in zip(verts.tolist(), rgb)]
    lines += [f"3 {a} {b} {c}" for a, b, c in faces.tolist()]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def write_obj(path: str | Path, verts: torch.Tensor, faces: torch.Tensor, colors: torch.Tensor) -> Path:
    """Wavefront OBJ with the common ``v x y z r g b`` vertex-colour extension (1-based faces)."""
    path = Path(path)
    lines = ["# genreward sds3d marching cubes"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f} {r:.4f} {g:.4f} {b:.4f}" for (x, y, z), (r, g, b)
              in zip(verts.tolist(), colors.clamp(0, 1).tolist())]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces.tolist()]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def write_run_gallery(run_dir: str | Path, prompt: str, media: Sequence[tuple[str, str]], scores: dict[str, float]) -> Path:
    """``gallery.html`` showing the turntable(s) and final views, via :func:`genreward.gallery.write_gallery`.

    The gallery reads a per-image ``metrics.jsonl``; the run's own ``metrics.jsonl`` is per step, so the
    records go to ``gallery/metrics.jsonl`` with paths relative to that folder.
    """
    from genreward.gallery import write_gallery

    run_dir = Path(run_dir)
    folder = run_dir / "gallery"
    folder.mkdir(parents=True, exist_ok=True)
    records = folder / "metrics.jsonl"
    records.unlink(missing_ok=True)
    finite = {k: v for k, v in scores.items() if v == v and abs(v) != float("inf")}
    for i, (label, rel) in enumerate(media):
        append_jsonl(records, {"prompt": prompt, "image": str(Path("..") / rel), "sample_index": i, "seed": label,
                               "rewards": finite})
    return write_gallery(folder, out_path=run_dir / "gallery.html", title=f"genreward sds3d: {prompt}")
