"""Loading from the Hugging Face hub when it may be unreachable.

Every ``from_pretrained`` in genreward goes through :func:`from_pretrained_offline_aware`: local cache
first (fast, no network), then the hub unless offline mode is on, and any failure becomes one
:class:`OfflineModelError` line saying what was looked for and how to pass a local folder instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from genreward.errors import GenrewardError, OfflineModelError


def hub_offline() -> bool:
    """True if the hub must not be contacted; the environment is read now, not at library import."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except (ImportError, AttributeError):
        return False


def offline_error(spec: str, kind: str, cause: BaseException | None = None) -> OfflineModelError:
    """One line: what was looked for, why it could not be had, and how to pass it locally."""
    if hub_offline():
        reason = "the model hub is switched off (HF_HUB_OFFLINE is set)"
    else:
        reason = "the model hub is unreachable from this machine"
        if cause is not None:
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            reason += f" ({type(cause).__name__}: {first[:160]})"
    return OfflineModelError(
        f"{kind} {spec!r} is not a local folder and not in the local model cache, and {reason}; "
        "download it where the hub is reachable and pass its local folder path instead"
    )


def from_pretrained_offline_aware(
    load: Callable[..., Any], source: str, spec: str, kind: str, allow_hub: bool = True, **kwargs: Any
) -> Any:
    """``load(source, local_files_only=..., **kwargs)``: local folder/cache first, then the hub unless offline."""
    local = Path(source).expanduser().exists()
    try:
        return load(source, local_files_only=True, **kwargs)
    except Exception as exc:  # OSError/ValueError/EnvironmentError and library-specific types
        local_error = exc
    if local:
        first = (str(local_error).strip().splitlines() or [type(local_error).__name__])[0]
        raise GenrewardError(f"cannot load {kind} from local folder {source}: {first[:200]}") from None
    if not allow_hub or hub_offline():
        raise offline_error(spec, kind, local_error) from None
    try:
        return load(source, local_files_only=False, **kwargs)
    except Exception as exc:  # hub/network/HTTP errors come in many types across library versions
        raise offline_error(spec, kind, exc) from None
