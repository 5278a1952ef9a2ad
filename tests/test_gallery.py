"""HTML gallery: escaping, relative image links, compare mode, errors, and a real browser check."""

from __future__ import annotations

import html
import json
import math
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

from genreward.errors import GenrewardError
from genreward.gallery import load_metrics, write_gallery
from genreward.images import save_png

NASTY = "a \"quoted\" 'cat' & <script>alert(1)</script> — café 🐱 ユニコード"
CHROMIUM = "/usr/bin/chromium"


def _make_run(run_dir: Path, prompts: list[str], seed: int, offset: float = 0.0, odd_name: bool = False) -> list[dict]:
    """A fake evaluation run: 2 random PNGs per prompt and a metrics.jsonl describing them."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for p, prompt in enumerate(prompts):
        for s in range(2):
            name = f"images/p{p:04d}_s{s:02d}.png"
            if odd_name and p == 0 and s == 1:
                name = "images/odd name #1 %.png"
            save_png(torch.rand(3, 16, 24, generator=g), run_dir / name)
            rewards = {
                "clip_score": round(0.2 + 0.1 * ((p * 7 + s * 3 + seed) % 5) / 5 + offset + p * 1e-3, 9) + 0.000012345,
                "jpeg_compressibility": -12.3456 - p - s,
            }
            if p == 1 and s == 0:
                rewards["aesthetic"] = None
            records.append(
                {
                    "prompt_index": p,
                    "prompt": prompt,
                    "sample_index": s,
                    "seed": 1000 + 10 * p + s,
                    "image": name,
                    "metadata": {"category": "<b>bold</b>", "objects": ["cat", "<dog>"]},
                    "rewards": rewards,
                }
            )
    with (run_dir / "metrics.jsonl").open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return records


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.scripts: list[dict] = []
        self.links: list[dict] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs["src"])
        elif tag == "script":
            self.scripts.append(attrs)
        elif tag == "link":
            self.links.append(attrs)


def _parse(page: Path) -> _Tags:
    tags = _Tags()
    tags.feed(page.read_text(encoding="utf-8"))
    return tags


def _assert_images_resolve(page: Path, expected: int) -> None:
    tags = _parse(page)
    assert len(tags.imgs) == expected
    for src in tags.imgs:
        assert not os.path.isabs(src) and "://" not in src, src
        assert (page.parent / unquote(src)).is_file(), src


def _means(records: list[dict], reward: str) -> dict[str, float | None]:
    out: dict[str, list[float]] = {}
    for rec in records:
        v = rec["rewards"].get(reward)
        out.setdefault(rec["prompt"], [])
        if v is not None and math.isfinite(v):
            out[rec["prompt"]].append(v)
    return {p: (sum(v) / len(v) if v else None) for p, v in out.items()}


PROMPTS = ["a cat", NASTY, "a dog on a skateboard", "a lighthouse at dusk"]


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, list[dict]]:
    run_dir = tmp_path / "run"
    return run_dir, _make_run(run_dir, PROMPTS, seed=1, odd_name=True)


@pytest.fixture
def before(tmp_path: Path) -> tuple[Path, list[dict]]:
    before_dir = tmp_path / "before"
    prompts = [PROMPTS[2], PROMPTS[1], PROMPTS[0], "only in the before run"]
    return before_dir, _make_run(before_dir, prompts, seed=2, offset=-0.05)


def test_gallery_escapes_and_links(run):
    run_dir, records = run
    page = write_gallery(run_dir)
    assert page == run_dir / "gallery.html"
    text = page.read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in text
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text
    assert html.escape(NASTY) in text
    _assert_images_resolve(page, expected=len(records))
    tags = _parse(page)
    assert not tags.links and all("src" not in s for s in tags.scripts)
    assert "http://" not in text and "https://" not in text
    # 4 significant digits, per image and per prompt mean
    assert f"{records[0]['rewards']['clip_score']:.4g}" in text
    assert "-12.35" in text
    mean = _means(records, "jpeg_compressibility")["a cat"]
    assert f"{mean:.4g}" in text
    assert "window.sortGalleryBy" in text


def test_gallery_out_path_elsewhere_uses_relative_links(run, tmp_path: Path):
    run_dir, records = run
    page = write_gallery(run_dir, out_path=tmp_path / "site" / "nested" / "g.html", title="My <run>")
    text = page.read_text(encoding="utf-8")
    assert "<title>My &lt;run&gt;</title>" in text
    assert all(src.startswith("../../run/") for src in _parse(page).imgs)
    _assert_images_resolve(page, expected=len(records))


def test_gallery_compare_mode(run, before):
    run_dir, after_records = run
    before_dir, before_records = before
    page = write_gallery(run_dir, compare_dir=before_dir)
    assert page == run_dir / "compare.html"
    text = page.read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in text
    _assert_images_resolve(page, expected=len(after_records) + len(before_records))
    # every prompt appears once, matched by text across runs
    assert text.count('class="prompt-text"') == len(PROMPTS) + 1
    assert "not in the after run" in text and "not in the before run" in text
    a = _means(after_records, "clip_score")["a cat"]
    b = _means(before_records, "clip_score")["a cat"]
    assert f"{a - b:+.4g}" in text


class _Pairs(HTMLParser):
    """Per ``tr.pair`` of the compare page: its ``data-seed`` and, for each side, the image file and caption (or None)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.side: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "tr" and "pair" in classes:
            self.rows.append({"seed": attrs.get("data-seed"), "before": None, "after": None, "text": {"before": "", "after": ""}})
        elif tag == "td" and self.rows and ("before" in classes or "after" in classes):
            self.side = "before" if "before" in classes else "after"
        elif tag == "img" and self.rows and self.side:
            self.rows[-1][self.side] = Path(unquote(attrs["src"])).name

    def handle_endtag(self, tag):
        if tag == "td":
            self.side = None

    def handle_data(self, data):
        if self.rows and self.side:
            self.rows[-1]["text"][self.side] += data


