"""Model families: one file per family, detected from the pipeline class (``model.family`` overrides).

``family_of(pipe)`` returns the :class:`~genreward.models.families.base.ModelFamily` that wraps ``pipe``; the sampler
and the trainers go through it (docs/architecture.md, "Model families").
"""

from __future__ import annotations

from genreward.errors import GenrewardError
from genreward.models.families.base import Conditioning, ModelFamily
from genreward.models.families.flux import FluxFamily
from genreward.models.families.sd import SDFamily
from genreward.models.families.sd3 import SD3Family
from genreward.models.families.sdxl import SDXLFamily

FAMILIES: dict[str, type[ModelFamily]] = {f.name: f for f in (SDFamily, SDXLFamily, SD3Family, FluxFamily)}

__all__ = ["FAMILIES", "Conditioning", "ModelFamily", "family_of", "detect_family"]


def detect_family(pipe) -> str:
    """The family name of ``pipe`` from its class (or its bases'): one line when no family knows it."""
    for cls in type(pipe).__mro__:
        for name, family in FAMILIES.items():
            if cls.__name__ in family.pipeline_classes:
                return name
    if hasattr(pipe, "unet") and hasattr(pipe, "text_encoder") and not hasattr(pipe, "text_encoder_2"):
        return "sd"  # SD-1.x-shaped pipelines of other classes (e.g. the shapes world's)
    raise GenrewardError(f"no model family knows pipeline class {type(pipe).__name__}; genreward runs "
                         f"{', '.join(FAMILIES)} (set model.family to one of them if the class is a renamed one)")


def family_of(pipe, name: str | None = None, spec: str = "this") -> ModelFamily:
    """The family wrapping ``pipe``: ``name`` (``model.family``) or the one detected from the class. Cached on the pipe."""
    if name is not None and name not in FAMILIES:
        raise GenrewardError(f"unknown model family '{name}' (model.family); known: {', '.join(FAMILIES)}")
    try:
        detected = detect_family(pipe)
    except GenrewardError:
        if name is None:
            raise
        detected = name  # a class no family lists: the user's model.family decides
    if name is not None and name != detected:
        raise GenrewardError(f"model.family={name} does not fit pipeline {spec!r} ({type(pipe).__name__}, a {detected} "
                             f"model); remove model.family or load a {name} pipeline")
    wanted = detected
    cached = getattr(pipe, "_genreward_family", None)
    if cached is not None and cached.name == wanted:
        return cached
    family = FAMILIES[wanted](pipe)
    try:
        pipe._genreward_family = family
    except AttributeError:  # pragma: no cover - pipelines accept attributes
        pass
    return family
