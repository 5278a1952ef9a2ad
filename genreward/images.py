"""The one place where images change representation.

Inside genreward images are float tensors ``[B, 3, H, W]`` in ``[0, 1]``. PIL images, uint8 arrays and
PNG files exist only at the edges (loading references, writing galleries); convert with these helpers.
Folders of images (a subject's reference photos) are read here too: :func:`image_files`,
:func:`load_reference_images`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from genreward.errors import GenrewardError

log = logging.getLogger("genreward.images")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """Validate the image contract ``[B, 3, H, W]`` float in [0, 1]; return the tensor unchanged."""
    if not isinstance(images, torch.Tensor):
        raise GenrewardError(f"{what} must be a torch.Tensor [B,3,H,W] in [0,1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise GenrewardError(f"{what} must have shape [B,3,H,W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise GenrewardError(f"{what} must be a float tensor in [0,1], got dtype {images.dtype}")
    return images


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B,3,H,W]`` float in [0,1] → ``[B,H,W,3]`` uint8 (rounded, clamped)."""
    check_images(images)
    arr = (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B,3,H,W]`` float in [0,1] → list of RGB PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def from_pil(images: Sequence[Image.Image] | Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL image(s) → ``[B,3,H,W]`` float in [0,1]. All must share a size unless ``size=(H, W)`` is given."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and (im.height, im.width) != tuple(size):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise GenrewardError(f"images have different sizes {sorted(shapes)}; pass size=(H, W) to resize them")
    return from_uint8(np.stack(arrays))


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """``[B,H,W,3]`` (or ``[H,W,3]``) uint8 → ``[B,3,H,W]`` float in [0,1]."""
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise GenrewardError(f"expected uint8 images [B,H,W,3], got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0


def load_images(paths: Iterable[str | Path], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read image files into ``[B,3,H,W]`` in [0,1]; unreadable files are a one-line error naming the file."""
    pil = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise GenrewardError(f"image file not found: {p}")
        try:
            with Image.open(p) as im:
                pil.append(im.convert("RGB"))
        except Exception as exc:  # PIL raises several types for corrupt files
            raise GenrewardError(f"cannot read image {p}: {exc}") from None
    return from_pil(pil, size=size)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write one ``[3,H,W]`` (or ``[1,3,H,W]``) image in [0,1] as a lossless PNG."""
    if image.ndim == 3:
        image = image[None]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image)[0].save(path, format="PNG")
    return path


# ------------------------------------------------------------------------------------- image folders


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (one-line error if none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GenrewardError(f"subject folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise GenrewardError(f"subject folder {folder} holds no reference images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_reference_images(folder: str | Path, size: int | None = None) -> torch.Tensor:
    """A subject's reference photos (the images directly inside ``folder``) as ``[M,3,H,W]`` in [0,1].

    Unreadable files are one-line errors naming the file. Photos of different sizes are resized (with a
    warning naming each file) to the first photo's size; ``size`` instead gives square ``size×size`` photos
    (shorter side resized, centre crop — DreamBooth's preprocessing).
    """
    files = image_files(folder)
    sizes = []
    for path in files:
        try:
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                sizes.append((im.height, im.width))
        except Exception as exc:  # PIL raises many types for broken files
            raise GenrewardError(f"cannot read reference image {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if size is not None:
        return torch.cat([fit_square(load_images([p]), size) for p in files])
    target = sizes[0]
    for path, hw in zip(files, sizes):
        if hw != target:
            log.warning("reference image %s is %dx%d, not %dx%d like %s; resizing it", path, hw[1], hw[0], target[1], target[0], files[0].name)
    return load_images(files, size=target)


def fit_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and centre-crop to ``size×size``."""
    check_images(images)
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False) if (nh, nw) != (h, w) else images
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size].clamp(0, 1).contiguous()
