"""``genreward serve-reward`` and the ``remote`` reward: loopback only, every wait bounded.

Images are made from uint8 values, so [0,1] floats survive the PNG round trip exactly and remote
scores must equal in-process scores (JPEG sizes exactly, CLIP up to float noise from batching).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from genreward.errors import GenrewardError
from genreward.rewards import RewardSpec, build
from genreward.rewards.remote import RemoteReward, encode_png
from genreward.serve import ServeConfig, build_served_reward, check_host, make_server

ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = "jpeg+clip"
MAX_BATCH = 16


def uint8_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images whose values are exact multiples of 1/255 (lossless through PNG)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255.0


def served_config(tmp: Path) -> ServeConfig:
    specs = [RewardSpec(name="jpeg_compressibility"), RewardSpec(name="clip_score", options={"model": "tiny:clip"}, weight=2.0)]
    return ServeConfig(output_dir=str(tmp), reward=specs, name=SERVED_NAME)


class Recording:
    """Wraps the served reward: records each call's batch and fails on purpose for the prompt __raise__."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.name = inner.name
        self.differentiable = inner.differentiable
        self.calls: list[tuple[tuple[int, ...], list[str], Any]] = []

    def __call__(self, images: torch.Tensor, prompts: list[str], **context: Any):
        self.calls.append((tuple(images.shape), list(prompts), context.get("metadata")))
        if "__raise__" in prompts:
            raise RuntimeError("reward exploded on purpose")
        return self.inner(images, prompts, **context)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server on 127.0.0.1:<free port> in a thread of this process; yields (server, recording)."""
    config = served_config(tmp_path_factory.mktemp("serve"))
    recording = Recording(build_served_reward(config))
    server = make_server(recording, "127.0.0.1", 0, max_batch=MAX_BATCH, batch_wait_ms=30, max_body_mb=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, recording
    server.shutdown()
    server.close()
    thread.join(10)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same rewards in this process (a separate instance)."""
    return build_served_reward(served_config(tmp_path_factory.mktemp("ref")))


def post(server, body: bytes | str, path: str = "/score", method: str = "POST") -> tuple[int, dict]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body.encode() if isinstance(body, str) else body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def score_body(images: torch.Tensor, prompts: list[str], **extra: Any) -> str:
    return json.dumps({"prompts": prompts, "images": encode_png(images), **extra})


def assert_matches(remote_out, local_out) -> None:
    assert remote_out.scores.dtype == torch.float32
    assert set(remote_out.details) == set(local_out.details)
    assert torch.equal(remote_out.details["jpeg_compressibility"], local_out.details["jpeg_compressibility"])
    assert torch.equal(remote_out.details["jpeg_compressibility/jpeg_kb"], local_out.details["jpeg_compressibility/jpeg_kb"])
    torch.testing.assert_close(remote_out.details["clip_score"], local_out.details["clip_score"], atol=1e-5, rtol=0)
    torch.testing.assert_close(remote_out.scores, local_out.scores.float(), atol=1e-5, rtol=0)


def assert_still_serving(server) -> None:
    status, answer = post(server, score_body(uint8_images(2), ["a cat", "a dog"]))
    assert status == 200, answer
    assert len(answer["scores"]) == 2


# ------------------------------------------------------------------------------------------ happy path


def test_health_reports_name_and_differentiable(served):
    server, _ = served
    status, answer = post(server, b"", path="/health", method="GET")
    assert status == 200
    assert answer == {"status": "ok", "reward": SERVED_NAME, "differentiable": False}


def test_remote_scores_match_in_process(served, reference):
    server, recording = served
    remote = build("remote", url=server.url, batch_size=4, timeout=10)
    assert remote.differentiable is False
    assert remote.name == SERVED_NAME  # fetched lazily from /health
    images = uint8_images(10, size=64, seed=1)
    prompts = [f"a photo of animal {i}" for i in range(10)]
    metadata = [{"index": i} for i in range(10)]
    recording.calls.clear()
    out = remote(images, prompts, metadata=metadata)
    with torch.no_grad():
        local = reference(images, prompts)
    assert out.scores.shape == (10,)
    assert_matches(out, local)
    assert [m for _, _, meta in recording.calls for m in meta] == metadata  # metadata reaches the reward, in order


