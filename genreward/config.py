"""YAML configs → typed dataclasses, with dotted command-line overrides.

``load_config(path, Schema, overrides)`` reads a YAML file, applies overrides such as
``sample.num_steps=10`` or ``rewards.0.weight=2`` (values parsed as YAML), and converts the result
into the dataclass ``Schema``, checking every key and type. Problems are :class:`ConfigError` with one
line naming the file and the dotted key. Every config has a top-level ``output_dir`` that defaults to
``outputs/<config file stem>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from genreward.errors import ConfigError

T = TypeVar("T")

MISSING_VALUE = "???"  # a YAML value that must be given (on the command line or in a derived config)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check/convert ``value`` against the annotation ``tp``; ``key`` is the dotted path for errors."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[-1] if len(errors) == 1 else ConfigError(
            f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}"
        )
    if origin is Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in get_args(tp)):
            # YAML 1.1 reads no/off/false (yes/on/true) as booleans; map back to the spelling the choices use.
            spellings = ("no", "off", "false") if value is False else ("yes", "on", "true")
            value = next((a for a in get_args(tp) if isinstance(a, str) and a.lower() in spellings), value)
        if value in get_args(tp):
            return value
        raise ConfigError(f"{source}: key '{key}' must be one of {', '.join(repr(a) for a in get_args(tp))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping ({tp.__name__}), got {value!r}")
        return _build_dataclass(tp, value, key, source)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' expects a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{source}: key '{key}' expects {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}.{i}", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}.{i}", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' expects a mapping, got {value!r}")
        args = get_args(tp)
        vtype = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vtype, f"{key}.{k}", source) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML 1.1 reads "1e-4" as a string
                except ValueError:
                    pass
            raise ConfigError(f"{source}: key '{key}' expects float, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' expects int, got {value!r} ({type(value).__name__})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' expects true/false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{source}: key '{key}' expects a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}")


def _build_dataclass(cls: type[T], data: dict, prefix: str, source: str) -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # old key → new key: a renamed option stops with the new name. A new name without a dot is in the same
    # section; a dotted one is a full path from the top (the option moved to another section). A dotted *old* key
    # names an option inside a section that no longer exists (or no longer has it), e.g. "output.resume".
    moved = getattr(cls, "__moved_keys__", {})
    for old, target in moved.items():
        head, _, rest = str(old).partition(".")
        present = old in data if not rest else _has_path(data.get(head), rest.split("."))
        if present and (rest or old not in fields):
            full = f"{prefix}.{old}" if prefix else str(old)
            new = f"{prefix}.{target}" if prefix and "." not in target else target
            raise ConfigError(f"{source}: key '{full}' was renamed; use '{new}'")
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        full = f"{prefix}.{key}" if prefix else str(key)
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(fields)})"
        raise ConfigError(f"{source}: unknown key '{full}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in data:
            if data[name] == MISSING_VALUE:
                raise ConfigError(f"{source}: missing required value for key '{full}' (set it in the file or as {full}=...)")
            kwargs[name] = _convert(data[name], hints[name], full, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{full}'")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ validation
        raise ConfigError(f"{source}: {exc}") from None
    return obj


def _has_path(node: Any, parts: list[str]) -> bool:
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.0.c=value"`` → (["a","b","0","c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            index = int(part) if part.lstrip("-").isdigit() else None
            if index is None or not -len(node) <= index < len(node):
                raise ConfigError(f"command line: key '{'.'.join(path)}' has no list item {part}")
            node = node[index]
        else:
            if part not in node or node[part] is None:
                if path[i + 1].isdigit():
                    where = ".".join(path[: i + 1])
                    raise ConfigError(
                        f"command line: key '{'.'.join(path)}' has no list item {path[i + 1]} ('{where}' is not set in the file; give the whole list, e.g. {where}=[...])"
                    )
                node[part] = {}
            node = node[part]
    last = path[-1]
    if isinstance(node, list):
        if not last.lstrip("-").isdigit() or not -len(node) <= int(last) < len(node):
            raise ConfigError(f"command line: key '{'.'.join(path)}' has no list item {last}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"command line: key '{'.'.join(path[:-1])}' is not a mapping, cannot set '{last}'")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path, schema: type[T], overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read ``path``, apply dotted ``overrides``, and return a validated ``schema`` instance."""
    data = read_yaml(path)
    return config_from_dict(data, schema, overrides, source=str(path), default_name=Path(path).stem)


def config_from_dict(data: dict, schema: type[T], overrides=(), source: str = "<config>", default_name: str = "run") -> T:
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(data, key_path, value)
    if "output_dir" in {f.name for f in dataclasses.fields(schema)} and not data.get("output_dir"):
        data["output_dir"] = str(Path("outputs") / default_name)
    return _build_dataclass(schema, data, "", source)


def to_dict(config: Any) -> Any:
    """Dataclass tree → plain YAML-able data."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def save_config(config: Any, output_dir: str | Path, filename: str = "config.yaml") -> Path:
    """Write the fully resolved config next to a run's outputs."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    return path


def check_output_dir(path: str | Path, key: str = "output_dir") -> Path:
    """A folder that can be created (or exists) and written: one line naming the path otherwise.

    Called before any model loads, so a typo in ``output_dir`` costs a second, not a model load. Nothing is
    created: the nearest existing folder above ``path`` gets a probe file that is removed at once (a permission
    check alone misses read-only mounts and pseudo file systems).
    """
    import os
    import tempfile

    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{key} {path} exists and is not a folder")
    parent = target
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{key} {path} cannot be created: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".genreward-write-test-", dir=str(parent))
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{key} {path} is not writable: cannot create files in {parent} ({reason})") from None
    return target
