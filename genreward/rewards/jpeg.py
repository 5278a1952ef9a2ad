"""JPEG (in)compressibility, the two prompt-free rewards of DDPO (Black et al., 2023).

Each image is encoded as a JPEG (quality 95, as in DDPO) and its size taken in kB (bytes / 1000).
Compressibility rewards small files (score = −kB: flat, simple images); incompressibility rewards
large ones (score = +kB: detailed, high-frequency images). Not differentiable: it goes through PIL.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import torch

from genreward.errors import GenrewardError
from genreward.images import check_images, to_pil
from genreward.rewards.base import RewardOutput, check_image_range, nan_for_nonfinite_images, register


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG file size of each image in kB, float32 ``[B]`` on the CPU."""
    sizes = []
    for image in to_pil(check_images(images)):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class _JpegSize:
    """Shared implementation; subclasses fix the sign and the registered name."""

    differentiable = False
    sign = 1.0
    default_name = "jpeg_size"

    def __init__(self, quality: int = 95):
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise GenrewardError(f"{self.default_name} option quality must be an integer in 1..100, got {quality!r}")
        self.quality = quality
        self.name = self.default_name

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] = (), **context: Any) -> RewardOutput:
        check_images(images)
        check_image_range(self.name, images)
        sizes = nan_for_nonfinite_images(jpeg_sizes_kb(images, self.quality).to(images.device), images)
        return RewardOutput(scores=self.sign * sizes, details={"jpeg_kb": sizes})


@register("jpeg_compressibility")
class JpegCompressibility(_JpegSize):
    """score = −(JPEG size in kB): higher for images that compress well."""

    sign = -1.0
    default_name = "jpeg_compressibility"


@register("jpeg_incompressibility")
class JpegIncompressibility(_JpegSize):
    """score = +(JPEG size in kB): higher for images with much fine detail."""

    sign = 1.0
    default_name = "jpeg_incompressibility"