def test_concurrent_requests_are_batched_and_split_back(served, reference):
    server, recording = served
    jobs = [(uint8_images(3, size=32 if i % 2 else 48, seed=10 + i), [f"prompt {i} {k}" for k in range(3)]) for i in range(6)]
    barrier = threading.Barrier(len(jobs))
    results: dict[int, Any] = {}

    def client(i: int) -> None:
        remote = RemoteReward(url=server.url, name="r", timeout=10)
        barrier.wait(10)
        try:
            results[i] = remote(*jobs[i])
        except Exception as exc:  # surfaced by the assertion below
            results[i] = exc

    recording.calls.clear()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, (images, prompts) in enumerate(jobs):
        assert not isinstance(results[i], Exception), results[i]
        with torch.no_grad():
            assert_matches(results[i], reference(images, prompts))
    sizes = [shape[0] for shape, _, _ in recording.calls]
    assert sum(sizes) == 18
    assert max(sizes) > 3, f"no two requests were batched together: {recording.calls}"
    assert {shape[-1] for shape, _, _ in recording.calls} == {32, 48}


def test_request_over_max_batch_is_chunked(served, reference):
    server, recording = served
    images, prompts = uint8_images(20, seed=3), [f"p{i}" for i in range(20)]
    recording.calls.clear()
    out = RemoteReward(url=server.url, name="r", batch_size=64, timeout=10)(images, prompts)
    assert all(shape[0] <= MAX_BATCH for shape, _, _ in recording.calls)
    with torch.no_grad():
        assert_matches(out, reference(images, prompts))


def test_label_names_the_remote_reward_without_asking_the_server():
    from genreward.rewards import build_from_spec

    reward = build_from_spec(RewardSpec(name="remote", options={"url": "http://127.0.0.1:9"}, label="judge"))
    assert reward.name == "judge" and reward.server_info is None
    with pytest.raises(GenrewardError, match="url must look like"):
        build("remote", url="127.0.0.1:8765")
    with pytest.raises(GenrewardError, match="retries"):
        build("remote", url="http://127.0.0.1:8765", retries=-1)


def test_eval_end_to_end_with_remote_reward(served, tmp_path):
    from genreward.cli import main

    server, _ = served
    config = yaml.safe_load((ROOT / "configs" / "eval_tiny.yaml").read_text())
    config["output_dir"] = str(tmp_path / "run")
    config["model"]["device"] = "cpu"
    config["sample"].update(num_steps=2, batch_size=2)
    config["eval"]["prompts"].update(path="animals", limit=2)
    config["eval"].update(images_per_prompt=1, gallery=False, rewards=[{"name": "remote", "options": {"url": server.url, "timeout": 30}}])
    path = tmp_path / "eval_remote.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["eval", str(path)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert SERVED_NAME in json.dumps(summary)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(isinstance(r["rewards"][SERVED_NAME], float) for r in records)


# ------------------------------------------------------------------------------------------ errors


def _png_b64(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _jpeg_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def _truncated_png_b64() -> str:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()[:200]).decode()


