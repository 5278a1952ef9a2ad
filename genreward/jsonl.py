"""JSON-lines files (prompt sets, metrics): one reader with file:line errors, one appender."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from genreward.errors import GenrewardError


def iter_jsonl(lines: Iterator[str] | list[str], file: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed value) for non-blank lines; bad JSON is an error naming file and line."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise GenrewardError(f"{file}:{lineno}: invalid JSON ({exc.msg})") from None


def read_jsonl(path: str | Path) -> list[Any]:
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        return [obj for _, obj in iter_jsonl(fh, path)]


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record and flush, so a crash never loses logged lines."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
