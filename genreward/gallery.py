"""Static HTML galleries of evaluation runs.

Reward numbers alone hide reward hacking (washed-out images that score well, text rendered into the
picture); looking at the images next to their scores does not. The gallery is one self-contained
HTML file with relative image links, no external resources, and a small inline sorting script, so
a run folder can be zipped, moved and opened anywhere.

A run folder holds ``metrics.jsonl`` (one JSON object per image: ``prompt``, ``image`` relative to
the run folder, optional ``prompt_index``, ``sample_index``, ``seed``, ``metadata`` and
``rewards``) and the PNG files under ``images/``.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from genreward.errors import GenrewardError
from genreward.jsonl import iter_jsonl

METRICS_FILE = "metrics.jsonl"


def load_metrics(run_dir: str | Path) -> list[dict]:
    """Read and validate ``RUN_DIR/metrics.jsonl``; every problem is a one-line error with file and line."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GenrewardError(f"run directory not found: {run_dir}")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise GenrewardError(f"metrics file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, rec in iter_jsonl(fh, path):
            if lineno == 1 and isinstance(rec, dict) and "image" not in rec and ("epoch" in rec or "step" in rec):
                evals = sorted(p.name for p in (run_dir / "eval").iterdir() if p.is_dir()) if (run_dir / "eval").is_dir() else []
                where = f"one of its evaluations, e.g. {run_dir / 'eval' / evals[-1]}" if evals else "an evaluation folder"
                raise GenrewardError(f"{run_dir} is a training run (its metrics.jsonl logs {'epochs' if 'epoch' in rec else 'steps'}, "
                                     f"not images); a gallery shows {where}, or the run's gallery.html")
            records.append(_check_record(rec, path, lineno))
    if not records:
        raise GenrewardError(f"metrics file {path} has no records")
    return records


def _check_record(rec: object, path: Path, lineno: int) -> dict:
    where = f"{path}:{lineno}"
    if not isinstance(rec, dict):
        raise GenrewardError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("prompt", "image"):
        if not isinstance(rec.get(key), str):
            raise GenrewardError(f"{where}: {key!r} must be a string, got {rec.get(key)!r}")
    for key in ("rewards", "metadata", "verdicts"):
        if not isinstance(rec.get(key, {}), dict):
            raise GenrewardError(f"{where}: {key!r} must be a JSON object, got {rec.get(key)!r}")
    for name, value in rec.get("rewards", {}).items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise GenrewardError(f"{where}: reward {name!r} must be a number or null, got {value!r}")
    return rec


@dataclass
class _Row:
    """One prompt: its images from the current run ("after") and, when comparing, the other ("before")."""

    prompt: str
    order: tuple
    metadata: dict = field(default_factory=dict)
    after: list[dict] = field(default_factory=list)
    before: list[dict] = field(default_factory=list)


def _group(records: list[dict], side: str, rows: dict[str, _Row]) -> None:
    for n, rec in enumerate(records):
        row = rows.get(rec["prompt"])
        if row is None:
            index = rec.get("prompt_index")
            order = (0 if side == "after" else 1, index if isinstance(index, int) else math.inf, n)
            row = rows[rec["prompt"]] = _Row(rec["prompt"], order, dict(rec.get("metadata") or {}))
        getattr(row, side).append(rec)


def _mean(records: list[dict], reward: str) -> float | None:
    """Mean over the finite values only, so one NaN image does not blank the whole prompt."""
    values = [r.get("rewards", {}).get(reward) for r in records]
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _sample_order(rec: dict) -> tuple:
    index = rec.get("sample_index")
    numeric = isinstance(index, (int, float)) and not isinstance(index, bool)
    return (index if numeric else math.inf, str(rec.get("seed", "")))


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _src(image: Path, html_dir: Path) -> str:
    """Relative URL from the HTML file to the image, percent-encoded so odd file names still load."""
    try:
        rel = os.path.relpath(image, html_dir)
    except ValueError:  # different drives on Windows: no relative path exists
        return image.resolve().as_uri()
    return quote(Path(rel).as_posix())


def _figure(rec: dict, run_dir: Path, html_dir: Path, rewards: list[str]) -> str:
    image = run_dir / rec["image"]
    sample, seed = html.escape(str(rec.get("sample_index", "?"))), html.escape(str(rec.get("seed", "?")))
    caption = [f"sample {sample} · seed {seed}"]
    for name in rewards:
        value = rec.get("rewards", {}).get(name)
        if value is not None:
            caption.append(f"{html.escape(name)}: {html.escape(_fmt(float(value)))}")
        verdict = (rec.get("verdicts") or {}).get(name)
        if verdict:
            caption.append(f'<span class="verdict">{html.escape(str(verdict))}</span>')
    if image.is_file():
        media = f'<img src="{html.escape(_src(image, html_dir))}" alt="{html.escape(rec["prompt"])}">'
    else:
        media = f'<div class="missing">missing image<br>{html.escape(rec["image"])}</div>'
    return f'<figure>{media}<figcaption>{"<br>".join(caption)}</figcaption></figure>'