def _write_run(run_dir: Path, samples: dict[int, list[int]]) -> None:
    """A run whose image of (prompt p, sample s) is images/pPPPP_sSS.png with seed 1000 + 10p + s (as ``genreward eval``)."""
    g = torch.Generator().manual_seed(len(str(run_dir)))
    with (run_dir.mkdir(parents=True) or run_dir / "metrics.jsonl").open("w", encoding="utf-8") as fh:
        for p, sample_ids in samples.items():
            for s in sample_ids:
                name = f"images/p{p:04d}_s{s:02d}.png"
                save_png(torch.rand(3, 8, 8, generator=g), run_dir / name)
                rec = {"prompt_index": p, "prompt": PROMPTS[p], "sample_index": s, "seed": 1000 + 10 * p + s,
                       "image": name, "rewards": {"clip_score": 0.1 * s + p}}
                fh.write(json.dumps(rec) + "\n")


def test_gallery_compare_pairs_images_by_prompt_and_seed(tmp_path: Path):
    """Each line of a compare row holds the before and after image of the same prompt and seed; one-sided seeds
    leave an empty cell. (The old layout put the two sides in separately wrapping strips, with no such pairing.)"""
    # after: 3 samples of prompts 0–1 but sample 0 of prompt 1 missing; before: 2 samples each, listed out of order
    _write_run(tmp_path / "after", {0: [2, 0, 1], 1: [1, 2]})
    _write_run(tmp_path / "before", {1: [1, 0], 0: [1, 0]})
    page = write_gallery(tmp_path / "after", compare_dir=tmp_path / "before")
    parser = _Pairs()
    parser.feed(page.read_text(encoding="utf-8"))
    rows = parser.rows
    expected = [(0, 0, "both"), (0, 1, "both"), (0, 2, "after"), (1, 0, "before"), (1, 1, "both"), (1, 2, "after")]
    assert len(rows) == len(expected), rows
    name = lambda p, s: f"p{p:04d}_s{s:02d}.png"  # noqa: E731
    for row, (p, s, present) in zip(rows, expected):
        assert row["seed"] == str(1000 + 10 * p + s)
        for side in ("before", "after"):
            if present in ("both", side):
                assert row[side] == name(p, s), (row, p, s)
                assert f"seed {1000 + 10 * p + s}" in row["text"][side]
            else:
                assert row[side] is None and f"not in the {side} run" in row["text"][side]
    # every image of both runs appears exactly once, and still resolves
    _assert_images_resolve(page, expected=5 + 4)


def test_gallery_compare_without_common_seeds_keeps_both_strips(tmp_path: Path):
    """Reference photos vs samples (the DreamBench gallery) share no seed: nothing is paired, both sets are shown whole."""
    _write_run(tmp_path / "after", {0: [0, 1], 1: [0]})
    refs = tmp_path / "refs"
    with (refs.mkdir() or refs / "metrics.jsonl").open("w", encoding="utf-8") as fh:
        for k in range(3):
            save_png(torch.rand(3, 8, 8), refs / f"images/r{k:02d}.png")
            fh.write(json.dumps({"prompt": PROMPTS[0], "image": f"images/r{k:02d}.png", "sample_index": k, "seed": "reference"}) + "\n")
    page = write_gallery(tmp_path / "after", compare_dir=refs)
    text = page.read_text(encoding="utf-8")
    parser = _Pairs()
    parser.feed(text)
    assert parser.rows == []
    assert text.count("no seed in common") == 1  # prompt 0; prompt 1 has no "before" images at all
    assert "not in the before run" in text
    _assert_images_resolve(page, expected=3 + 3)


def test_missing_run_dir_and_metrics(tmp_path: Path):
    with pytest.raises(GenrewardError, match="run directory not found"):
        write_gallery(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenrewardError) as info:
        write_gallery(tmp_path / "empty")
    assert "metrics.jsonl" in str(info.value) and "\n" not in str(info.value)


def test_bad_metrics_line_names_file_and_line(run):
    run_dir, _ = run
    path = run_dir / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(GenrewardError) as info:
        write_gallery(run_dir)
    assert f"{path}:3" in str(info.value) and "\n" not in str(info.value)


