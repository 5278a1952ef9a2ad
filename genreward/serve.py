"""``genreward serve-reward``: run a reward in its own process and score images over HTTP.

Large rewards (a VLM judge, a CLIP ensemble) can live on their own GPU or machine while trainers and
evaluation talk to them through the ``remote`` reward. The wire format is JSON; images travel as
base64 PNG (lossless, and never pickles, so a client cannot make the server run code)::

    GET  /health → {"status": "ok", "reward": NAME, "differentiable": BOOL}
    POST /score  ← {"prompts": [str, ...], "images": [base64 PNG, ...], "metadata": [any, ...] (optional)}
                 → {"scores": [float | null, ...], "details": {KEY: [float | null, ...], ...}}

Non-finite numbers are sent as ``null``. Errors are ``{"error": "one line"}`` with a 4xx status for
bad input (413 for a body over the limit) and 500 when the reward itself raises.

One worker thread owns the reward: requests that arrive within ``batch_wait_ms`` of each other are
concatenated into one reward call of at most ``max_batch`` images (same image size only) and the
results are split back, so many small concurrent clients still get large, efficient batches.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import logging
import math
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

import torch
from PIL import Image

from genreward.errors import GenrewardError
from genreward.images import from_pil
from genreward.rewards.base import Reward, RewardSpec, reward_from_specs

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_PIXELS = 8192 * 8192  # a small PNG can decode to gigabytes; refuse such images up front
REQUEST_KEYS = ("prompts", "images", "metadata")


@dataclass
class ServeConfig:
    """``genreward serve-reward CONFIG``: the reward(s) to serve; several entries are a weighted sum."""

    output_dir: str
    reward: list[RewardSpec] = field(default_factory=list)
    name: str | None = None  # name reported by /health (default: the reward's own name, or weighted_sum)

    def __post_init__(self) -> None:
        if not self.reward:
            raise ValueError("key 'reward' needs at least one entry, e.g. reward: [{name: jpeg_compressibility}]")


def build_served_reward(config: ServeConfig) -> Reward:
    """One spec → that reward; several → their :class:`WeightedSum` (details keep each component)."""
    reward = reward_from_specs(config.reward, name="weighted_sum")
    if config.name:
        reward.name = config.name
    return reward


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse to listen beyond this machine unless asked: anyone who reaches the port can use the GPU."""
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False  # a host name other than localhost: may resolve to a public address
    if not loopback:
        raise GenrewardError(
            f"refusing to serve on non-loopback host {host!r}: anyone who can reach it could use the reward; "
            "use --host 127.0.0.1 or pass --allow-remote"
        )


# ----------------------------------------------------------------------------------------- requests


class RequestError(Exception):
    """A request the server answers with ``status`` and a one-line ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(" ".join(str(message).split()))
        self.status = status


@dataclass
class ScoreRequest:
    images: torch.Tensor  # [B,3,H,W] in [0,1], on the CPU
    prompts: list[str]
    metadata: list[Any] | None


def _decode_png(text: Any, index: int) -> Image.Image:
    if not isinstance(text, str):
        raise RequestError(400, f"images[{index}] must be a base64 string, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"images[{index}] is not valid base64") from None
    if not data.startswith(PNG_SIGNATURE):
        raise RequestError(400, f"images[{index}] is not a PNG (images travel as base64 PNG)")
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise RequestError(400, f"images[{index}] is too large ({image.width}x{image.height} pixels)")
        image.load()
    except RequestError:
        raise
    except Exception as exc:  # PIL raises several types for truncated or corrupt files
        raise RequestError(400, f"images[{index}] cannot be decoded as PNG: {exc}") from None
    return image


def parse_score_request(body: bytes) -> ScoreRequest:
    """Validate a ``POST /score`` body; every problem is a :class:`RequestError` naming the field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object with keys prompts and images, got {type(data).__name__}")
    unknown = sorted(set(data) - set(REQUEST_KEYS))
    if unknown:
        raise RequestError(400, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(REQUEST_KEYS)}")
    for key in ("prompts", "images"):
        if key not in data:
            raise RequestError(400, f"missing key '{key}'")
        if not isinstance(data[key], list):
            raise RequestError(400, f"'{key}' must be a list, got {type(data[key]).__name__}")
    prompts, encoded = data["prompts"], data["images"]
    if not encoded:
        raise RequestError(400, "'images' is empty")
    if len(prompts) != len(encoded):
        raise RequestError(400, f"got {len(prompts)} prompts for {len(encoded)} images; send one prompt per image")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise RequestError(400, f"prompts[{i}] must be a string, got {type(p).__name__}")
    metadata = data.get("metadata")
    if metadata is not None and (not isinstance(metadata, list) or len(metadata) != len(encoded)):
        raise RequestError(400, f"'metadata' must be a list with one entry per image ({len(encoded)})")
    pil = [_decode_png(text, i) for i, text in enumerate(encoded)]
    for i, image in enumerate(pil):
        if image.size != pil[0].size:
            w0, h0 = pil[0].size
            raise RequestError(
                400, f"images in one request must share a size: images[0] is {w0}x{h0}, images[{i}] is {image.width}x{image.height}"
            )
    return ScoreRequest(images=from_pil(pil), prompts=list(prompts), metadata=metadata)


