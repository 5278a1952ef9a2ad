"""Model loading: pipelines (``load_pipeline``), CLIP scorers (``load_clip``), judge VLMs (``load_vlm``), devices and dtypes."""

from genreward.models.device import resolve_device, resolve_dtype
from genreward.models.pipeline import load_pipeline


def load_vlm(*args, **kwargs):
    """Judge VLMs (Qwen2-VL, Qwen2.5-VL, LLaVA; ``tiny:*`` specs offline) — see :mod:`genreward.models.vlm`."""
    from genreward.models.vlm import load_vlm as _load_vlm

    return _load_vlm(*args, **kwargs)


__all__ = ["load_pipeline", "load_vlm", "resolve_device", "resolve_dtype"]
