"""Prompt sets: load them from plain files and draw prompts reproducibly.

Training and evaluation both need "a list of prompts plus whatever metadata came with them" (a
category, the objects a prompt mentions, a PartiPrompts challenge tag). Supporting the formats
public benchmarks ship in (``.txt``, ``.jsonl``, ``.csv``, ``.tsv``) means those files load as
downloaded, and the project's own sets in ``prompts/`` load by bare name (``"animals"``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from genreward.errors import GenrewardError
from genreward.jsonl import iter_jsonl

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
"""Folder holding the prompt sets shipped with the project."""

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".csv", ".tsv")

# Column names tried, in order, when a .csv/.tsv is loaded without ``column``. "Prompt" is
# PartiPrompts' header and "Prompts" DrawBench's, so both load without configuration.
_DEFAULT_COLUMNS = ("prompt", "Prompt", "prompts", "Prompts")


@dataclass
class PromptItem:
    """One prompt and the metadata that came with it (other jsonl keys or csv columns)."""

    prompt: str
    metadata: dict = field(default_factory=dict)


def resolve_prompt_path(path: str | Path) -> Path:
    """Return ``path`` if it exists, else look a bare name up in the shipped ``prompts/`` folder.

    A bare name may omit the extension (``animals`` finds ``prompts/animals.txt``), so configs can
    name shipped sets without knowing where the project is installed.
    """
    given = Path(path).expanduser()
    if given.is_file():
        return given
    looked = [str(given)]
    if len(given.parts) == 1:
        candidates = [PROMPTS_DIR / given.name]
        if given.suffix.lower() not in SUPPORTED_EXTENSIONS:
            candidates += [PROMPTS_DIR / f"{given.name}{ext}" for ext in SUPPORTED_EXTENSIONS]
        for cand in candidates:
            if cand.is_file():
                return cand
        looked += [str(c) for c in candidates]
    raise GenrewardError(f"prompt set not found: {str(path)!r} (looked for {', '.join(looked)})")


def load_prompt_set(path: str | Path, column: str | None = None) -> list[PromptItem]:
    """Load a prompt set from a ``.txt``, ``.jsonl``, ``.csv`` or ``.tsv`` file.

    ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
    ``.jsonl``: one object per line; the prompt is under ``column`` (default ``"prompt"``), other
    keys become metadata. ``.csv``/``.tsv``: a header row is required; the prompt is ``column``,
    by default the first of ``prompt``, ``Prompt``, ``prompts``, ``Prompts`` present; other columns
    become metadata, and rows with an empty prompt are skipped. ``column`` is ignored for ``.txt``.
    """
    file = resolve_prompt_path(path)
    ext = file.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise GenrewardError(
            f"unsupported prompt file extension {file.suffix or '(none)'!r} for {file}; "
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GenrewardError(f"prompt file {file} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise GenrewardError(f"cannot read prompt file {file}: {exc}") from None

    if ext == ".txt":
        items = _parse_txt(text)
    elif ext == ".jsonl":
        items = _parse_jsonl(text, file, column or "prompt")
    else:
        items = _parse_table(text, file, column, delimiter="\t" if ext == ".tsv" else ",")
    if not items:
        raise GenrewardError(f"prompt set {file} contains no prompts")
    return items


def select_prompts(items: list[PromptItem], where: dict | None = None, limit: int | None = None,
                   source: str = "prompt set") -> list[PromptItem]:
    """Prompts whose metadata matches every ``where`` key (a list value matches any of its entries), then
    the first ``limit``; an empty selection is a one-line error naming the filter."""
    if where:
        def keep(item: PromptItem) -> bool:
            for key, want in where.items():
                wanted = want if isinstance(want, list) else [want]
                if item.metadata.get(key) not in wanted:
                    return False
            return True

        items = [item for item in items if keep(item)]
        if not items:
            raise GenrewardError(f"{source}: no prompt matches where={where}")
    return items[:limit] if limit is not None else items


def load_prompts(config: "object") -> list[PromptItem]:
    """Load a ``PromptsConfig`` (path, column, where, limit): the one entry point trainers and CLI use."""
    items = load_prompt_set(config.path, column=config.column)
    return select_prompts(items, getattr(config, "where", None), config.limit, source=str(config.path))


def _parse_txt(text: str) -> list[PromptItem]:
    items = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            items.append(PromptItem(line, {}))
    return items


def _parse_jsonl(text: str, file: Path, key: str) -> list[PromptItem]:
    items = []
    for lineno, obj in iter_jsonl(text.splitlines(), file):
        if not isinstance(obj, dict):
            raise GenrewardError(f"{file}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if key not in obj:
            raise GenrewardError(f"{file}:{lineno}: object has no {key!r} key (keys: {', '.join(obj) or 'none'})")
        prompt = obj.pop(key)
        if not isinstance(prompt, str) or not prompt.strip():
            raise GenrewardError(f"{file}:{lineno}: {key!r} must be a non-empty string, got {prompt!r}")
        items.append(PromptItem(prompt.strip(), obj))
    return items


def _parse_table(text: str, file: Path, column: str | None, delimiter: str) -> list[PromptItem]:
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise GenrewardError(f"prompt file {file} has no header row; the first line must name the columns")
    header = [h.strip() for h in header]
    if column is None:
        column = next((c for c in _DEFAULT_COLUMNS if c in header), None)
        if column is None:
            raise GenrewardError(
                f"prompt file {file} has no prompt column (tried {', '.join(_DEFAULT_COLUMNS)}); "
                f"pass column= one of the available columns: {', '.join(header)}"
            )
    elif column not in header:
        raise GenrewardError(f"column {column!r} not found in {file}; available columns: {', '.join(header)}")
    idx = header.index(column)
    items = []
    for row in reader:
        if idx >= len(row) or not row[idx].strip():
            continue
        metadata = {name: (row[i] if i < len(row) else None) for i, name in enumerate(header) if i != idx and name}
        items.append(PromptItem(row[idx].strip(), metadata))
    return items


class PromptSource:
    """A fixed list of prompts that training samples from and evaluation walks through in order."""

    def __init__(self, items: Iterable[PromptItem | str]):
        self.items: list[PromptItem] = [i if isinstance(i, PromptItem) else PromptItem(str(i), {}) for i in items]
        if not self.items:
            raise GenrewardError("PromptSource needs at least one prompt")

    @classmethod
    def from_path(cls, path: str | Path, column: str | None = None) -> "PromptSource":
        """Build a source from a prompt file or a shipped set name (see :func:`load_prompt_set`)."""
        return cls(load_prompt_set(path, column=column))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[PromptItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> PromptItem:
        return self.items[index]

    @property
    def prompts(self) -> list[str]:
        """The prompt strings, in file order."""
        return [item.prompt for item in self.items]

    def sample(self, n: int, generator: torch.Generator) -> list[PromptItem]:
        """Draw ``n`` prompts uniformly with replacement; the same generator state gives the same draw."""
        if n < 0:
            raise GenrewardError(f"cannot sample a negative number of prompts: {n}")
        idx = torch.randint(len(self.items), (n,), generator=generator, device=generator.device)
        return [self.items[i] for i in idx.tolist()]

    def take(self, n: int) -> list[PromptItem]:
        """The first ``n`` prompts in order, wrapping around when ``n`` exceeds the set size."""
        if n < 0:
            raise GenrewardError(f"cannot take a negative number of prompts: {n}")
        return [self.items[i % len(self.items)] for i in range(n)]