def json_numbers(values: Any) -> Any:
    """Nested lists of floats with non-finite values as None (JSON has no NaN or infinity)."""
    if isinstance(values, list):
        return [json_numbers(v) for v in values]
    if isinstance(values, float) and not math.isfinite(values):
        return None
    return values


# ----------------------------------------------------------------------------------------- batching


class _Job:
    """One request, possibly split into several parts of at most ``max_batch`` images."""

    def __init__(self, num_parts: int):
        self.done = threading.Event()
        self.parts: list[tuple[list, dict[str, list]] | None] = [None] * num_parts
        self.error: RequestError | None = None
        self._lock = threading.Lock()
        self._remaining = num_parts

    def finish_part(self, index: int, scores: list, details: dict[str, list]) -> None:
        with self._lock:
            self.parts[index] = (scores, details)
            self._remaining -= 1
            if self._remaining == 0:
                self.done.set()

    def fail(self, error: RequestError) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            self.done.set()

    def result(self) -> dict[str, Any]:
        """Concatenate the parts back into one response body."""
        scores: list = []
        details: dict[str, list] = {}
        for part_scores, part_details in self.parts:  # type: ignore[misc]
            scores.extend(part_scores)
            if not details:
                details = {k: [] for k in part_details}
            if set(part_details) != set(details):
                raise RequestError(500, "the reward returned different detail keys for parts of one request")
            for key, values in part_details.items():
                details[key].extend(values)
        return {"scores": scores, "details": details}


@dataclass
class _Part:
    job: _Job
    index: int
    images: torch.Tensor
    prompts: list[str]
    metadata: list[Any] | None

    @property
    def key(self) -> tuple[int, int, bool]:
        """Only parts with equal keys can share a reward call (same image size, same context)."""
        return (self.images.shape[-2], self.images.shape[-1], self.metadata is not None)

    @property
    def size(self) -> int:
        return self.images.shape[0]


_STOP = object()


