"""Stateful rewards hold identical state on every rank: ``meanstd`` folds in every rank's batch via the
``gather`` / ``gather_prompts`` call-context keys, and every wrapper forwards the keys (and tolerates them)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

from genreward.errors import GenrewardError
from genreward.rewards import RewardOutput, WeightedSum, build


class FixedReward:
    """Scores from the call context (``raw=[B]``); records the context keys it saw."""

    differentiable = True

    def __init__(self) -> None:
        self.name = "fixed"
        self.seen: list[set[str]] = []

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        self.seen.append(set(context))
        return RewardOutput(scores=torch.as_tensor(context["raw"], dtype=torch.float32))


def _images(b: int) -> torch.Tensor:
    return torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(b))


# two ranks' batches (rank order), with a prompt on both ranks and one on rank 1 only
LOCAL = (["a", "b", "a"], torch.tensor([1.0, 5.0, 2.0]))
OTHER = (["c", "a", "b"], torch.tensor([-4.0, 9.0, 6.5]))


def _fake_gather(other: torch.Tensor):
    """What accelerator.gather returns on rank 0 of 2: rank 0's tensor then rank 1's."""
    return lambda t: torch.cat([t, other.to(t)])


def _fake_gather_prompts(other: list[str]):
    return lambda ps: list(ps) + list(other)


@pytest.mark.parametrize("per_prompt", [True, False])
def test_meanstd_gather_updates_stats_with_all_ranks_but_normalises_local_batch(per_prompt: bool) -> None:
    synced = build("meanstd", reward=FixedReward(), per_prompt=per_prompt)
    full = build("meanstd", reward=FixedReward(), per_prompt=per_prompt)
    for step in range(3):  # several updates: the moments must agree after each one
        shift = torch.tensor(float(step))
        ctx = {"gather": _fake_gather(OTHER[1] + shift), "gather_prompts": _fake_gather_prompts(OTHER[0])}
        out = synced(_images(3), LOCAL[0], raw=LOCAL[1] + shift, **ctx)
        ref = full(_images(6), LOCAL[0] + OTHER[0], raw=torch.cat([LOCAL[1], OTHER[1]]) + shift)
        assert synced.state_dict() == full.state_dict()  # exact: the same Welford updates in the same order
        assert out.scores.shape == (3,)  # only the local batch is normalised and returned
        torch.testing.assert_close(out.scores, ref.scores[:3], atol=0, rtol=0)
        torch.testing.assert_close(out.details["raw"], LOCAL[1] + shift)


def test_meanstd_without_gather_is_unchanged_and_update_false_does_not_gather() -> None:
    local = build("meanstd", reward=FixedReward())
    plain = build("meanstd", reward=FixedReward())
    local(_images(3), LOCAL[0], raw=LOCAL[1])
    plain(_images(3), LOCAL[0], raw=LOCAL[1])
    assert local.get_stats()["a"]["count"] == 2 and set(local.get_stats()) == {"a", "b"}

    def forbidden(_):
        raise AssertionError("evaluation (update_stats=False) must not call the collective")

    frozen = local(_images(3), LOCAL[0], raw=LOCAL[1], update_stats=False, gather=forbidden, gather_prompts=forbidden)
    assert local.state_dict() == plain.state_dict()
    torch.testing.assert_close(frozen.scores, plain(_images(3), LOCAL[0], raw=LOCAL[1], update_stats=False).scores)


def test_meanstd_gather_needs_prompts_per_prompt_and_consistent_lengths() -> None:
    reward = build("meanstd", reward=FixedReward())
    with pytest.raises(GenrewardError, match="gather_prompts"):
        reward(_images(3), LOCAL[0], raw=LOCAL[1], gather=_fake_gather(OTHER[1]))
    with pytest.raises(GenrewardError, match="no gather"):
        reward(_images(3), LOCAL[0], raw=LOCAL[1], gather_prompts=_fake_gather_prompts(OTHER[0]))
    with pytest.raises(GenrewardError, match="scores but gather_prompts"):
        reward(_images(3), LOCAL[0], raw=LOCAL[1], gather=_fake_gather(OTHER[1]), gather_prompts=_fake_gather_prompts(["c"]))
    glob = build("meanstd", reward=FixedReward(), per_prompt=False)
    glob(_images(3), LOCAL[0], raw=LOCAL[1], gather=_fake_gather(OTHER[1]))  # global stats need no prompts
    assert glob.get_stats()[""]["count"] == 6


def test_wrappers_forward_the_context_keys_to_a_nested_meanstd() -> None:
    """WeightedSum, clamp, par and meanstd itself pass update_stats/gather/gather_prompts down unchanged."""
    keys = {"update_stats", "gather", "gather_prompts"}
    for wrap in (
        lambda r: WeightedSum([r], [2.0]),
        lambda r: build("clamp", reward=r, high=100.0),
        lambda r: build("par", reward=r, references=1),
        lambda r: build("meanstd", reward=r),
    ):
        inner = build("meanstd", reward=FixedReward())
        full = build("meanstd", reward=FixedReward())
        outer = wrap(inner)
        ctx = {"gather": _fake_gather(OTHER[1]), "gather_prompts": _fake_gather_prompts(OTHER[0]), "update_stats": True}
        outer(_images(3), LOCAL[0], raw=LOCAL[1], reference_rewards=torch.zeros(3, 1), **ctx)
        full(_images(6), LOCAL[0] + OTHER[0], raw=torch.cat([LOCAL[1], OTHER[1]]))
        assert inner.state_dict() == full.state_dict(), type(outer).__name__
        assert keys <= inner.inner.seen[-1]  # and the leaf reward tolerated them
        before = inner.state_dict()
        outer(_images(3), LOCAL[0], raw=LOCAL[1], reference_rewards=torch.zeros(3, 1), update_stats=False)
        assert inner.state_dict() == before, type(outer).__name__


def test_builtin_leaf_rewards_tolerate_the_context_keys() -> None:
    """Rewards ignore context keys they do not know (here a real image reward)."""
    reward = build("jpeg_compressibility")
    out = reward(_images(2), ["x", "y"], update_stats=False, gather=lambda t: t, gather_prompts=lambda p: p)
    assert out.scores.shape == (2,)


# ------------------------------------------------------------------------------------- 2 real processes

_WORKER = textwrap.dedent(
    '''
    import json, os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from genreward.rewards import RewardOutput, WeightedSum, build


    class Fixed:
        differentiable = False
        name = "fixed"

        def __call__(self, images, prompts, **context):
            return RewardOutput(scores=torch.as_tensor(context["raw"], dtype=torch.float32))


    def batches(rank, step):
        """Each rank gets different prompts and scores (deterministic, so the parent can recompute them)."""
        g = torch.Generator().manual_seed(100 * rank + step)
        prompts = [["a", "b", "a", "c"], ["b", "d", "a", "b"]][rank]
        return prompts, (10 * rank + 3 * torch.randn(4, generator=g)).tolist()


    def worker(rank, world, port, out_dir):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

        def gather(t):
            t = t.detach().contiguous()
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t)
            return torch.cat(parts)

        def gather_prompts(prompts):
            parts = [None] * world
            dist.all_gather_object(parts, list(prompts))
            return [p for part in parts for p in part]

        per_prompt = build("meanstd", reward=Fixed())
        glob = build("meanstd", reward=Fixed(), per_prompt=False)
        summed = WeightedSum([per_prompt, glob], [1.0, 1.0])
        images = torch.zeros(4, 3, 8, 8)
        for step in range(3):
            prompts, raw = batches(rank, step)
            out = summed(images, prompts, raw=raw, gather=gather, gather_prompts=gather_prompts)
            assert out.scores.shape == (4,)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(summed.state_dict()))
        dist.barrier()
        dist.destroy_process_group()


    if __name__ == "__main__":
        from pathlib import Path

        port, out_dir = int(sys.argv[1]), Path(sys.argv[2])
        mp.spawn(worker, args=(2, port, out_dir), nprocs=2, join=True)
    '''
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_end_with_identical_meanstd_state(tmp_path: Path) -> None:
    """2 processes (gloo on 127.0.0.1), each with its own prompts and scores, ``torch.distributed.all_gather``
    as ``gather``: both ranks end with the same ``state_dict()``, equal to one reward fed both ranks' batches."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert states[0] == states[1]
    assert states[0]["0"]["stats"]["d"][0] == 3  # a prompt only rank 1 saw is in rank 0's statistics

    sys.path.insert(0, str(tmp_path))
    try:
        import worker as w  # the same batches, fed to one process in rank order
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("worker", None)
    full = WeightedSum([build("meanstd", reward=w.Fixed()), build("meanstd", reward=w.Fixed(), per_prompt=False)], [1.0, 1.0])
    for step in range(3):
        (p0, r0), (p1, r1) = w.batches(0, step), w.batches(1, step)
        full(torch.zeros(8, 3, 8, 8), p0 + p1, raw=r0 + r1)
    assert json.loads(json.dumps(full.state_dict())) == states[0]
