"""``genreward serve-reward`` under hostile requests: every one is refused with one line, memory stays flat.

A real server process (``python -m genreward serve-reward`` on 127.0.0.1) takes decompression bombs
(small PNGs declaring 8000×8000 pixels), requests over the pixel budget, truncated and corrupt PNGs,
wrong sizes, huge and chunked JSON bodies, text/plain, garbage HTTP and clients that hang up; its
peak RSS (VmHWM) must not grow, its log must hold no traceback, and it must still answer. Queue-full
(503), timeouts (504) and the dropping of abandoned requests use an in-process server with a slow
reward, so they are deterministic.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from genreward.errors import GenrewardError
from genreward.rewards import build
from genreward.rewards.base import RewardOutput
from genreward.rewards.remote import RemoteReward, encode_png
from genreward.serve import make_server

ROOT = Path(__file__).resolve().parents[1]
MAX_BODY_MB = 2
RSS_GROWTH_MB = 150  # a single decoded bomb would take > 700 MB (192 MB uint8 + 768 MB float)


def uint8_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255.0


def png_bytes(image: Image.Image, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_png(width: int = 8000, height: int = 8000) -> bytes:
    """An all-zero 1-bit image: a few KB of PNG that decodes to width×height RGB pixels."""
    return png_bytes(Image.new("1", (width, height)), optimize=True)


def handmade_png(width: int, height: int) -> bytes:
    """A PNG header written by hand (RGB, 8 bit) declaring width×height, with one tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def noise_png(size: int = 64) -> bytes:
    return png_bytes(Image.effect_noise((size, size), 50).convert("RGB"))


def score_json(images: list[bytes], prompts: list[str] | None = None) -> bytes:
    prompts = prompts if prompts is not None else [f"p{i}" for i in range(len(images))]
    return json.dumps({"prompts": prompts, "images": [b64(x) for x in images]}).encode()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


