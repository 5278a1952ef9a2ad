"""Prompt-set loading: shipped sets, every supported format, and one-line errors naming the culprit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genreward.errors import GenrewardError
from genreward.prompts import PROMPTS_DIR, PromptItem, PromptSource, load_prompt_set


def _raises_one_line(fn, *needles: str) -> str:
    with pytest.raises(GenrewardError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# --- shipped sets -------------------------------------------------------------------------------


def test_shipped_animals_by_bare_name():
    items = load_prompt_set("animals")
    assert len(items) >= 45
    assert all(isinstance(i, PromptItem) and i.prompt and not i.prompt.startswith("#") for i in items)
    assert len({i.prompt for i in items}) == len(items)
    assert load_prompt_set("animals.txt") == items


def test_shipped_compositional_has_categories():
    items = load_prompt_set("compositional")
    assert len(items) >= 35
    cats = {i.metadata["category"] for i in items}
    assert cats == {"colour", "count", "position"}
    assert all(isinstance(i.metadata["objects"], list) and i.metadata["objects"] for i in items)
    assert "prompt" not in items[0].metadata


def test_shipped_styles():
    items = load_prompt_set("styles")
    assert len(items) >= 30
    assert any("watercolor" in i.prompt for i in items)


def test_shipped_readme_lists_every_set():
    readme = (PROMPTS_DIR / "README.md").read_text(encoding="utf-8")
    for path in PROMPTS_DIR.iterdir():
        if path.suffix in {".txt", ".jsonl", ".csv", ".tsv"}:
            assert path.name in readme
            load_prompt_set(path)


# --- formats ------------------------------------------------------------------------------------


def test_txt_skips_blank_and_comment_lines(tmp_path: Path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n\na cat\n   \n  a dog  \n#a comment\nan \"owl\" ü\n", encoding="utf-8")
    items = load_prompt_set(f)
    assert [i.prompt for i in items] == ["a cat", "a dog", 'an "owl" ü']
    assert all(i.metadata == {} for i in items)


def test_jsonl_keeps_other_keys_as_metadata(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    lines = [{"prompt": "a red cube", "category": "colour", "objects": ["cube"]}, {"prompt": "two cats", "n": 2}]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    items = load_prompt_set(f)
    assert items[0] == PromptItem("a red cube", {"category": "colour", "objects": ["cube"]})
    assert items[1] == PromptItem("two cats", {"n": 2})


def test_jsonl_custom_column(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"caption": "a boat", "id": 7}\n', encoding="utf-8")
    assert load_prompt_set(f, column="caption") == [PromptItem("a boat", {"id": 7})]


def test_csv_with_metadata_and_explicit_column(tmp_path: Path):
    f = tmp_path / "p.csv"
    f.write_text('text,category\n"a cat, sitting",animals\na dog,animals\n', encoding="utf-8")
    items = load_prompt_set(f, column="text")
    assert items == [PromptItem("a cat, sitting", {"category": "animals"}), PromptItem("a dog", {"category": "animals"})]


def test_csv_default_prompt_column(tmp_path: Path):
    f = tmp_path / "p.csv"
    f.write_text("id,prompt\n1,a fox\n2,a hen\n", encoding="utf-8")
    assert [i.prompt for i in load_prompt_set(f)] == ["a fox", "a hen"]
    assert load_prompt_set(f)[0].metadata == {"id": "1"}


def test_partiprompts_like_tsv(tmp_path: Path):
    f = tmp_path / "PartiPrompts.tsv"
    f.write_text(
        "Prompt\tCategory\tChallenge\tNote\n"
        "bond\tAbstract\tBasic\tSingle-word concept\n"
        'A "smiley" face\tIllustrations\tImagination\t\n',
        encoding="utf-8",
    )
    items = load_prompt_set(f)
    assert [i.prompt for i in items] == ["bond", 'A "smiley" face']
    assert items[0].metadata == {"Category": "Abstract", "Challenge": "Basic", "Note": "Single-word concept"}


def test_drawbench_like_csv(tmp_path: Path):
    f = tmp_path / "drawbench.csv"
    f.write_text(
        "\ufeffPrompts,Category\n"
        "A red colored car.,Colors\n"
        '"A black apple and a green backpack. The apple is ""black""",Colors\n',
        encoding="utf-8",
    )
    items = load_prompt_set(f)
    assert items[0] == PromptItem("A red colored car.", {"Category": "Colors"})
    assert items[1].prompt == 'A black apple and a green backpack. The apple is "black"'


# --- errors -------------------------------------------------------------------------------------