def _metadata_html(metadata: dict) -> str:
    if not metadata:
        return ""
    parts = []
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        parts.append(f"<dt>{html.escape(str(key))}</dt><dd>{html.escape(text)}</dd>")
    return f'<dl class="meta">{"".join(parts)}</dl>'


def _script_json(data: object) -> str:
    """JSON that is safe inside ``<script>``: no ``<``, ``>`` or ``&`` can end the element early."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_gallery(
    run_dir: str | Path,
    compare_dir: str | Path | None = None,
    out_path: str | Path | None = None,
    title: str | None = None,
) -> Path:
    """Write an HTML gallery of a run and return its path.

    One row per prompt: the prompt's images side by side with their reward values (4 significant
    digits) and the prompt's mean per reward (finite values only). Rows can be sorted by any reward
    in the page; ``window.sortGalleryBy(reward, descending, which)`` does the same from script.

    Without ``compare_dir`` the page goes to ``RUN_DIR/gallery.html``. With it, ``compare_dir`` is
    "before" and ``run_dir`` "after": prompts are matched by text, each row shows both sets of
    images and the per-reward mean difference (after − before), and the page goes to
    ``RUN_DIR/compare.html``. ``out_path`` overrides the location; image links are relative to it.

    In compare mode the images of a prompt are paired **by seed** (by ``sample_index`` for records
    without one): each line of the row holds the before and the after image of one seed side by side,
    so like is compared with like; an image whose seed exists on one side only gets an empty cell on
    the other. When the two sides of a prompt share no seed at all (e.g. reference photos against
    samples), nothing can be paired and the row shows the two sets as two strips instead.
    """
    run_dir = Path(run_dir)
    after = load_metrics(run_dir)
    before = load_metrics(compare_dir) if compare_dir is not None else None
    compare = before is not None
    if out_path is None:
        out_path = run_dir / ("compare.html" if compare else "gallery.html")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise GenrewardError(f"gallery output {out_path} is a folder; give a file name, e.g. {out_path / 'gallery.html'}")
    from genreward.config import check_output_dir

    check_output_dir(out_path.parent, key="gallery output folder")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    html_dir = out_path.parent.resolve()
    run_abs = run_dir.resolve()
    before_abs = Path(compare_dir).resolve() if compare else None

    rows: dict[str, _Row] = {}
    _group(after, "after", rows)
    if compare:
        _group(before, "before", rows)
    ordered = sorted(rows.values(), key=lambda r: r.order)
    for row in ordered:
        row.after.sort(key=_sample_order)
        row.before.sort(key=_sample_order)

    rewards: list[str] = []
    for rec in after + (before or []):
        for name in rec.get("rewards", {}):
            if name not in rewards:
                rewards.append(name)

    if title is None:
        title = f"genreward: {run_dir.name} vs {Path(compare_dir).name}" if compare else f"genreward: {run_dir.name}"

    data_rows = []
    body = []
    for i, row in enumerate(ordered):
        means = {side: [_mean(getattr(row, side), name) for name in rewards] for side in ("after", "before")}
        deltas = [
            a - b if a is not None and b is not None and math.isfinite(a - b) else None
            for a, b in zip(means["after"], means["before"])
        ]
        data_rows.append({"after": means["after"], "before": means["before"], "delta": deltas})

        prompt_cell = (
            f'<td class="prompt"><div class="prompt-text">{html.escape(row.prompt)}</div>'
            f"{_metadata_html(row.metadata)}</td>"
        )
        if compare:
            cells = [_compare_cell(row.before, row.after, before_abs, run_abs, html_dir, rewards)]
            stat_lines = [
                f"<tr><th>{html.escape(n)}</th><td>{_fmt(b)}</td><td>{_fmt(a)}</td><td>{_fmt(d, signed=True)}</td></tr>"
                for n, b, a, d in zip(rewards, means["before"], means["after"], deltas)
            ]
            stats = (
                '<table class="means"><tr><th></th><th>before</th><th>after</th><th>Δ</th></tr>'
                f'{"".join(stat_lines)}</table>'
            )
        else:
            cells = [_images_cell(row.after, run_abs, html_dir, rewards, "no images")]
            stat_lines = [
                f"<tr><th>{html.escape(n)}</th><td>{_fmt(m)}</td></tr>" for n, m in zip(rewards, means["after"])
            ]
            stats = f'<table class="means">{"".join(stat_lines)}</table>'
        body.append(f'<tr data-row="{i}">{prompt_cell}{"".join(cells)}<td class="stats">{stats}</td></tr>')

    keys = [{"reward": n, "which": "after", "label": n + (" (after)" if compare else "")} for n in rewards]
    if compare:
        keys += [{"reward": n, "which": "before", "label": f"{n} (before)"} for n in rewards]
        keys += [{"reward": n, "which": "delta", "label": f"{n} (Δ after − before)"} for n in rewards]
    options = '<option value="-1">prompt order</option>' + "".join(
        f'<option value="{k}">{html.escape(key["label"])}</option>' for k, key in enumerate(keys)
    )
    data = {"rewards": rewards, "compare": compare, "keys": keys, "rows": data_rows}
    header_cells = (
        "<th>prompt</th><th>before | after (paired by seed)</th><th>mean per reward</th>"
        if compare
        else "<th>prompt</th><th>images</th><th>mean per reward</th>"
    )
    sources = html.escape(f"before: {compare_dir} · after: {run_dir}" if compare else str(run_dir))
    n_images = len(after) + len(before or [])

    page = _PAGE.format(
        title=html.escape(title),
        sources=sources,
        summary=f"{len(ordered)} prompts · {n_images} images",
        options=options,
        header_cells=header_cells,
        rows="\n".join(body),
        data=_script_json(data),
        script=_SCRIPT,
        style=_STYLE,
    )
    try:
        out_path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise GenrewardError(f"cannot write gallery {out_path}: {exc.strerror or exc}") from None
    return out_path


def _images_cell(records: list[dict], run_dir: Path, html_dir: Path, rewards: list[str], empty: str) -> str:
    if not records:
        return f'<td class="images empty">{html.escape(empty)}</td>'
    figures = "".join(_figure(r, run_dir, html_dir, rewards) for r in records)
    return f'<td class="images"><div class="strip">{figures}</div></td>'


def _pair_key(rec: dict) -> tuple[str, str] | None:
    """What makes a before and an after image comparable: the seed, else the sample index, else nothing."""
    for field_name in ("seed", "sample_index"):
        value = rec.get(field_name)
        if value is not None and not isinstance(value, bool):
            return field_name, str(value)
    return None


def _keyed(records: list[dict]) -> dict[tuple, dict]:
    """``{key: record}`` in the records' order; repeated keys get an occurrence number, unkeyed records a unique one."""
    out: dict[tuple, dict] = {}
    seen: dict[tuple | None, int] = {}
    for n, rec in enumerate(records):
        base = _pair_key(rec)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out[(base, count) if base is not None else (None, n)] = rec
    return out