class Batcher:
    """A single worker thread that owns the reward and scores concatenated requests."""

    def __init__(self, reward: Reward, max_batch: int = 64, batch_wait_ms: float = 5.0):
        if max_batch < 1:
            raise GenrewardError(f"--max-batch must be >= 1, got {max_batch}")
        if batch_wait_ms < 0:
            raise GenrewardError(f"--batch-wait-ms must be >= 0, got {batch_wait_ms}")
        self.reward = reward
        self.max_batch = max_batch
        self.wait_s = batch_wait_ms / 1000.0
        self.stopping = False
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="reward-worker", daemon=True)
        self._thread.start()

    def submit(self, request: ScoreRequest) -> _Job:
        """Queue a request (split into parts of at most ``max_batch`` images); wait on ``job.done``."""
        n = request.images.shape[0]
        starts = range(0, n, self.max_batch)
        job = _Job(len(starts))
        if self.stopping:
            job.fail(RequestError(503, "the reward server is shutting down"))
            return job
        for index, start in enumerate(starts):
            end = start + self.max_batch
            meta = request.metadata[start:end] if request.metadata is not None else None
            self._queue.put(_Part(job, index, request.images[start:end], request.prompts[start:end], meta))
        return job

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in progress, fail the queued ones with 503 and end the worker."""
        self.stopping = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        pending: list[_Part] = []
        while True:
            if not pending:
                item = self._queue.get()
                if item is _STOP:
                    break
                pending.append(item)
            self._gather(pending)
            batch = self._take_batch(pending)
            self._execute(batch)
            if self.stopping:
                break
        for part in pending:
            part.job.fail(RequestError(503, "the reward server is shutting down"))
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item.job.fail(RequestError(503, "the reward server is shutting down"))

    def _gather(self, pending: list[_Part]) -> None:
        """Collect parts that keep arriving within ``wait_s`` of each other, until the head's batch is full."""
        head = pending[0].key
        now = time.monotonic()
        deadline, hard_deadline = now + self.wait_s, now + 10 * self.wait_s
        while sum(p.size for p in pending if p.key == head) < self.max_batch:
            remaining = min(deadline, hard_deadline) - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self.stopping = True
                break
            pending.append(item)
            deadline = time.monotonic() + self.wait_s

    def _take_batch(self, pending: list[_Part]) -> list[_Part]:
        """Remove and return the head part plus later parts of the same key that still fit."""
        head = pending[0].key
        batch, rest, total = [], [], 0
        for part in pending:
            if part.key == head and total + part.size <= self.max_batch:
                batch.append(part)
                total += part.size
            else:
                rest.append(part)
        pending[:] = rest
        return batch

    def _execute(self, batch: list[_Part]) -> None:
        images = torch.cat([p.images for p in batch]) if len(batch) > 1 else batch[0].images
        prompts = [prompt for p in batch for prompt in p.prompts]
        context = {}
        if batch[0].metadata is not None:
            context["metadata"] = [m for p in batch for m in p.metadata]  # type: ignore[union-attr]
        try:
            with torch.no_grad():
                out = self.reward(images, prompts, **context)
            scores = out.scores.detach().float().cpu()
            if scores.shape != (images.shape[0],):
                raise GenrewardError(f"the reward returned scores of shape {tuple(scores.shape)} for {images.shape[0]} images")
            details = {k: v.detach().float().cpu() for k, v in out.details.items()}
        except Exception as exc:  # the reward's own failure: answer 500, keep serving
            if len(batch) > 1:  # score each request alone so one bad request does not fail the others
                for part in batch:
                    self._execute([part])
                return
            log.warning("reward %s failed: %s", self.reward.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            batch[0].job.fail(RequestError(500, f"reward {self.reward.name!r} failed: {_one_line(exc)}"))
            return
        offset = 0
        for part in batch:
            end = offset + part.size
            part.job.finish_part(
                part.index,
                json_numbers(scores[offset:end].tolist()),
                {k: json_numbers(v[offset:end].tolist()) for k, v in details.items()},
            )
            offset = end


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, GenrewardError) else f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: one request per connection, so a rejected body never confuses a following request."""

    server: "RewardServer"
    timeout = 60  # seconds a client may take to send its request
    server_version = "genreward-serve"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, allow_nan=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        self._send_json(error.status, {"error": str(error)})

    def do_GET(self) -> None:
        if self.path == "/health":
            reward = self.server.batcher.reward
            self._send_json(200, {"status": "ok", "reward": reward.name, "differentiable": bool(reward.differentiable)})
        elif self.path == "/score":
            self._send_error(RequestError(405, "use POST /score"))
        else:
            self._send_error(RequestError(404, f"no endpoint {self.path}; use GET /health or POST /score"))

    def do_POST(self) -> None:
        if self.path != "/score":
            if self.path == "/health":
                self._send_error(RequestError(405, "use GET /health"))
            else:
                self._send_error(RequestError(404, f"no endpoint {self.path}; use GET /health or POST /score"))
            return
        try:
            body = self._read_body()
            request = parse_score_request(body)
            job = self.server.batcher.submit(request)
            while not job.done.wait(0.5):
                if self.server.batcher.stopping and not self.server.batcher._thread.is_alive():
                    job.fail(RequestError(503, "the reward server is shutting down"))
            if job.error is not None:
                raise job.error
            self._send_json(200, job.result())
        except RequestError as error:
            self._send_error(error)

    def _read_body(self) -> bytes:
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise RequestError(411, "the request needs a Content-Length header")
        try:
            length = int(length_text)
        except ValueError:
            raise RequestError(400, f"bad Content-Length {length_text!r}") from None
        if length < 0:
            raise RequestError(400, f"bad Content-Length {length_text!r}")
        if length > self.server.max_body_bytes:
            self._send_error(
                RequestError(
                    413,
                    f"request body of {length} bytes is over the limit of {self.server.max_body_bytes} bytes "
                    "(send fewer images per request, or raise --max-body-mb)",
                )
            )
            self._discard_body(length)
            raise _Answered()
        try:
            body = self.rfile.read(length)
        except (TimeoutError, OSError):
            raise RequestError(408, f"timed out reading the request body after {self.timeout}s") from None
        if len(body) != length:
            raise RequestError(400, f"request body ended after {len(body)} of {length} bytes")
        return body

    def _discard_body(self, length: int, seconds: float = 1.0) -> None:
        """Swallow (without storing) what a client is still sending, briefly, so it can read our 413."""
        deadline = time.monotonic() + seconds
        self.connection.settimeout(0.1)
        received = 0
        while received < length and time.monotonic() < deadline:
            try:
                chunk = self.rfile.read1(1 << 16)
            except OSError:
                continue
            if not chunk:
                break
            received += len(chunk)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _Answered:
            self.close_connection = True


class _Answered(Exception):
    """The response was already sent; unwind the handler."""


class RewardServer(ThreadingHTTPServer):
    """HTTP front end; decoding happens in per-request threads, scoring in the batcher's one thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], batcher: Batcher, max_body_bytes: int):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.batcher = batcher
        self.max_body_bytes = max_body_bytes
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def close(self) -> None:
        """Stop accepting, finish the current batch and end the worker (after ``shutdown()`` if serving)."""
        self.server_close()
        self.batcher.stop()


