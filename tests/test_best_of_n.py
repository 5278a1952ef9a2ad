"""Best-of-N references (docs/algorithms/rewarddance.md §5, §8 item 7) on tiny:sd and the tiny Qwen2-VL judge, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genreward.best_of_n import BestOfNConfig, load_references, rank_by_pairwise_wins, run_best_of_n
from genreward.cli import main
from genreward.config import config_from_dict
from genreward.errors import GenrewardError
from genreward.images import load_images
from genreward.rewards import build

BASE = {
    "model": {"pipeline": "tiny:sd", "device": "cpu"},
    "sample": {"num_steps": 2, "batch_size": 16},
    "prompts": {"path": "animals", "limit": 2},
    "n": 3,
    "top_k": 2,
    "seed": 7,
}
JUDGE = {"name": "vlm_judge", "options": {"model": "tiny:qwen2-vl", "mode": "pairwise", "normalization": "yes_no", "device": "cpu"}}


def _run(tmp_path: Path, tiny_pipe, name: str, **overrides) -> tuple[BestOfNConfig, Path]:
    config = config_from_dict(dict(BASE, output_dir=str(tmp_path / name), **overrides), BestOfNConfig)
    run_best_of_n(config, pipe=tiny_pipe, progress=False)
    return config, tmp_path / name


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_best_of_n_score_ranking_picks_max_and_references_load(tmp_path, tiny_pipe):
    _, out = _run(tmp_path, tiny_pipe, "score")
    candidates = _jsonl(out / "candidates" / "metrics.jsonl")
    refs = _jsonl(out / "references.jsonl")
    assert [r["prompt_index"] for r in refs] == [0, 1]
    loaded = load_references(out / "references.jsonl")
    assert set(loaded) == {r["prompt"] for r in refs}
    for line in refs:
        cands = sorted((c for c in candidates if c["prompt_index"] == line["prompt_index"]), key=lambda c: c["sample_index"])
        assert len(cands) == 3
        scores = [c["rewards"]["jpeg_compressibility"] for c in cands]
        expected = sorted(range(3), key=lambda j: (-scores[j], j))[:2]
        assert line["candidates"] == expected
        assert line["scores"] == pytest.approx([scores[j] for j in expected])
        assert line["scores"][0] == pytest.approx(max(scores))
        assert line["images"] == [f"references/p{line['prompt_index']:04d}_k{k}.png" for k in range(2)]
        for k, j in enumerate(expected):  # byte copies of the chosen candidates
            assert (out / line["images"][k]).read_bytes() == (out / "candidates" / cands[j]["image"]).read_bytes()
        tensor = loaded[line["prompt"]]
        assert tensor.shape == (2, 3, 32, 32) and tensor.dtype == torch.float32
        assert torch.equal(tensor, load_images([out / "candidates" / cands[j]["image"] for j in expected]))
    assert torch.equal(load_references(out)[refs[0]["prompt"]], loaded[refs[0]["prompt"]])  # folder form
    chosen = _jsonl(out / "metrics.jsonl")
    assert [(c["prompt_index"], c["sample_index"]) for c in chosen] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    html = (out / "gallery.html").read_text()
    assert html.count("<img") == 4 and "references/p0000_k0.png" in html
    assert (out / "candidates" / "gallery.html").read_text().count("<img") == 6
    with pytest.raises(GenrewardError, match="references file not found"):
        load_references(tmp_path / "nowhere.jsonl")


def test_best_of_n_pairwise_wins_match_judge_probabilities(tmp_path, tiny_pipe):
    _, out = _run(tmp_path, tiny_pipe, "pairwise", ranking="pairwise_wins", reward=[JUDGE], top_k=1,
                  prompts={"path": "animals", "limit": 1})
    cands = sorted(_jsonl(out / "candidates" / "metrics.jsonl"), key=lambda c: c["sample_index"])
    images = load_images([out / "candidates" / c["image"] for c in cands])
    judge = build("vlm_judge", **JUDGE["options"])
    prompt = cands[0]["prompt"]
    p = torch.full((3, 3), float("nan"))
    for i in range(3):  # one pair per call: an independent check of the batched pair matrix
        for j in range(3):
            if i != j:
                p[i, j] = judge(images[j : j + 1], [prompt], reference_images=images[i : i + 1]).scores[0]
    rows = _jsonl(out / "pairwise.jsonl")[0]["p"]  # diagonal (no self-comparison) is null
    logged = torch.tensor([[float("nan") if v is None else v for v in row] for row in rows])
    off = ~torch.eye(3, dtype=torch.bool)
    assert torch.allclose(logged[off], p[off], atol=1e-5)
    wins = [0.0] * 3
    for i in range(3):
        for j in range(3):
            if i != j:
                winner = j if p[i, j] > 0.5 else i
                wins[winner] += 1.0
    mean_p = [float(p[[i for i in range(3) if i != j], j].mean()) for j in range(3)]
    assert [c["rewards"]["wins"] for c in cands] == wins
    assert [c["rewards"]["mean_p"] for c in cands] == pytest.approx(mean_p, abs=1e-5)
    best = sorted(range(3), key=lambda j: (-wins[j], -mean_p[j], j))[0]
    line = _jsonl(out / "references.jsonl")[0]
    assert line["candidates"] == [best] and line["scores"] == [wins[best]] and line["ranking"] == "pairwise_wins"
    assert load_references(out)[prompt].shape == (1, 3, 32, 32)
    assert (out / "gallery.html").read_text().count("<img") == 1


def test_rank_by_pairwise_wins_transitive_mock_returns_true_best():
    """rewarddance.md §8 item 7: a transitive comparator P(j ≻ i) = σ(q_j − q_i) recovers the true best and top-2."""
    q = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.0, 0.9])
    probs = torch.sigmoid(q[None, :] - q[:, None])
    order, wins, _ = rank_by_pairwise_wins(probs)
    assert order == torch.argsort(q, descending=True).tolist()
    assert order[:2] == [1, 3] and wins[1] == 2 * 5
    # Non-transitive cycle: equal wins, so the mean P as candidate decides.
    cycle = torch.tensor([[0.0, 0.9, 0.2], [0.1, 0.0, 0.7], [0.8, 0.4, 0.0]])
    order, wins, mean_p = rank_by_pairwise_wins(cycle)
    assert wins == [2.0, 2.0, 2.0]
    assert order == sorted(range(3), key=lambda j: -mean_p[j])


def test_best_of_n_user_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "bon.yaml"
    cfg.write_text(json.dumps(dict(BASE, output_dir=str(tmp_path / "err"))))
    cases = [
        (["top_k=4"], "'top_k' (4) must be <= 'n' (3)"),
        (["n=1", "top_k=1", "ranking=pairwise_wins"], "needs n >= 2"),
        (["ranking=pairwise_wins"], "exactly one reward {name: vlm_judge"),
        (["ranking=borda"], "must be one of 'score', 'pairwise_wins'"),
    ]
    for overrides, message in cases:
        assert main(["best-of-n", str(cfg), *overrides]) == 2
        err = capsys.readouterr().err
        assert err.startswith("genreward: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "err").exists()
