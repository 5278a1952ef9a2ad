"""Imports run one way: the core (models, rewards) never imports the shapes world, the trainers or the CLI;
nothing in genreward/ but the CLI imports trainers; dreambench may import rewards, never the reverse.

Every module under genreward/ is parsed with ``ast`` (no import happens), so function-level imports count
too. Plugins (genreward.world) are found by name at run time (genreward.registry.PLUGINS), which is not an
import edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "genreward"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """Absolute names of every module ``name`` imports anywhere in its body (``from a import b`` gives ``a``
    and ``a.b``, since ``b`` may be a submodule)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def within(target: str, top: str) -> bool:
    return target == top or target.startswith(top + ".")


def test_every_module_parses_and_the_scan_sees_imports() -> None:
    assert "genreward.rewards.lambda_harmonic" in MODULES and "genreward.models.pipeline" in MODULES
    assert "genreward.rewards.base" in imported_modules("genreward.rewards.lambda_harmonic")
    assert any(within(m, "trainers") for m in imported_modules("genreward.cli"))  # a function-level import


@pytest.mark.parametrize("layer", ["genreward.models", "genreward.rewards"])
def test_core_layers_do_not_import_world_trainers_or_cli(layer: str) -> None:
    forbidden = ("genreward.world", "trainers", "genreward.cli")
    bad = sorted(
        f"{name} imports {target}"
        for name in MODULES
        if within(name, layer)
        for target in imported_modules(name)
        if any(within(target, top) for top in forbidden)
    )
    assert not bad, bad


def test_only_the_cli_imports_trainers() -> None:
    bad = sorted(
        f"{name} imports {target}"
        for name in MODULES
        if name != "genreward.cli"
        for target in imported_modules(name)
        if within(target, "trainers")
    )
    assert not bad, bad


def test_the_registry_imports_plugins_only_by_name() -> None:
    assert not any(within(t, "genreward.world") for t in imported_modules("genreward.registry"))


def _reaches(start: str, goal: str) -> bool:
    """Whether ``goal`` is reachable from ``start`` along genreward-internal import edges (importing
    ``a.b.c`` also runs the packages ``a`` and ``a.b``)."""
    seen, stack = set(), [start]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for target in imported_modules(name):
            if target == goal:
                return True
            parts = target.split(".")
            stack.extend(m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in MODULES)
    return False


def test_no_cycle_between_dreambench_and_lambda_harmonic() -> None:
    dreambench, harmonic = "genreward.dreambench", "genreward.rewards.lambda_harmonic"
    assert harmonic in imported_modules(dreambench) or _reaches(dreambench, harmonic)  # the allowed direction
    assert not _reaches(harmonic, dreambench), f"{harmonic} reaches {dreambench}"


# ---------------------------------------------------------------------- plugins found by name at run time


def test_world_specs_and_reward_load_the_plugin_on_a_miss() -> None:
    """In a fresh interpreter: the core imports no world module until a world: spec or the verifier reward
    is asked for; then the plugin registers both (no weights are loaded here)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from genreward.registry import find_spec_loader\n"
        "import genreward.models.pipeline, genreward.models.clip, genreward.models.vlm, genreward.rewards as R\n"
        "assert not [m for m in sys.modules if m.startswith('genreward.world')], 'world imported by the core'\n"
        "assert find_spec_loader('pipeline', 'world:shapes-t2i').__module__ == 'genreward.world.models'\n"
        "assert find_spec_loader('clip', 'world:shapes-clip') and find_spec_loader('vlm', 'world:shapes-judge')\n"
        "assert type(R.build('verifier')).__module__ == 'genreward.world.reward'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_config_builds_find_plugin_rewards() -> None:
    """``reward_from_specs`` / ``build_from_spec`` (configs, trainers, the CLI) find ``verifier`` too."""
    from genreward.rewards.base import RewardSpec, build_from_spec, reward_from_specs

    assert build_from_spec(RewardSpec(name="verifier", label="v")).name == "v"
    assert reward_from_specs([RewardSpec(name="verifier", options={"graded": True})]).graded is True


def test_unknown_spec_prefix_is_one_line_error_listing_known_prefixes() -> None:
    from genreward.errors import GenrewardError
    from genreward.models.clip import load_clip
    from genreward.models.pipeline import load_pipeline

    with pytest.raises(GenrewardError, match=r"unknown pipeline spec prefix 'nope:'") as err:
        load_pipeline("nope:sd", device="cpu")
    message = str(err.value)
    assert "\n" not in message and all(p in message for p in ("tiny:", "random:", "world:"))
    with pytest.raises(GenrewardError, match=r"unknown built-in pipeline spec 'tiny:nope'.*tiny:sd"):
        load_pipeline("tiny:nope", device="cpu")
    with pytest.raises(GenrewardError, match=r"known prefixes: .*open_clip:") as err:
        load_clip("hf:openai/clip")
    assert "\n" not in str(err.value)


def test_spec_registry_rules(tmp_path, monkeypatch) -> None:
    import genreward.models.clip  # noqa: F401  (registers the clip built-ins)
    import genreward.models.pipeline  # noqa: F401
    from genreward import registry

    assert registry.spec_prefix("tiny:sd") == "tiny:" and registry.spec_prefix("open_clip:hf-hub:x/y") == "open_clip:"
    assert registry.spec_prefix("openai/clip-vit-base-patch32") is None and registry.spec_prefix("C:\\models\\sd") is None
    folder = tmp_path / "run:1"
    folder.mkdir()
    assert registry.spec_prefix(str(folder)) is None  # an existing folder with a colon is a folder
    monkeypatch.chdir(tmp_path)
    assert registry.spec_prefix("run:1") is None
    assert registry.find_spec_loader("clip", "open_clip:hf-hub:x/y").__name__ == "_open_clip_spec"  # longest prefix
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_spec("pipeline", "tiny:sd")(lambda spec: None)
