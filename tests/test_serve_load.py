"""``genreward serve-reward`` under load: 8 concurrent clients, none lost, scores exact, memory bounded.

The server is a real process (``python -m genreward serve-reward --replicas 2`` on 127.0.0.1) serving
jpeg_compressibility, whose scores survive the PNG round trip exactly, so every answer must equal the
in-process reward bit for bit. Its peak RSS (VmHWM from /proc) is read before and after the load.
Replica load balancing and the ``--devices`` checks run in process.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from genreward.errors import GenrewardError
from genreward.rewards import build
from genreward.rewards.base import RewardOutput
from genreward.rewards.remote import RemoteReward
from genreward.serve import make_server, parse_devices

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 8
REQUESTS_PER_CLIENT = 25
IMAGES_PER_REQUEST = 4
RSS_GROWTH_MB = 200


def uint8_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255.0


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def start_server(tmp: Path, *flags: str) -> tuple[subprocess.Popen, str, list[str]]:
    config = tmp / "serve.yaml"
    config.write_text(f"output_dir: {tmp / 'out'}\nreward:\n  - name: jpeg_compressibility\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "genreward", "serve-reward", str(config), "--port", "0", *flags]
    proc = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    log: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            log.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            match = re.search(r"http://127\.0\.0\.1:\d+", lines.get(timeout=1))
        except queue.Empty:
            continue
        if match:
            return proc, match.group(0), log
    proc.kill()
    raise AssertionError(f"server did not print its address: {log}")


def test_eight_clients_none_lost_scores_exact_memory_bounded(tmp_path):
    proc, url, log = start_server(tmp_path, "--replicas", "2", "--max-batch", "16", "--batch-wait-ms", "2")
    try:
        assert "2 replicas" in "".join(log)
        jobs = {
            (c, r): (uint8_images(IMAGES_PER_REQUEST, seed=1000 * c + r), [f"client {c} request {r} image {k}" for k in range(IMAGES_PER_REQUEST)])
            for c in range(CLIENTS)
            for r in range(REQUESTS_PER_CLIENT)
        }
        local = build("jpeg_compressibility")
        with torch.no_grad():
            expected = {key: local(images, prompts) for key, (images, prompts) in jobs.items()}
        warm = RemoteReward(url=url, name="r", timeout=30)
        assert torch.equal(warm(*jobs[0, 0]).scores, expected[0, 0].scores)
        before = peak_rss_mb(proc.pid)

        answers: dict[tuple[int, int], Any] = {}
        latencies: list[float] = []
        barrier = threading.Barrier(CLIENTS)

        def client(c: int) -> None:
            remote = RemoteReward(url=url, name="r", timeout=30, retries=0, batch_size=IMAGES_PER_REQUEST)
            barrier.wait(30)
            for r in range(REQUESTS_PER_CLIENT):
                start = time.perf_counter()
                try:
                    answers[c, r] = remote(*jobs[c, r])
                except Exception as exc:  # surfaced by the assertions below
                    answers[c, r] = exc
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        wall = time.perf_counter() - start

        failures = {key: a for key, a in answers.items() if isinstance(a, Exception)}
        assert not failures, f"{len(failures)} requests failed, e.g. {next(iter(failures.values()))}"
        assert len(answers) == CLIENTS * REQUESTS_PER_CLIENT  # none lost
        for key, out in answers.items():
            assert torch.equal(out.scores, expected[key].scores), key
            assert torch.equal(out.details["jpeg_kb"], expected[key].details["jpeg_kb"]), key
        after = peak_rss_mb(proc.pid)
        assert after - before < RSS_GROWTH_MB, f"peak RSS grew from {before:.0f} MB to {after:.0f} MB"
        latencies.sort()
        p50, p99 = latencies[len(latencies) // 2], latencies[int(0.99 * len(latencies))]
        print(f"\n{len(answers)} requests in {wall:.2f}s; p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms; peak RSS {before:.0f} → {after:.0f} MB")
        assert "Traceback" not in "".join(log)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


class Replica:
    """Sleeps a little per call and records which prompts it scored."""

    differentiable = False

    def __init__(self, name: str):
        self.name = "replicated"
        self.label = name
        self.prompts: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, images: torch.Tensor, prompts: list[str], **context: Any) -> RewardOutput:
        time.sleep(0.2)
        with self._lock:
            self.prompts.extend(prompts)
        return RewardOutput(scores=images.mean(dim=(1, 2, 3)), details={"first": images[:, 0].mean(dim=(1, 2))})


def test_replicas_share_the_load_and_results_stay_in_order():
    replicas = [Replica("a"), Replica("b")]
    server = make_server(replicas, "127.0.0.1", 0, max_batch=4, batch_wait_ms=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        jobs = [(uint8_images(3, seed=i), [f"r{i}-{k}" for k in range(3)]) for i in range(12)]
        results: dict[int, Any] = {}
        barrier = threading.Barrier(len(jobs))

        def client(i: int) -> None:
            remote = RemoteReward(url=server.url, name="r", timeout=30, retries=0)
            barrier.wait(30)
            results[i] = remote(*jobs[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == list(range(len(jobs)))
        for i, (images, _) in enumerate(jobs):
            assert torch.allclose(results[i].scores, images.mean(dim=(1, 2, 3)), atol=0, rtol=0)
            assert torch.equal(results[i].details["first"], images[:, 0].mean(dim=(1, 2)))
        a, b = (set(r.prompts) for r in replicas)
        assert a and b, "one replica did all the work"
        assert not a & b and len(a | b) == 36
    finally:
        server.shutdown()
        server.close()
        thread.join(10)


def test_devices_flag_is_checked_before_loading(tmp_path, capsys):
    from genreward.cli import main

    with pytest.raises(GenrewardError, match="CUDA device indices"):
        parse_devices("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(GenrewardError, match="no CUDA device 0"):
            parse_devices("0")
    assert parse_devices(None) == []
    config = tmp_path / "serve.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nreward:\n  - name: jpeg_compressibility\n")
    assert main(["serve-reward", str(config), "--port", "0", "--devices", "99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genreward: error: --devices 99: no CUDA device 99"), err
    with pytest.raises(SystemExit):  # argparse: --devices and --replicas are exclusive
        main(["serve-reward", str(config), "--devices", "0", "--replicas", "2"])
    assert main(["serve-reward", str(config), "--port", "0", "--max-queue", "0"]) == 2
    assert "--max-queue must be >= 1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA device")
def test_one_replica_per_listed_gpu():
    from genreward.serve import ServeConfig, build_replicas
    from genreward.rewards import RewardSpec

    config = ServeConfig(output_dir="unused", reward=[RewardSpec(name="clip_score", options={"model": "tiny:clip", "device": "cuda"})])
    rewards = build_replicas(config, [0, 0])
    assert len(rewards) == 2 and rewards[0] is not rewards[1]
    server = make_server(rewards, "127.0.0.1", 0, devices=[0, 0])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        images = uint8_images(4)
        out = RemoteReward(url=server.url, name="r", timeout=60)(images, ["a cat"] * 4)
        with torch.no_grad():
            local = rewards[0](images, ["a cat"] * 4).scores.cpu()
        torch.testing.assert_close(out.scores, local, atol=1e-5, rtol=0)
    finally:
        server.shutdown()
        server.close()
        thread.join(10)
