"""Model-spec loaders by kind, and the plugin modules that fill registries on a miss.

A model spec is a string: an exact built-in (``tiny:sd``), a prefixed one (``open_clip:ViT-B-32/openai``),
or a hub id / local folder. ``load_pipeline`` / ``load_clip`` / ``load_vlm`` look the spec up here first:

* ``@register_spec(kind, *specs)`` binds a loader to exact specs (``"tiny:sd"``) or to prefixes (a spec
  ending in ``":"``, e.g. ``"open_clip:"``) of one kind (:data:`KINDS`). Exact specs win over prefixes, and
  longer prefixes over shorter ones. Each kind's loader signature is set by its caller (see there).
* A spec that looks prefixed (``name:...``, not an existing path) and has no entry makes the registry import
  the :data:`PLUGINS` (by name, once); they register their own entries (``genreward.world.plugin`` adds
  ``world:shapes-t2i`` and the others). A prefix still unknown after that is a one-line
  :class:`~genreward.errors.GenrewardError` listing the known prefixes; an unknown spec under a known
  prefix is one listing the built-in specs.
* Anything else has no entry: the caller falls back to a hub id or local folder.

Plugins are imported by *name* here, so the static import graph stays one-way: ``genreward.models`` and
``genreward.rewards`` never import ``genreward.world``; the world imports them and registers itself. The
rewards registry (``genreward.rewards.build``) loads the same plugins when a reward name is unknown.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Callable, TypeVar

from genreward.errors import GenrewardError

KINDS = ("pipeline", "clip", "vlm")
PLUGINS: list[str] = ["genreward.world.plugin"]  # modules imported (by name) on the first registry miss

Loader = TypeVar("Loader", bound=Callable)

_SPECS: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}
_LOADED: set[str] = set()
_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_.+-]+:)")  # 2+ characters: "C:\..." is a Windows drive, not a prefix


def _check_kind(kind: str) -> None:
    if kind not in _SPECS:
        raise ValueError(f"unknown model-spec kind {kind!r}; use one of {', '.join(KINDS)}")


def register_spec(kind: str, *specs: str) -> Callable[[Loader], Loader]:
    """Decorator: make ``loader`` the one for each of ``specs`` (exact, or a prefix ending in ``":"``) of ``kind``."""
    _check_kind(kind)
    if not specs or any(not isinstance(s, str) or not s.strip() or s != s.strip() for s in specs):
        raise ValueError(f"register_spec({kind!r}, ...) needs non-empty specs ('prefix:name' or 'prefix:'), got {specs!r}")

    def wrap(loader: Loader) -> Loader:
        table = _SPECS[kind]
        for spec in specs:
            old = table.get(spec)
            same = old is not None and (old is loader or _qualified(old) == _qualified(loader))  # a reloaded module
            if old is not None and not same:
                raise ValueError(f"{kind} spec {spec!r} is registered twice ({_qualified(old)} and {_qualified(loader)})")
            table[spec] = loader
        return loader

    return wrap


def _qualified(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def load_plugins() -> None:
    """Import each module of :data:`PLUGINS` not imported yet; a plugin that is not installed is skipped."""
    for name in list(PLUGINS):
        if name in _LOADED:
            continue
        _LOADED.add(name)
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
                raise  # the plugin exists but one of its own imports is missing: show that
            # the plugin itself is absent (e.g. a trimmed install): nothing to register


def spec_prefix(spec: str) -> str | None:
    """The ``name:`` prefix of a spec such as ``tiny:sd`` or ``open_clip:ViT-B-32/openai``; None for a hub id
    (``org/repo``), a path, or an existing file or folder whose name has a colon."""
    match = _PREFIX.match(spec)
    if match is None:
        return None
    try:
        if Path(spec).expanduser().exists():
            return None
    except OSError:
        pass
    return match.group(1)


def _lookup(kind: str, spec: str) -> Callable | None:
    table = _SPECS[kind]
    if spec in table:
        return table[spec]
    prefixes = [p for p in table if p.endswith(":") and spec.startswith(p)]
    return table[max(prefixes, key=len)] if prefixes else None


def known_specs(kind: str) -> list[str]:
    """Exact built-in specs of ``kind`` registered so far (plugins included once loaded)."""
    _check_kind(kind)
    return sorted(s for s in _SPECS[kind] if not s.endswith(":"))


def known_prefixes(kind: str) -> list[str]:
    """Spec prefixes (``tiny:``, ``world:``, ...) that ``kind`` has entries under."""
    _check_kind(kind)
    return sorted({s.split(":", 1)[0] + ":" for s in _SPECS[kind] if ":" in s})


def find_spec_loader(kind: str, spec: str, what: str | None = None) -> Callable | None:
    """The loader registered for ``spec`` of ``kind``; None when ``spec`` has no prefix (hub id or folder).

    A prefixed spec with no entry loads the plugins and looks again; then it is a one-line error. ``what``
    names the kind in that error (default: ``kind``).
    """
    _check_kind(kind)
    if not isinstance(spec, str):
        return None
    loader = _lookup(kind, spec)
    if loader is not None:
        return loader
    prefix = spec_prefix(spec)
    if prefix is None:
        return None
    load_plugins()
    loader = _lookup(kind, spec)
    if loader is not None:
        return loader
    what = what or f"{kind} model"
    if prefix in known_prefixes(kind):
        raise GenrewardError(f"unknown built-in {what} spec {spec!r}; available: {', '.join(known_specs(kind))}")
    raise GenrewardError(
        f"unknown {what} spec prefix {prefix!r} in {spec!r}; known prefixes: {', '.join(known_prefixes(kind))} "
        "(or give a hub id or a local folder)"
    )