def check_settings(host: str, port: int, allow_remote: bool, max_batch: int, batch_wait_ms: float, max_body_mb: float) -> None:
    """Validate the command-line settings before anything slow (loading a model) happens."""
    check_host(host, allow_remote)
    if not 0 <= port <= 65535:
        raise GenrewardError(f"--port must be in 0..65535, got {port}")
    if max_batch < 1:
        raise GenrewardError(f"--max-batch must be >= 1, got {max_batch}")
    if not batch_wait_ms >= 0:
        raise GenrewardError(f"--batch-wait-ms must be >= 0, got {batch_wait_ms}")
    if not max_body_mb > 0:
        raise GenrewardError(f"--max-body-mb must be > 0, got {max_body_mb}")


def make_server(
    reward: Reward,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    allow_remote: bool = False,
    max_batch: int = 64,
    batch_wait_ms: float = 5.0,
    max_body_mb: float = 64.0,
) -> RewardServer:
    """Bind a server for ``reward`` (port 0 = any free port; see ``server.url``); call ``serve_forever()``."""
    check_settings(host, port, allow_remote, max_batch, batch_wait_ms, max_body_mb)
    batcher = Batcher(reward, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    try:
        return RewardServer((host, port), batcher, int(max_body_mb * 1024 * 1024))
    except OSError as exc:
        batcher.stop()
        raise GenrewardError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve_reward(
    config_path: str,
    overrides: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    allow_remote: bool = False,
    max_batch: int = 64,
    batch_wait_ms: float = 5.0,
    max_body_mb: float = 64.0,
) -> int:
    """The ``serve-reward`` command: load, bind, print the address, serve until Ctrl-C or SIGTERM."""
    from genreward.config import load_config, save_config

    config = load_config(config_path, ServeConfig, list(overrides))
    check_settings(host, port, allow_remote, max_batch, batch_wait_ms, max_body_mb)  # before the slow model load
    reward = build_served_reward(config)
    save_config(config, config.output_dir)
    server = make_server(
        reward, host, port, allow_remote=allow_remote, max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_body_mb=max_body_mb
    )
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        print(f"serving reward {reward.name!r} at {server.url} (GET /health, POST /score); Ctrl-C to stop", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        server.close()
    print("reward server stopped", flush=True)
    return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
