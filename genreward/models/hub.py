"""Loading from the Hugging Face hub when it may be unreachable.

Every ``from_pretrained`` in genreward goes through :func:`from_pretrained_offline_aware`: local cache
first (fast, no network), then the hub unless offline mode is on, and any failure becomes one
:class:`OfflineModelError` line saying what was looked for and how to pass a local folder instead.

Before the hub is contacted, :func:`hub_reachable` checks in a second or two that its host answers at all:
huggingface_hub retries an unreachable host with back-off (about 25 s and a dozen warning lines per file), so an
unreachable hub is reported at once, like a switched-off one. Library loggers and warnings are silenced while
a model is looked for (:func:`quiet_hub`): the project's own one-line error says what matters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from genreward.errors import GenrewardError, OfflineModelError

_LIBRARY_LOGGERS = ("huggingface_hub", "transformers", "diffusers", "open_clip", "urllib3", "filelock")
_reachable: dict[str, bool] = {}  # host:port → reachable (one probe per process)


def first_line(exc: BaseException | str, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters, cut at a word boundary (…)."""
    text = str(exc).strip()
    line = (text.splitlines() or [type(exc).__name__ if isinstance(exc, BaseException) else ""])[0].strip()
    if len(line) <= limit:
        return line
    cut = line[:limit]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:(") + "…"


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """Silence the model libraries' loggers (below ERROR) and warnings while a model is looked for or loaded."""
    saved = []
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _hub_address() -> tuple[str, int]:
    """host and port the hub client connects to first: the proxy when one is set, else the hub endpoint."""
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except (ImportError, AttributeError):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if url.scheme == "https" else ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        proxy = os.environ.get(var)
        if proxy:
            url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
            break
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if a TCP connection to the hub (or the configured proxy) opens within ``timeout`` seconds (cached)."""
    host, port = _hub_address()
    key = f"{host}:{port}"
    if key not in _reachable:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                _reachable[key] = True
        except OSError:
            _reachable[key] = False
    return _reachable[key]


def hub_unavailable() -> str | None:
    """Why the hub cannot be used right now (switched off, or unreachable), or None when it can be tried."""
    if hub_offline():
        return "the model hub is switched off (HF_HUB_OFFLINE is set)"
    if not hub_reachable():
        host, port = _hub_address()
        return f"the model hub is unreachable from this machine (no connection to {host}:{port})"
    return None


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
    elif not hub_reachable():
        reason = hub_unavailable() or "the model hub is unreachable from this machine"
    else:
        reason = "the model hub did not provide it"
        if cause is not None:
            reason += f" ({type(cause).__name__}: {first_line(cause, 160)})"
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
        with quiet_hub():
            return load(source, local_files_only=True, **kwargs)
    except Exception as exc:  # OSError/ValueError/EnvironmentError and library-specific types
        local_error = exc
    if local:
        raise GenrewardError(f"cannot load {kind} from local folder {source}: {first_line(local_error)}") from None
    if not allow_hub or hub_offline() or not hub_reachable():
        raise offline_error(spec, kind, local_error) from None
    try:
        with quiet_hub():
            return load(source, local_files_only=False, **kwargs)
    except Exception as exc:  # hub/network/HTTP errors come in many types across library versions
        raise offline_error(spec, kind, exc) from None