def _pairs(before: list[dict], after: list[dict]) -> list[tuple[dict | None, dict | None]] | None:
    """(before, after) records of one prompt aligned by seed, in sample order; None when no key is shared."""
    b, a = _keyed(before), _keyed(after)
    if not before or not after or not any(k[0] is not None and k in b for k in a):
        return None
    keys = list(a) + [k for k in b if k not in a]
    first = {k: i for i, k in enumerate(keys)}

    def order(key: tuple) -> tuple:
        present = [rec for rec in (b.get(key), a.get(key)) if rec is not None]
        return (min(_sample_order(rec) for rec in present), first[key])

    return [(b.get(k), a.get(k)) for k in sorted(keys, key=order)]


def _compare_cell(before: list[dict], after: list[dict], before_dir: Path, after_dir: Path, html_dir: Path,
                  rewards: list[str]) -> str:
    """One cell per prompt: a line per seed, before | after (or the two strips when nothing pairs)."""
    pairs = _pairs(before, after)
    head = "<thead><tr><th>before</th><th>after</th></tr></thead>"
    if pairs is None:
        note = ""
        if before and after:
            note = '<p class="note">no seed in common: the images below are not paired</p>'
        strips = (
            _images_cell(before, before_dir, html_dir, rewards, "not in the before run")
            + _images_cell(after, after_dir, html_dir, rewards, "not in the after run")
        )
        return f'<td class="compare">{note}<table class="pairs unpaired">{head}<tbody><tr>{strips}</tr></tbody></table></td>'
    lines = []
    for b, a in pairs:
        rec = a if a is not None else b
        seed = html.escape(str(rec.get("seed", rec.get("sample_index", ""))))
        sides = []
        for side, r, run_dir in (("before", b, before_dir), ("after", a, after_dir)):
            if r is None:
                sides.append(f'<td class="{side} empty">not in the {side} run</td>')
            else:
                sides.append(f'<td class="{side}">{_figure(r, run_dir, html_dir, rewards)}</td>')
        lines.append(f'<tr class="pair" data-seed="{seed}">{"".join(sides)}</tr>')
    return f'<td class="compare"><table class="pairs">{head}<tbody>{"".join(lines)}</tbody></table></td>'


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1rem; color: #222; }
header p { margin: .2rem 0; color: #555; }
.controls { margin: .8rem 0; }
table#gallery { border-collapse: collapse; width: 100%; }
#gallery > thead th { text-align: left; border-bottom: 2px solid #888; padding: .3rem; }
#gallery > tbody > tr { border-bottom: 1px solid #ccc; vertical-align: top; }
#gallery > tbody > tr > td { padding: .4rem; }
td.prompt { max-width: 18rem; }
.prompt-text { font-weight: 600; margin-bottom: .3rem; }
dl.meta { font-size: .8rem; color: #555; margin: 0; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0 0 .2rem .6rem; }
div.strip { display: flex; flex-wrap: wrap; gap: .5rem; }
td.images.empty { color: #999; font-style: italic; }
table.pairs { border-collapse: collapse; }
table.pairs > thead th { font-size: .75rem; color: #555; text-align: left; padding: 0 .4rem; }
table.pairs > tbody > tr > td { vertical-align: top; padding: .2rem .4rem; min-width: 192px; }
table.pairs > tbody > tr.pair + tr.pair > td { border-top: 1px dashed #ddd; }
td.before.empty, td.after.empty { color: #999; font-style: italic; font-size: .8rem; }
p.note { font-size: .75rem; color: #a60; margin: 0 0 .3rem; }
figure { margin: 0; font-size: .75rem; }
figure img { display: block; width: 192px; height: auto; image-rendering: auto; }
.verdict { color: #333; font-style: italic; }
.missing { width: 192px; height: 96px; background: #eee; color: #a00; font-size: .75rem; }
table.means { font-size: .8rem; border-collapse: collapse; }
table.means th, table.means td { padding: 0 .4rem; text-align: right; }
table.means th:first-child { text-align: left; }
"""

_SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("gallery-data").textContent);
  var tbody = document.querySelector("#gallery > tbody");
  var rows = Array.prototype.slice.call(tbody.children);
  var select = document.getElementById("sort-key");
  var direction = document.getElementById("sort-dir");

  function keyIndex(reward, which) {
    which = which || "after";
    for (var k = 0; k < data.keys.length; k++) {
      if (data.keys[k].reward === reward && data.keys[k].which === which) return k;
    }
    return -1;
  }

  function apply(k, descending) {
    var order = rows.slice();
    if (k >= 0) {
      var key = data.keys[k];
      var r = data.rewards.indexOf(key.reward);
      var value = function (tr) { return data.rows[+tr.getAttribute("data-row")][key.which][r]; };
      order.sort(function (a, b) {
        var va = value(a), vb = value(b);
        if (va === null && vb === null) return (+a.getAttribute("data-row")) - (+b.getAttribute("data-row"));
        if (va === null) return 1;
        if (vb === null) return -1;
        if (va !== vb) return descending ? vb - va : va - vb;
        return (+a.getAttribute("data-row")) - (+b.getAttribute("data-row"));
      });
    }
    order.forEach(function (tr) { tbody.appendChild(tr); });
    select.value = String(k);
    direction.value = descending ? "desc" : "asc";
    return order.map(function (tr) { return +tr.getAttribute("data-row"); });
  }

  // Sort rows by a reward's per-prompt mean; which is "after" (the run), "before" or "delta" when
  // comparing. A null reward restores prompt order. Returns the new order as row indices.
  window.sortGalleryBy = function (reward, descending, which) {
    if (reward === null || reward === undefined) return apply(-1, !!descending);
    var k = keyIndex(reward, which);
    if (k < 0) {
      throw new Error("sortGalleryBy: unknown reward/which " + JSON.stringify([reward, which || "after"]));
    }
    return apply(k, !!descending);
  };

  function onChange() { apply(+select.value, direction.value === "desc"); }
  select.addEventListener("change", onChange);
  direction.addEventListener("change", onChange);
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p>{sources}</p>
<p>{summary}</p>
</header>
<div class="controls">
<label>sort by <select id="sort-key">{options}</select></label>
<select id="sort-dir"><option value="desc">descending</option><option value="asc">ascending</option></select>
</div>
<table id="gallery">
<thead><tr>{header_cells}</tr></thead>
<tbody>
{rows}
</tbody>
</table>
<script type="application/json" id="gallery-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""