# ------------------------------------------------------------------------------------------ server process


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """``python -m genreward serve-reward`` with jpeg_compressibility and a 2 MB body limit; (proc, url, log lines)."""
    tmp = tmp_path_factory.mktemp("hostile")
    config = tmp / "serve.yaml"
    config.write_text(f"output_dir: {tmp / 'out'}\nreward:\n  - name: jpeg_compressibility\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "genreward", "serve-reward", str(config), "--port", "0", "--max-body-mb", str(MAX_BODY_MB)]
    proc = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    log: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            log.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    url = None
    deadline = time.monotonic() + 90
    while url is None and time.monotonic() < deadline:
        try:
            match = re.search(r"http://127\.0\.0\.1:\d+", lines.get(timeout=1))
        except queue.Empty:
            continue
        url = match.group(0) if match else None
    if url is None:
        proc.kill()
        pytest.fail(f"server did not print its address: {log}")
    try:
        yield proc, url, log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def request(url: str, body: bytes = b"", *, method: str = "POST", path: str = "/score", headers: dict | None = None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def raw(url: str, data: bytes, *, read: bool = True) -> bytes:
    """Send raw bytes on a fresh connection; return what comes back (or nothing, hanging up at once)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        if not read:
            return b""
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def one_line_error(status: int, answer: dict, expected_status: int, needle: str) -> None:
    assert status == expected_status, answer
    assert set(answer) == {"error"} and "\n" not in answer["error"], answer
    assert needle in answer["error"], answer


def assert_serving(url: str) -> None:
    remote = RemoteReward(url=url, name="r", timeout=20, retries=0)
    assert remote.health()["status"] == "ok"
    images = uint8_images(2, seed=5)
    with torch.no_grad():
        expected = build("jpeg_compressibility")(images, ["a", "b"]).scores
    assert torch.equal(remote(images, ["a", "b"]).scores, expected)


HOSTILE = {
    # name: (body maker, headers, status, needle)
    "bomb_8000x8000_1bit": (lambda: score_json([bomb_png()]), {}, 413, "8000x8000 = 64,000,000 pixels"),
    "bomb_handmade_header": (lambda: score_json([handmade_png(60000, 60000)]), {}, 413, "--max-image-pixels"),
    "bomb_among_good_images": (lambda: score_json([noise_png(), bomb_png()]), {}, 413, "images[1] is 8000x8000"),
    "request_over_pixel_budget": (lambda: score_json([bomb_png(4000, 4000)] * 3), {}, 413, "--max-request-pixels"),
    "truncated_png": (lambda: score_json([noise_png()[:300]]), {}, 400, "cannot be decoded as PNG"),
    "header_only_png": (lambda: score_json([noise_png()[:33]]), {}, 400, "cannot be decoded as PNG"),
    "corrupt_idat": (lambda: score_json([noise_png()[:120] + b"\x00" * 400 + noise_png()[520:]]), {}, 400, "cannot be decoded as PNG"),
    "lying_header": (lambda: score_json([handmade_png(640, 480)]), {}, 400, "cannot be decoded as PNG"),
    "no_ihdr": (lambda: score_json([b"\x89PNG\r\n\x1a\n" + b"\x00" * 40]), {}, 400, "no valid IHDR"),
    "zero_size_header": (lambda: score_json([handmade_png(0, 10)]), {}, 400, "declares 0x10"),
    "mixed_sizes": (lambda: score_json([noise_png(32), noise_png(48)]), {}, 400, "must share a size"),
    "prompt_count": (lambda: score_json([noise_png()], prompts=["a", "b"]), {}, 400, "2 prompts for 1 images"),
    "text_plain": (lambda: score_json([noise_png()]), {"Content-Type": "text/plain"}, 415, "application/json"),
    "form_encoded": (lambda: b"prompts=a", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    "deeply_nested_json": (lambda: b'{"prompts": ' + b"[" * 100000 + b"]" * 100000 + b"}", {}, 400, "malformed JSON"),
    "huge_json": (lambda: b'{"prompts": ["' + b"a" * (3 * 1024 * 1024) + b'"]}', {}, 413, "over the limit"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_request_is_refused_in_one_line(server_process, case):
    _, url, _ = server_process
    make_body, headers, status, needle = HOSTILE[case]
    one_line_error(*request(url, make_body(), headers=headers), status, needle)


def test_oversized_chunked_body_is_413(server_process):
    _, url, _ = server_process
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        chunks = (b"x" * (256 * 1024) for _ in range(16))  # 4 MB, no Content-Length
        conn.request("POST", "/score", body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = conn.getresponse()
        one_line_error(response.status, json.loads(response.read()), 413, "over the limit")
    finally:
        conn.close()


def test_missing_content_length_is_411_and_garbage_is_400(server_process):
    _, url, _ = server_process
    answer = raw(url, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411"), answer[:200]
    assert b'"error":"the request needs a Content-Length header"' in answer
    answer = raw(url, b"\x16\x03\x01 this is not HTTP at all\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


def test_clients_that_hang_up_leave_no_trace(server_process):
    _, url, _ = server_process
    body = score_json([noise_png(128)] * 8)
    headers = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    raw(url, headers + body[:1000], read=False)  # mid-body
    raw(url, headers + body, read=False)  # while decoding or scoring
    raw(url, headers, read=False)  # after the headers
    raw(url, b"POST /score HT", read=False)  # mid-request-line
    time.sleep(0.5)
    assert_serving(url)


def test_after_the_onslaught_memory_is_flat_and_the_log_clean(server_process):
    """Runs last in this file (pytest keeps definition order): every hostile request above has been sent."""
    proc, url, log = server_process
    assert_serving(url)
    before = peak_rss_mb(proc.pid)
    bomb = score_json([bomb_png()])
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(request(url, bomb)[0])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [413] * 8
    assert_serving(url)
    after = peak_rss_mb(proc.pid)
    assert after - before < RSS_GROWTH_MB, f"peak RSS grew from {before:.0f} MB to {after:.0f} MB under bombs"
    text = "".join(log)
    assert "Traceback" not in text, text
    assert "Exception" not in text, text


# ------------------------------------------------------------------------------------------ in process


class Slow:
    """Sleeps ``seconds`` per call; records every prompt it scored."""

    name = "slow"
    differentiable = False

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.scored: list[str] = []
        self.started = threading.Event()  # set when a call begins (the test clears it)

    def __call__(self, images: torch.Tensor, prompts: list[str], **context: Any) -> RewardOutput:
        self.started.set()
        time.sleep(self.seconds)
        self.scored.extend(prompts)
        return RewardOutput(scores=images.mean(dim=(1, 2, 3)))


@pytest.fixture
def slow_server():
    """In-process server factory: ``start(reward, **flags)`` → server (stopped at the end of the test)."""
    started = []

    def start(reward: Any, **flags: Any):
        server = make_server(reward, "127.0.0.1", 0, batch_wait_ms=1, **flags)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.close()
        thread.join(10)


def post_images(url: str, images: torch.Tensor, prompts: list[str]) -> tuple[int, dict]:
    return request(url, json.dumps({"prompts": prompts, "images": encode_png(images)}).encode())


def in_background(fn, *args) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn(*args)), daemon=True)
    thread.start()
    return thread, out


def scoring(reward: Slow, fn, *args) -> tuple[threading.Thread, dict]:
    """Start ``fn(*args)`` in the background and return once the reward is busy with it."""
    reward.started.clear()
    thread, out = in_background(fn, *args)
    assert reward.started.wait(20), "the request never reached the reward"
    return thread, out


def test_full_queue_is_503_and_clears(slow_server):
    reward = Slow(1.0)
    server = slow_server(reward, max_queue=1)
    thread, first = scoring(reward, post_images, server.url, uint8_images(1), ["first"])
    one_line_error(*post_images(server.url, uint8_images(1), ["second"]), 503, "--max-queue 1")
    thread.join(20)
    assert first["value"][0] == 200
    assert post_images(server.url, uint8_images(1), ["third"])[0] == 200
    assert reward.scored == ["first", "third"]
    thread, _ = scoring(reward, post_images, server.url, uint8_images(1), ["hold"])
    with pytest.raises(GenrewardError, match="HTTP 503"):  # the client retries 5xx, then says so
        RemoteReward(url=server.url, name="r", retries=1, backoff=0.05, timeout=10)(uint8_images(1), ["x"])
    thread.join(20)


def test_memory_budget_is_503(slow_server):
    reward = Slow(1.0)
    # 1.8 MB holds one request of 1.1 MB (body + 3 bytes per pixel), not two.
    server = slow_server(reward, max_body_mb=1, max_image_pixels=512 * 512, max_request_pixels=512 * 512, max_queue_mb=1.8)
    images = uint8_images(1, size=400)  # ≈ 0.64 MB of body + 0.48 MB of pixels
    thread, first = scoring(reward, post_images, server.url, images, ["first"])
    one_line_error(*post_images(server.url, images, ["second"]), 503, "--max-queue-mb")
    thread.join(20)
    assert first["value"][0] == 200


def test_slow_answer_is_504_and_is_not_scored_later(slow_server):
    reward = Slow(2.5)
    server = slow_server(reward, request_timeout=0.5)
    thread, busy = scoring(reward, post_images, server.url, uint8_images(1), ["busy"])  # times out while scored
    start = time.monotonic()
    one_line_error(*post_images(server.url, uint8_images(1), ["queued"]), 504, "--request-timeout")
    assert time.monotonic() - start < 2.0  # answered at its deadline, not after the 2.5 s call ahead of it
    thread.join(20)
    assert busy["value"][0] == 504
    reward.seconds = 0.0
    deadline = time.monotonic() + 20
    while "busy" not in reward.scored and time.monotonic() < deadline:  # the worker finishes the abandoned call
        time.sleep(0.05)
    assert post_images(server.url, uint8_images(1), ["fine"])[0] == 200
    assert reward.scored == ["busy", "fine"]  # the abandoned "queued" was dropped, never scored


def test_abandoned_request_is_dropped_unscored(slow_server):
    reward = Slow(1.5)
    server = slow_server(reward)
    thread, first = scoring(reward, post_images, server.url, uint8_images(1), ["first"])
    body = json.dumps({"prompts": ["gone"], "images": encode_png(uint8_images(1))}).encode()
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    raw(server.url, head.encode() + body, read=False)  # queued behind "first", then hangs up
    thread.join(20)
    assert first["value"][0] == 200
    reward.seconds = 0.0
    assert post_images(server.url, uint8_images(1), ["after"])[0] == 200
    assert reward.scored == ["first", "after"]


def test_bad_flags_are_one_line_errors():
    for flags, needle in (
        ({"max_image_pixels": 0}, "--max-image-pixels"),
        ({"max_image_pixels": 100, "max_request_pixels": 10}, "--max-request-pixels"),
        ({"max_queue": 0}, "--max-queue"),
        ({"max_queue_mb": 10}, "--max-queue-mb"),
        ({"request_timeout": 0}, "--request-timeout"),
        ({"decode_threads": -1}, "--decode-threads"),
    ):
        with pytest.raises(GenrewardError, match=needle):
            make_server(Slow(0), "127.0.0.1", 0, **flags)