def test_missing_file_says_what_was_looked_for(tmp_path: Path):
    _raises_one_line(lambda: load_prompt_set(tmp_path / "nope.txt"), "nope.txt", "not found")
    msg = _raises_one_line(lambda: load_prompt_set("no_such_set"), "no_such_set")
    assert str(PROMPTS_DIR / "no_such_set.txt") in msg


def test_unsupported_extension(tmp_path: Path):
    f = tmp_path / "p.yaml"
    f.write_text("- a cat\n", encoding="utf-8")
    _raises_one_line(lambda: load_prompt_set(f), str(f), ".yaml", ".jsonl")


@pytest.mark.parametrize("name,text", [("e.txt", "# only a comment\n\n"), ("e.jsonl", "\n"), ("e.csv", "prompt\n")])
def test_empty_set(tmp_path: Path, name: str, text: str):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    _raises_one_line(lambda: load_prompt_set(f), str(f), "no prompts")


def test_csv_without_header(tmp_path: Path):
    f = tmp_path / "empty.csv"
    f.write_text("", encoding="utf-8")
    _raises_one_line(lambda: load_prompt_set(f), str(f), "header")


def test_missing_column_lists_available(tmp_path: Path):
    f = tmp_path / "p.tsv"
    f.write_text("text\tcategory\na cat\tanimals\n", encoding="utf-8")
    _raises_one_line(lambda: load_prompt_set(f), str(f), "text", "category")
    _raises_one_line(lambda: load_prompt_set(f, column="caption"), str(f), "'caption'", "text", "category")


def test_bad_json_line_names_file_and_line(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n\n{"prompt": oops}\n', encoding="utf-8")
    _raises_one_line(lambda: load_prompt_set(f), f"{f}:3", "invalid JSON")


def test_jsonl_without_prompt_key(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"caption": "a cat"}\n', encoding="utf-8")
    _raises_one_line(lambda: load_prompt_set(f), f"{f}:2", "'prompt'", "caption")
    _raises_one_line(lambda: load_prompt_set(f, column="caption"), f"{f}:1", "'caption'")


def test_jsonl_non_object_and_non_string_prompt(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    f.write_text('["a cat"]\n', encoding="utf-8")
    _raises_one_line(lambda: load_prompt_set(f), f"{f}:1", "object")
    f.write_text('{"prompt": 3}\n', encoding="utf-8")
    _raises_one_line(lambda: load_prompt_set(f), f"{f}:1", "string")


# --- PromptSource -------------------------------------------------------------------------------


def test_prompt_source_sampling_is_reproducible():
    src = PromptSource.from_path("animals")
    a = src.sample(64, torch.Generator().manual_seed(123))
    b = src.sample(64, torch.Generator().manual_seed(123))
    c = src.sample(64, torch.Generator().manual_seed(124))
    assert [i.prompt for i in a] == [i.prompt for i in b]
    assert [i.prompt for i in a] != [i.prompt for i in c]
    assert len({i.prompt for i in a}) > 10
    assert src.sample(0, torch.Generator().manual_seed(0)) == []


def test_prompt_source_take_and_iteration():
    src = PromptSource(["a", PromptItem("b", {"k": 1}), "c"])
    assert len(src) == 3
    assert [i.prompt for i in src] == ["a", "b", "c"] == src.prompts
    assert [i.prompt for i in src.take(2)] == ["a", "b"]
    assert [i.prompt for i in src.take(5)] == ["a", "b", "c", "a", "b"]
    assert src[1].metadata == {"k": 1}
    with pytest.raises(GenrewardError):
        PromptSource([])
    with pytest.raises(GenrewardError):
        src.take(-1)


def test_select_prompts_where_and_limit(tmp_path) -> None:
    from genreward.config import config_from_dict
    from genreward.prompts import load_prompts
    from genreward.schema import PromptsConfig

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "type": "single"}\n{"prompt": "b", "type": "count"}\n'
                    '{"prompt": "c", "type": "relation"}\n{"prompt": "d", "type": "single"}\n')
    pick = lambda **kw: [i.prompt for i in load_prompts(config_from_dict({"path": str(path), **kw}, PromptsConfig))]  # noqa: E731
    assert pick(where={"type": "single"}) == ["a", "d"]
    assert pick(where={"type": ["count", "relation"]}) == ["b", "c"]
    assert pick(where={"type": "single"}, limit=1) == ["a"]  # limit applies after the filter
    assert pick(limit=3) == ["a", "b", "c"]
    with pytest.raises(GenrewardError, match=r"p.jsonl: no prompt matches where=\{'type': 'x'\}"):
        pick(where={"type": "x"})
