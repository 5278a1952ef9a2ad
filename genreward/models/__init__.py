"""Model loading: pipelines (``load_pipeline``), CLIP scorers (``load_clip``), devices and dtypes."""

from genreward.models.device import resolve_device, resolve_dtype
from genreward.models.pipeline import load_pipeline

__all__ = ["load_pipeline", "resolve_device", "resolve_dtype"]