BAD_REQUESTS = {
    "malformed_json": ('{"prompts": [', 400, "malformed JSON"),
    "not_an_object": ("[1, 2]", 400, "JSON object"),
    "missing_images": ('{"prompts": ["a"]}', 400, "missing key 'images'"),
    "missing_prompts": (json.dumps({"images": [_png_b64((8, 8))]}), 400, "missing key 'prompts'"),
    "unknown_key": (json.dumps({"prompts": ["a"], "images": [_png_b64((8, 8))], "imgs": []}), 400, "unknown key"),
    "length_mismatch": (json.dumps({"prompts": ["a", "b"], "images": [_png_b64((8, 8))]}), 400, "2 prompts for 1 images"),
    "empty": (json.dumps({"prompts": [], "images": []}), 400, "empty"),
    "prompt_not_string": (json.dumps({"prompts": [3], "images": [_png_b64((8, 8))]}), 400, "prompts[0] must be a string"),
    "not_base64": (json.dumps({"prompts": ["a"], "images": ["!!not base64!!"]}), 400, "not valid base64"),
    "jpeg_not_png": (json.dumps({"prompts": ["a"], "images": [_jpeg_b64()]}), 400, "not a PNG"),
    "truncated_png": (json.dumps({"prompts": ["a"], "images": [_truncated_png_b64()]}), 400, "cannot be decoded"),
    "mixed_sizes": (
        json.dumps({"prompts": ["a", "b"], "images": [_png_b64((8, 8)), _png_b64((16, 8))]}),
        400,
        "must share a size",
    ),
    "metadata_length": (json.dumps({"prompts": ["a"], "images": [_png_b64((8, 8))], "metadata": [1, 2]}), 400, "metadata"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_answers_4xx_and_server_keeps_serving(served, case):
    server, _ = served
    body, status, needle = BAD_REQUESTS[case]
    got, answer = post(server, body)
    assert got == status
    assert needle in answer["error"]
    assert "\n" not in answer["error"]
    assert_still_serving(server)


def test_unknown_endpoint_and_wrong_method(served):
    server, _ = served
    assert post(server, b"", path="/nope", method="GET")[0] == 404
    assert post(server, b"", path="/score", method="GET")[0] == 405
    assert_still_serving(server)


def test_remote_client_does_not_retry_4xx(served):
    server, _ = served
    remote = RemoteReward(url=server.url + "/wrong-prefix", name="r", retries=3, backoff=5.0, timeout=10)
    start = time.monotonic()
    with pytest.raises(GenrewardError, match="HTTP 404.*no endpoint /wrong-prefix/score"):
        remote(uint8_images(2), ["a", "b"])
    assert time.monotonic() - start < 4.0  # answered at once, not after a 5 s backoff


def test_oversized_body_is_413_without_reading_it(served):
    server, _ = served
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.putrequest("POST", "/score")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(50 * 1024 * 1024))
        conn.endheaders()
        conn.send(b"x" * 65536)  # far less than announced: the answer must not wait for the rest
        response = conn.getresponse()
        assert response.status == 413
        assert "over the limit" in json.loads(response.read())["error"]
    finally:
        conn.close()
    assert_still_serving(server)


def test_remote_client_reports_413_at_once(served):
    server, _ = served
    remote = RemoteReward(url=server.url, name="r", batch_size=200, retries=3, backoff=5.0, timeout=10)
    start = time.monotonic()
    with pytest.raises(GenrewardError, match="HTTP 413") as info:
        remote(uint8_images(100, size=64), ["a"] * 100)  # about 1.6 MB of base64 PNG > 1 MB limit
    assert time.monotonic() - start < 4.0  # not retried with a 5 s backoff
    assert server.url in str(info.value)
    assert_still_serving(server)


def test_reward_error_is_500_and_server_keeps_serving(served):
    server, recording = served
    status, answer = post(server, score_body(uint8_images(1), ["__raise__"]))
    assert status == 500
    assert "reward exploded on purpose" in answer["error"]
    assert_still_serving(server)
    recording.calls.clear()
    remote = RemoteReward(url=server.url, name="r", retries=1, backoff=0.01, timeout=10)
    with pytest.raises(GenrewardError, match="HTTP 500.*reward exploded on purpose") as info:
        remote(uint8_images(1), ["__raise__"])
    assert "2 attempts" in str(info.value)  # 5xx is retried
    assert sum("__raise__" in prompts for _, prompts, _ in recording.calls) == 2


def test_failing_request_does_not_fail_its_batch_neighbours(served, reference):
    server, _ = served
    barrier = threading.Barrier(2)
    answers: dict[str, tuple[int, dict]] = {}
    good_images = uint8_images(2, seed=7)

    def send(kind: str, body: str) -> None:
        barrier.wait(10)
        answers[kind] = post(server, body)

    threads = [
        threading.Thread(target=send, args=("bad", score_body(uint8_images(1, seed=8), ["__raise__"]))),
        threading.Thread(target=send, args=("good", score_body(good_images, ["a", "b"]))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers["bad"][0] == 500
    assert answers["good"][0] == 200
    with torch.no_grad():
        expected = reference(good_images, ["a", "b"]).details["jpeg_compressibility"].tolist()
    assert answers["good"][1]["details"]["jpeg_compressibility"] == expected


def test_non_loopback_host_is_refused_without_allow_remote(tmp_path, capsys):
    from genreward.cli import main

    for host in ("0.0.0.0", "192.168.1.5", "example.com", "::"):
        with pytest.raises(GenrewardError, match="--allow-remote"):
            check_host(host, allow_remote=False)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_host(host, allow_remote=False)
    check_host("0.0.0.0", allow_remote=True)
    config = tmp_path / "serve.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nreward:\n  - name: jpeg_compressibility\n")
    assert main(["serve-reward", str(config), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genreward: error: refusing to serve on non-loopback host")


def test_unresponsive_server_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections into the backlog but never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        remote = RemoteReward(url=url, name="r", timeout=0.5, retries=1, backoff=0.05)
        start = time.monotonic()
        with pytest.raises(GenrewardError, match=r"timed out after 0\.5s") as info:
            remote(uint8_images(1), ["a"])
        assert time.monotonic() - start < 0.5 * 2 + 0.05 + 3.0
        assert url in str(info.value)
    finally:
        listener.close()


# ------------------------------------------------------------------------------------------ CLI server


def start_cli_server(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str, "queue.Queue[str]"]:
    """``python -m genreward serve-reward`` on port 0; returns the process, its URL and its stdout lines."""
    config = tmp_path / "serve.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nreward:\n  - name: jpeg_compressibility\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "genreward", "serve-reward", str(config), "--port", "0", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        if match:
            return proc, match.group(0), lines
    proc.kill()
    proc.wait(10)
    raise AssertionError(f"server did not print its address: {seen}")


def test_killed_server_gives_clear_error_not_a_hang(tmp_path):
    proc, url, _ = start_cli_server(tmp_path)
    try:
        timeout, retries, backoff = 2.0, 2, 0.1
        remote = build("remote", url=url, timeout=timeout, retries=retries, backoff=backoff)
        images = uint8_images(3)
        with torch.no_grad():
            expected = build("jpeg_compressibility")(images, ["a"] * 3).scores
        assert remote.name == "jpeg_compressibility"
        assert torch.equal(remote(images, ["a"] * 3).scores, expected)
        proc.kill()
        proc.wait(10)
        start = time.monotonic()
        with pytest.raises(GenrewardError) as info:
            remote(images, ["a"] * 3)
        elapsed = time.monotonic() - start
        message = str(info.value)
        assert url in message and "connection refused" in message and "3 attempts" in message
        assert "\n" not in message
        assert elapsed < timeout * (retries + 1) + backoff * (2**retries - 1) + 5.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cli_server_stops_cleanly_on_sigterm(tmp_path):
    proc, url, lines = start_cli_server(tmp_path, "--max-batch", "8", "--batch-wait-ms", "1")
    try:
        remote = build("remote", url=url, timeout=10)
        assert remote(uint8_images(2), ["a", "b"]).scores.shape == (2,)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        time.sleep(0.2)
        rest = []
        while not lines.empty():
            rest.append(lines.get_nowait())
        assert any("stopped" in line for line in rest), rest
        assert "Traceback" not in "".join(rest)
        assert (tmp_path / "out" / "config.yaml").is_file()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_remote_name_option_through_build() -> None:
    """`name` is a normal option of the remote reward (build's own first argument is positional-only)."""
    from genreward.rewards import build

    assert build("remote", url="http://127.0.0.1:9", name="served_hps").name == "served_hps"