def test_metrics_record_validation(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    for line, needle in [
        ('{"image": "a.png"}', "'prompt'"),
        ('{"prompt": "x", "image": "a.png", "rewards": {"r": "high"}}', "'r'"),
        ("[1, 2]", "object"),
    ]:
        path.write_text('{"prompt": "ok", "image": "a.png"}\n' + line + "\n", encoding="utf-8")
        with pytest.raises(GenrewardError) as info:
            load_metrics(tmp_path)
        assert f"{path}:2" in str(info.value) and needle in str(info.value)


# --- headless browser ---------------------------------------------------------------------------

_HEAD_PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  var t = e.target;
  window.__errors.push(t && t.tagName ? "load failed: " + t.tagName + " " + (t.src || "") : String(e.message));
}, true);
</script>"""

_LOAD_PROBE = """<pre id="verdict"></pre>
<script>
window.addEventListener("load", function () {
  var v = {errors: window.__errors, images: 0, broken: [], orders: {}};
  try {
    var imgs = document.querySelectorAll("img");
    v.images = imgs.length;
    imgs.forEach(function (im) { if (!(im.complete && im.naturalWidth > 0)) v.broken.push(im.getAttribute("src")); });
    var prompts = function () {
      return Array.prototype.map.call(document.querySelectorAll("#gallery > tbody > tr .prompt-text"),
                                      function (e) { return e.textContent; });
    };
    CALLS.forEach(function (c) { window.sortGalleryBy(c[0], c[1], c[2]); v.orders[c.join("|")] = prompts(); });
    var select = document.getElementById("sort-key");
    var opt = Array.prototype.filter.call(select.options, function (o) { return o.text === "jpeg_compressibility"
      || o.text === "jpeg_compressibility (after)"; })[0];
    select.value = opt.value;
    document.getElementById("sort-dir").value = "asc";
    select.dispatchEvent(new Event("change"));
    v.orders["select"] = prompts();
    window.sortGalleryBy(null);
    v.orders["reset"] = prompts();
  } catch (e) {
    v.errors.push("probe: " + e);
  }
  document.getElementById("verdict").textContent = JSON.stringify(v);
});
</script>"""


def _browser_verdict(page: Path, calls: list[list], tmp_path: Path) -> dict:
    """Open a probed copy of ``page`` (same folder, so relative links still work) and return its verdict."""
    text = page.read_text(encoding="utf-8")
    probe = _LOAD_PROBE.replace("CALLS", json.dumps(calls))
    assert text.count("<head>") == 1 and text.count("</body>") == 1
    text = text.replace("<head>", "<head>" + _HEAD_PROBE, 1).replace("</body>", probe + "</body>", 1)
    copy = page.with_name(page.stem + ".probe.html")
    copy.write_text(text, encoding="utf-8")
    home = tmp_path / "chromium-home"
    home.mkdir(exist_ok=True)
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={home / 'profile'}", "--virtual-time-budget=5000",
        "--dump-dom", copy.resolve().as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(home)})
    match = re.search(r'<pre id="verdict">(.*?)</pre>', proc.stdout, re.S)
    assert match and match.group(1), f"no verdict from chromium (rc={proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1)))


def _assert_sorted(order: list[str], means: dict[str, float | None], descending: bool) -> None:
    assert sorted(order) == sorted(means)
    values = [means[p] for p in order]
    present = [v for v in values if v is not None]
    assert values[: len(present)] == present, "rows without a value must come last"
    assert present == sorted(present, reverse=descending)


@pytest.mark.chromium
@pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason=f"{CHROMIUM} not installed (apt-get install chromium); required when CI is set",
)
def test_gallery_in_headless_chromium(run, before, tmp_path: Path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is required in CI but missing")
    run_dir, after_records = run
    before_dir, before_records = before

    page = write_gallery(run_dir)
    verdict = _browser_verdict(page, [["clip_score", True], ["clip_score", False]], tmp_path)
    assert verdict["errors"] == []
    assert verdict["images"] == len(after_records) and verdict["broken"] == []
    clip = _means(after_records, "clip_score")
    _assert_sorted(verdict["orders"]["clip_score|true"], clip, descending=True)
    _assert_sorted(verdict["orders"]["clip_score|false"], clip, descending=False)
    assert NASTY in verdict["orders"]["clip_score|true"]
    _assert_sorted(verdict["orders"]["select"], _means(after_records, "jpeg_compressibility"), descending=False)
    assert verdict["orders"]["reset"] == PROMPTS

    page = write_gallery(run_dir, compare_dir=before_dir)
    calls = [["clip_score", True, "delta"], ["clip_score", False, "before"]]
    verdict = _browser_verdict(page, calls, tmp_path)
    assert verdict["errors"] == []
    assert verdict["images"] == len(after_records) + len(before_records) and verdict["broken"] == []
    a, b = _means(after_records, "clip_score"), _means(before_records, "clip_score")
    prompts = set(a) | set(b)
    delta = {p: a[p] - b[p] if p in a and p in b else None for p in prompts}
    _assert_sorted(verdict["orders"]["clip_score|true|delta"], delta, descending=True)
    _assert_sorted(verdict["orders"]["clip_score|false|before"], {p: b.get(p) for p in prompts}, descending=False)
