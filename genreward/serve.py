"""``genreward serve-reward``: run a reward in its own process and score images over HTTP.

Large rewards (a VLM judge, a CLIP ensemble) can live on their own GPU or machine while trainers and
evaluation talk to them through the ``remote`` reward. The wire format is JSON; images travel as
base64 PNG (lossless, and never pickles, so a client cannot make the server run code)::

    GET  /health → {"status": "ok", "reward": NAME, "differentiable": BOOL}
    POST /score  ← {"prompts": [str, ...], "images": [base64 PNG, ...], "metadata": [any, ...] (optional)}
                 → {"scores": [float | null, ...], "details": {KEY: [float | null, ...], ...}}

Non-finite numbers are sent as ``null``. Every error is ``{"error": "one line"}``:

    400 malformed JSON, a bad field, not base64, not a PNG, a truncated or corrupt PNG, images of
        different sizes in one request, prompts and images of different counts
    404 / 405   unknown endpoint / wrong method          408  body not received within --request-timeout
    411 no Content-Length (and not chunked)              415  Content-Type is not application/json
    413 body over --max-body-mb; an image over --max-image-pixels or a request over
        --max-request-pixels (read from the PNG header, before anything is decoded)
    500 the reward itself raised                         503  queue full (--max-queue, --max-queue-mb) or stopping
    504 not answered within --request-timeout

The HTTP side is Starlette on uvicorn (one asyncio loop; JSON, base64 and PNG decoding run in a small
thread pool, ``decode_threads``). Scoring runs in one worker thread per replica (model copy; one per
GPU with ``--devices 0,1``): requests that arrive within ``batch_wait_ms`` of each other are
concatenated into one reward call of at most ``max_batch`` images (same image size only, at most
``max_request_pixels`` pixels) and the results are split back; an idle replica takes the next batch,
so load spreads over the replicas.

Memory is bounded up front: a request is admitted (or refused with 503, never parked) before its body
is read, and admitted requests together hold at most ``max_queue_mb`` of bodies plus decoded pixels
(3 bytes each); decoded images wait as uint8 and become float only in the reward call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import io
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from genreward.errors import GenrewardError
from genreward.rewards.base import Reward, RewardSpec, reward_from_specs

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REQUEST_KEYS = ("prompts", "images", "metadata")
DRAIN_SECONDS = 1.0  # how long a refused request's unread body is swallowed so the client can read the answer


@dataclass(frozen=True)
class Limits:
    """What requests may cost the server (each is a ``serve-reward`` flag; see docs/rewards.md)."""

    max_body_bytes: int = 64 * MiB  # --max-body-mb: a larger body is 413 before it is read
    max_image_pixels: int = 4096 * 4096  # --max-image-pixels: width × height of one image (413)
    max_request_pixels: int = 32 * 1024 * 1024  # --max-request-pixels: all images of a request; also caps one batch
    max_queue: int = 64  # --max-queue: requests admitted at once (reading, decoding, waiting, scoring); more → 503
    max_queue_bytes: int = 2048 * MiB  # --max-queue-mb: bodies + decoded uint8 pixels of admitted requests (503)
    request_timeout: float = 50.0  # --request-timeout: seconds from arrival to answer (504; 408 for the body)

    def check(self) -> None:
        if not self.max_body_bytes > 0:
            raise GenrewardError(f"--max-body-mb must be > 0, got {self.max_body_bytes / MiB:g}")
        if self.max_image_pixels < 1:
            raise GenrewardError(f"--max-image-pixels must be >= 1, got {self.max_image_pixels}")
        if self.max_request_pixels < self.max_image_pixels:
            raise GenrewardError(
                f"--max-request-pixels ({self.max_request_pixels}) must be >= --max-image-pixels ({self.max_image_pixels})"
            )
        if self.max_queue < 1:
            raise GenrewardError(f"--max-queue must be >= 1, got {self.max_queue}")
        needed = self.max_body_bytes + 3 * self.max_request_pixels
        if self.max_queue_bytes < needed:
            raise GenrewardError(
                f"--max-queue-mb ({self.max_queue_bytes / MiB:g}) must hold one largest request: "
                f"--max-body-mb + 3 bytes × --max-request-pixels = {needed / MiB:.0f} MB"
            )
        if not self.request_timeout > 0:
            raise GenrewardError(f"--request-timeout must be > 0 seconds, got {self.request_timeout}")


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


# ----------------------------------------------------------------------------------------- replicas


def parse_devices(text: str | None) -> list[int]:
    """``--devices 0,1`` (or ``cuda:0,cuda:1``) → CUDA indices; each must exist on this machine."""
    if text is None:
        return []
    indices = []
    for item in str(text).split(","):
        item = item.strip().lower().removeprefix("cuda:")
        if not item.isdigit():
            raise GenrewardError(f"--devices takes CUDA device indices such as 0,1; got {text!r} (for CPU copies use --replicas N)")
        indices.append(int(item))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [i for i in indices if i >= count]
    if missing:
        raise GenrewardError(f"--devices {text}: no CUDA device {missing[0]} on this machine ({count} visible)")
    return indices


def _on_device(value: Any, device: str) -> Any:
    """Reward options with every explicit CUDA/auto ``device`` option moved to ``device`` (nested too)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "device" and (item is None or str(item) == "auto" or str(item).startswith("cuda")):
                out[key] = device
            else:
                out[key] = _on_device(item, device)
        return out
    if isinstance(value, list):
        return [_on_device(v, device) for v in value]
    return value


def build_replicas(config: ServeConfig, devices: Sequence[int] = (), replicas: int = 1) -> list[Reward]:
    """One reward per CUDA index in ``devices`` (built with that device current), else ``replicas`` copies."""
    if not devices:
        return [build_served_reward(config) for _ in range(replicas)]
    rewards = []
    for index in devices:
        specs = [replace(s, options=_on_device(copy.deepcopy(s.options), f"cuda:{index}")) for s in config.reward]
        with torch.cuda.device(index):
            rewards.append(build_served_reward(replace(config, reward=specs)))
    return rewards


# ----------------------------------------------------------------------------------------- requests


class RequestError(Exception):
    """A request the server answers with ``status`` and a one-line ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(" ".join(str(message).split()))
        self.status = status


@dataclass
class ScoreRequest:
    pixels: torch.Tensor  # [B,H,W,3] uint8 on the CPU (4× smaller than float while it waits)
    prompts: list[str]
    metadata: list[Any] | None

    @property
    def images(self) -> torch.Tensor:
        """``[B,3,H,W]`` float in [0,1], as the reward gets them."""
        return to_float(self.pixels)


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """``[B,H,W,3]`` uint8 → contiguous ``[B,3,H,W]`` float32 in [0,1] (the values of ``images.from_uint8``)."""
    return pixels.permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def png_size(data: bytes, index: int) -> tuple[int, int]:
    """Width and height from the PNG header (IHDR must be the first chunk), without decoding anything."""
    if not data.startswith(PNG_SIGNATURE):
        raise RequestError(400, f"images[{index}] is not a PNG (images travel as base64 PNG)")
    if len(data) < 33 or data[12:16] != b"IHDR" or struct.unpack(">I", data[8:12])[0] != 13:
        raise RequestError(400, f"images[{index}] cannot be decoded as PNG: no valid IHDR header")
    width, height = struct.unpack(">II", data[16:24])
    if width == 0 or height == 0 or width > 2**31 - 1 or height > 2**31 - 1:
        raise RequestError(400, f"images[{index}] cannot be decoded as PNG: header declares {width}x{height} pixels")
    return width, height


def _b64(text: Any, index: int) -> bytes:
    if not isinstance(text, str):
        raise RequestError(400, f"images[{index}] must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"images[{index}] is not valid base64") from None


def _decode_into(data: bytes, size: tuple[int, int], out: np.ndarray, index: int) -> None:
    """Decode one PNG whose header said ``size`` into ``out`` ([H,W,3] uint8)."""
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        if image.size != size:  # cannot happen for a valid file; a guard, not a code path
            raise RequestError(400, f"images[{index}] declares {size[0]}x{size[1]} pixels but opens as {image.width}x{image.height}")
        out[...] = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"images[{index}] is too large: {exc}") from None
    except UnidentifiedImageError:
        raise RequestError(400, f"images[{index}] cannot be decoded as PNG: unreadable header or data") from None
    except Exception as exc:  # PIL raises several types for truncated or corrupt files
        raise RequestError(400, f"images[{index}] cannot be decoded as PNG: {exc}") from None


def parse_score_request(body: bytes, limits: Limits | None = None, reserve: Callable[[int], bool] | None = None) -> ScoreRequest:
    """Validate a ``POST /score`` body; every problem is a :class:`RequestError` naming the field.

    Sizes come from the PNG headers and are checked against ``limits`` before any pixel is decoded;
    ``reserve(nbytes)`` (the queue's memory budget) is asked for the decoded size, False → 503.
    """
    limits = limits or Limits()
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None
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
    del data

    # Headers first: nothing is decoded until every image's size is known to be acceptable.
    files, sizes, total = [], [], 0
    for i, text in enumerate(encoded):
        files.append(_b64(text, i))
        encoded[i] = None  # drop the base64 text as we go
        width, height = png_size(files[-1], i)
        if width * height > limits.max_image_pixels:
            raise RequestError(
                413, f"images[{i}] is {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{limits.max_image_pixels:,} (--max-image-pixels)"
            )
        total += width * height
        if total > limits.max_request_pixels:
            raise RequestError(
                413, f"the request's images add up to over {limits.max_request_pixels:,} pixels (--max-request-pixels) "
                f"at images[{i}]; send fewer or smaller images per request"
            )
        sizes.append((width, height))
    for i, size in enumerate(sizes):
        if size != sizes[0]:
            (w0, h0), (w, h) = sizes[0], size
            raise RequestError(400, f"images in one request must share a size: images[0] is {w0}x{h0}, images[{i}] is {w}x{h}")
    if reserve is not None and not reserve(3 * total):
        raise RequestError(503, "the reward server is busy (--max-queue-mb is taken by queued requests); retry later")
    width, height = sizes[0]
    pixels = np.empty((len(files), height, width, 3), dtype=np.uint8)
    for i, data_i in enumerate(files):
        _decode_into(data_i, (width, height), pixels[i], i)
        files[i] = b""
    return ScoreRequest(pixels=torch.from_numpy(pixels), prompts=list(prompts), metadata=metadata)


def json_numbers(values: Any) -> Any:
    """Nested lists of floats with non-finite values as None (JSON has no NaN or infinity)."""
    if isinstance(values, list):
        return [json_numbers(v) for v in values]
    if isinstance(values, float) and not math.isfinite(values):
        return None
    return values


# ----------------------------------------------------------------------------------------- batching


class _Job:
    """One request, possibly split into several parts of at most ``max_batch`` images.

    ``on_done`` is called once, from a worker thread, when every part is scored or the job failed.
    """

    def __init__(self, num_parts: int, on_done: Callable[[], None] | None = None):
        self.done = threading.Event()
        self.parts: list[tuple[list, dict[str, list]] | None] = [None] * num_parts
        self.error: RequestError | None = None
        self.cancelled = False  # the client left or timed out: queued parts are dropped unscored
        self._lock = threading.Lock()
        self._remaining = num_parts
        self._on_done = on_done

    def _finish(self) -> None:
        self.done.set()
        if self._on_done is not None:
            callback, self._on_done = self._on_done, None
            callback()

    def finish_part(self, index: int, scores: list, details: dict[str, list]) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self.parts[index] = (scores, details)
            self._remaining -= 1
            if self._remaining == 0:
                self._finish()

    def fail(self, error: RequestError) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self.error = error
            self._finish()

    def cancel(self) -> None:
        self.cancelled = True

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
    pixels: torch.Tensor  # [b,H,W,3] uint8
    prompts: list[str]
    metadata: list[Any] | None

    @property
    def key(self) -> tuple[int, int, bool]:
        """Only parts with equal keys can share a reward call (same image size, same context)."""
        return (self.pixels.shape[1], self.pixels.shape[2], self.metadata is not None)

    @property
    def size(self) -> int:
        return self.pixels.shape[0]

    @property
    def num_pixels(self) -> int:
        return self.pixels.shape[0] * self.pixels.shape[1] * self.pixels.shape[2]


def _shutting_down() -> RequestError:
    return RequestError(503, "the reward server is shutting down")


class Batcher:
    """One worker thread per replica; the idle workers take turns collecting the next batch.

    Parts wait in one shared list. The collecting worker waits until the head's batch is full or no
    part has arrived for ``batch_wait_ms`` (at most 10× that in all), takes it, and scores it while
    the next idle worker collects, so requests spread over the replicas by who is free.
    """

    def __init__(
        self,
        reward: Reward | Sequence[Reward],
        max_batch: int = 64,
        batch_wait_ms: float = 5.0,
        *,
        max_batch_pixels: int | None = None,
        devices: Sequence[int | None] | None = None,
    ):
        if max_batch < 1:
            raise GenrewardError(f"--max-batch must be >= 1, got {max_batch}")
        if not batch_wait_ms >= 0:
            raise GenrewardError(f"--batch-wait-ms must be >= 0, got {batch_wait_ms}")
        self.rewards: list[Reward] = list(reward) if isinstance(reward, (list, tuple)) else [reward]  # type: ignore[arg-type]
        if not self.rewards:
            raise GenrewardError("the batcher needs at least one reward replica")
        devices = list(devices) if devices is not None else [None] * len(self.rewards)
        if len(devices) != len(self.rewards):
            raise GenrewardError(f"{len(self.rewards)} reward replicas for {len(devices)} devices")
        self.reward = self.rewards[0]
        self.max_batch = max_batch
        self.max_batch_pixels = max_batch_pixels
        self.wait_s = batch_wait_ms / 1000.0
        self.stopping = False
        self._pending: list[_Part] = []
        self._cond = threading.Condition()
        self._collector = threading.Lock()  # one idle worker collects at a time
        self._last_arrival = 0.0
        self._threads = [
            threading.Thread(target=self._run, args=(r, d), name=f"reward-worker-{i}", daemon=True)
            for i, (r, d) in enumerate(zip(self.rewards, devices))
        ]
        for t in self._threads:
            t.start()

    def submit(self, request: ScoreRequest, on_done: Callable[[], None] | None = None) -> _Job:
        """Queue a request (split into parts of at most ``max_batch`` images); wait on ``job.done``."""
        n = request.pixels.shape[0]
        starts = range(0, n, self.max_batch)
        job = _Job(len(starts), on_done)
        with self._cond:
            if self.stopping:
                job.fail(_shutting_down())
                return job
            for index, start in enumerate(starts):
                end = start + self.max_batch
                meta = request.metadata[start:end] if request.metadata is not None else None
                self._pending.append(_Part(job, index, request.pixels[start:end], request.prompts[start:end], meta))
            self._last_arrival = time.monotonic()
            self._cond.notify_all()
        return job

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batches in progress, fail the queued ones with 503 and end the workers."""
        with self._cond:
            self.stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            pending, self._pending = self._pending, []
        for part in pending:
            part.job.fail(_shutting_down())

    # -------------------------------------------------------------------- workers

    def _run(self, reward: Reward, device: int | None) -> None:
        if device is not None:
            torch.cuda.set_device(device)
        while True:
            with self._collector:
                batch = self._collect()
            if batch is None:
                return
            try:
                self._execute(reward, batch)
            except Exception as exc:  # never lose a worker: its requests get a 500, the next batch goes on
                log.warning("reward worker: unexpected %s", _one_line(exc), exc_info=log.isEnabledFor(logging.DEBUG))
                for part in batch:
                    part.job.fail(RequestError(500, f"internal error: {_one_line(exc)}"))

    def _collect(self) -> list[_Part] | None:
        """Wait for a batch: the head part plus later parts of its key, until full or the wait is over."""
        with self._cond:
            while True:
                self._pending = [p for p in self._pending if not p.job.cancelled]
                if self.stopping:
                    return None
                if self._pending:
                    break
                self._cond.wait()
            hard_deadline = time.monotonic() + 10 * self.wait_s
            while not self.stopping:
                self._pending = [p for p in self._pending if not p.job.cancelled]
                if not self._pending:
                    return []
                head = self._pending[0].key
                if sum(p.size for p in self._pending if p.key == head) >= self.max_batch:
                    break
                remaining = min(self._last_arrival + self.wait_s, hard_deadline) - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self.stopping:
                return None
            return self._take_batch()

    def _take_batch(self) -> list[_Part]:
        """Remove and return the head part plus later parts of the same key that still fit."""
        head = self._pending[0].key
        batch, rest, total, pixels = [], [], 0, 0
        for part in self._pending:
            fits = total + part.size <= self.max_batch and (
                not batch or self.max_batch_pixels is None or pixels + part.num_pixels <= self.max_batch_pixels
            )
            if part.key == head and fits:
                batch.append(part)
                total += part.size
                pixels += part.num_pixels
            else:
                rest.append(part)
        self._pending = rest
        return batch

    def _execute(self, reward: Reward, batch: list[_Part]) -> None:
        if not batch:
            return
        prompts = [prompt for p in batch for prompt in p.prompts]
        context = {}
        if batch[0].metadata is not None:
            context["metadata"] = [m for p in batch for m in p.metadata]  # type: ignore[union-attr]
        images = None
        try:
            pixels = torch.cat([p.pixels for p in batch]) if len(batch) > 1 else batch[0].pixels
            images = to_float(pixels)
            del pixels
            with torch.no_grad():
                out = reward(images, prompts, **context)
            scores = out.scores.detach().float().cpu()
            if scores.shape != (images.shape[0],):
                raise GenrewardError(f"the reward returned scores of shape {tuple(scores.shape)} for {images.shape[0]} images")
            details = {k: v.detach().float().cpu() for k, v in out.details.items()}
        except Exception as exc:  # the reward's own failure: answer 500, keep serving
            del images
            if len(batch) > 1:  # score each request alone so one bad request does not fail the others
                for part in batch:
                    self._execute(reward, [part])
                return
            log.warning("reward %s failed: %s", reward.name, _one_line(exc), exc_info=log.isEnabledFor(logging.DEBUG))
            batch[0].job.fail(RequestError(500, f"reward {reward.name!r} failed: {_one_line(exc)}"))
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


# ----------------------------------------------------------------------------------------- admission


class _Admission:
    """Requests and bytes held by admitted requests; what does not fit is refused (503), never parked."""

    def __init__(self, max_requests: int, max_bytes: int):
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def admit(self, nbytes: int) -> "_Ticket | None":
        with self._lock:
            if self.requests >= self.max_requests or self.bytes + nbytes > self.max_bytes:
                return None
            self.requests += 1
            self.bytes += nbytes
        return _Ticket(self, nbytes)


class _Ticket:
    """One admitted request's share; freed when its last holder (handler, decode thread) lets go."""

    def __init__(self, admission: _Admission, nbytes: int):
        self._admission = admission
        self._bytes = nbytes
        self._holders = 1
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            self._holders += 1

    def grow(self, nbytes: int) -> bool:
        a = self._admission
        with a._lock, self._lock:
            if self._holders == 0 or a.bytes + nbytes > a.max_bytes:
                return False
            a.bytes += nbytes
            self._bytes += nbytes
        return True

    def release(self) -> None:
        a = self._admission
        with a._lock, self._lock:
            if self._holders == 0:
                return
            self._holders -= 1
            if self._holders == 0:
                a.requests -= 1
                a.bytes -= self._bytes
                self._bytes = 0


# ----------------------------------------------------------------------------------------- HTTP


def _json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")


class _JSON:
    """An ASGI response. ``drain``: the request body was not read; swallow it briefly, then close."""

    def __init__(self, status: int, body: dict[str, Any], *, drain: bool = False, close: bool = False):
        self.status = status
        self.data = _json_bytes(body)
        self.drain = drain
        self.close = close or drain

    async def __call__(self, scope: Any, receive: Callable, send: Callable) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.data)).encode())]
        if self.close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        if not self.drain:
            await send({"type": "http.response.body", "body": self.data})
            return
        # The whole answer goes out first (the client may wait for it before sending more), then the
        # unread body is swallowed without storing it for at most DRAIN_SECONDS, so that closing does
        # not reset the connection under a client that is still sending.
        await send({"type": "http.response.body", "body": self.data, "more_body": True})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_swallow(receive), DRAIN_SECONDS)
        await send({"type": "http.response.body", "body": b""})


class _Nothing:
    """No answer: the client is gone."""

    async def __call__(self, scope: Any, receive: Callable, send: Callable) -> None:
        return None


async def _swallow(receive: Callable) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _until_disconnect(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Disconnected(Exception):
    """The client closed the connection; nobody is left to answer."""


def _error(error: RequestError, **kwargs: Any) -> _JSON:
    return _JSON(error.status, {"error": str(error)}, **kwargs)


class _App:
    """The Starlette application: routes, limits, admission and the hand-off to the batcher."""

    def __init__(self, batcher: Batcher, limits: Limits, decode_threads: int):
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.batcher = batcher
        self.limits = limits
        self.admission = _Admission(limits.max_queue, limits.max_queue_bytes)
        self.decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="reward-decode")
        self.app = Starlette(
            routes=[Route("/health", self.health, methods=["GET"]), Route("/score", self.score, methods=["POST"])],
            exception_handlers={404: self.not_found, 405: self.not_allowed},
        )

    async def health(self, request: Any) -> _JSON:
        reward = self.batcher.reward
        return _JSON(200, {"status": "ok", "reward": reward.name, "differentiable": bool(reward.differentiable)})

    async def not_found(self, request: Any, exc: Exception) -> _JSON:
        return _error(RequestError(404, f"no endpoint {request.url.path}; use GET /health or POST /score"), drain=True)

    async def not_allowed(self, request: Any, exc: Exception) -> _JSON:
        hint = "use GET /health" if request.url.path == "/health" else "use POST /score"
        return _error(RequestError(405, hint), drain=True)

    async def score(self, request: Any) -> Any:
        limits = self.limits
        deadline = time.monotonic() + limits.request_timeout
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            got = f"Content-Type {media!r}" if media else "no Content-Type"
            return _error(RequestError(415, f"POST /score takes application/json, got {got}"), drain=True)
        length_text = request.headers.get("content-length")
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        if length_text is None and not chunked:
            return _error(RequestError(411, "the request needs a Content-Length header"), drain=True)
        length = None
        if length_text is not None:
            try:
                length = int(length_text)
            except ValueError:
                length = -1
            if length < 0:
                return _error(RequestError(400, f"bad Content-Length {length_text!r}"), drain=True)
            if length > limits.max_body_bytes:
                return _error(self._too_big(length), drain=True)
        ticket = self.admission.admit(length if length is not None else limits.max_body_bytes)
        if ticket is None:
            a = self.admission
            return _error(
                RequestError(
                    503,
                    f"the reward server is busy: {a.requests} requests holding {a.bytes / MiB:.0f} MB are admitted "
                    f"(limits --max-queue {a.max_requests}, --max-queue-mb {a.max_bytes / MiB:g}); retry later",
                ),
                drain=True,
            )
        body_read = False
        try:
            body = await self._read_body(request.receive, length, deadline)
            body_read = True
            ticket.hold()  # the decode thread's share: freed when it ends, even after we gave up waiting
            work = self.decoder.submit(parse_score_request, body, limits, ticket.grow)
            work.add_done_callback(lambda _: ticket.release())
            del body
            parsed = await self._within(asyncio.wrap_future(work), request.receive, deadline)
            loop = asyncio.get_running_loop()
            done = loop.create_future()

            def resolve() -> None:
                if not done.done():
                    done.set_result(None)

            job = self.batcher.submit(parsed, on_done=lambda: _call_soon(loop, resolve))
            del parsed
            try:
                await self._within(done, request.receive, deadline)
            except BaseException:
                job.cancel()
                raise
            if job.error is not None:
                raise job.error
            return _JSON(200, job.result())
        except RequestError as error:
            return _error(error, drain=not body_read)
        except _Disconnected:
            log.debug("reward server: client disconnected before its answer")
            return _Nothing()
        except Exception as exc:  # a bug, not the client's fault: one line in the log and in the answer
            log.warning("reward server: unexpected %s", _one_line(exc), exc_info=log.isEnabledFor(logging.DEBUG))
            return _error(RequestError(500, f"internal error: {_one_line(exc)}"), drain=not body_read)
        finally:
            ticket.release()

    def _too_big(self, length: int) -> RequestError:
        return RequestError(
            413,
            f"request body of {length} bytes is over the limit of {self.limits.max_body_bytes} bytes "
            "(send fewer images per request, or raise --max-body-mb)",
        )

    async def _read_body(self, receive: Callable, length: int | None, deadline: float) -> bytes:
        limit = self.limits.max_body_bytes

        async def read() -> bytes:
            chunks = bytearray()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Disconnected()
                chunks += message.get("body", b"")
                if len(chunks) > limit:
                    raise self._too_big(len(chunks))
                if not message.get("more_body", False):
                    return bytes(chunks)

        try:
            body = await asyncio.wait_for(read(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {self.limits.request_timeout:g}s (--request-timeout)") from None
        if length is not None and len(body) != length:
            raise RequestError(400, f"request body ended after {len(body)} of {length} bytes")
        return body

    async def _within(self, future: "asyncio.Future[Any]", receive: Callable, deadline: float) -> Any:
        """``future``'s result, or 504 at ``deadline``, or :class:`_Disconnected` when the client leaves."""
        watcher = asyncio.ensure_future(_until_disconnect(receive))
        try:
            done, _ = await asyncio.wait({future, watcher}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if future in done:
            return future.result()
        future.cancel()
        if watcher in done:
            raise _Disconnected()
        raise RequestError(
            504,
            f"not answered within {self.limits.request_timeout:g}s (--request-timeout): the reward is busy; "
            "retry later, send smaller requests or add replicas",
        )

    def close(self) -> None:
        self.decoder.shutdown(wait=False, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped, nobody is waiting
        loop.call_soon_threadsafe(callback)


def _uvicorn_server(config: Any) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:  # signals belong to the caller (serve_reward installs its own)
            yield

    return Server(config)


class RewardServer:
    """A bound server: ``serve_forever()`` (blocks), ``shutdown()`` (from another thread), ``close()``."""

    def __init__(self, sock: socket.socket, batcher: Batcher, limits: Limits, decode_threads: int):
        import uvicorn

        self.socket = sock
        self.batcher = batcher
        self.limits = limits
        self.server_address = sock.getsockname()[:2]
        self._app = _App(batcher, limits, decode_threads)
        config = uvicorn.Config(
            self._app.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=10,
            limit_concurrency=max(256, 4 * limits.max_queue),  # open connections; beyond: 503 from uvicorn
        )
        self._server = _uvicorn_server(config)
        self._running = threading.Event()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self._running.set()
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def stop_soon(self) -> None:
        """Ask ``serve_forever`` to return after the answers in flight (safe from a signal handler)."""
        if self._server.should_exit:
            self._server.force_exit = True
        self._server.should_exit = True

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop serving and wait until ``serve_forever`` has returned."""
        self._server.should_exit = True
        if self._running.is_set():
            self._stopped.wait(timeout)

    def close(self) -> None:
        """Stop accepting, finish the current batches and end the workers (after ``shutdown()`` if serving)."""
        self._server.should_exit = True
        with contextlib.suppress(OSError):
            self.socket.close()
        self._app.close()
        self.batcher.stop()


def check_settings(
    host: str,
    port: int,
    allow_remote: bool,
    max_batch: int,
    batch_wait_ms: float,
    limits: Limits,
    decode_threads: int = 1,
    replicas: int = 1,
) -> None:
    """Validate the command-line settings before anything slow (loading a model) happens."""
    check_host(host, allow_remote)
    if not 0 <= port <= 65535:
        raise GenrewardError(f"--port must be in 0..65535, got {port}")
    if max_batch < 1:
        raise GenrewardError(f"--max-batch must be >= 1, got {max_batch}")
    if not batch_wait_ms >= 0:
        raise GenrewardError(f"--batch-wait-ms must be >= 0, got {batch_wait_ms}")
    if decode_threads < 1:
        raise GenrewardError(f"--decode-threads must be >= 1, got {decode_threads}")
    if replicas < 1:
        raise GenrewardError(f"--replicas must be >= 1, got {replicas}")
    limits.check()


def default_decode_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def make_limits(
    max_body_mb: float = 64.0,
    max_image_pixels: int = Limits.max_image_pixels,
    max_request_pixels: int = Limits.max_request_pixels,
    max_queue: int = Limits.max_queue,
    max_queue_mb: float = Limits.max_queue_bytes / MiB,
    request_timeout: float = Limits.request_timeout,
) -> Limits:
    """:class:`Limits` from the command-line units (MB for sizes)."""
    if not max_body_mb > 0:
        raise GenrewardError(f"--max-body-mb must be > 0, got {max_body_mb}")
    if not max_queue_mb > 0:
        raise GenrewardError(f"--max-queue-mb must be > 0, got {max_queue_mb}")
    return Limits(
        max_body_bytes=int(max_body_mb * MiB),
        max_image_pixels=int(max_image_pixels),
        max_request_pixels=int(max_request_pixels),
        max_queue=int(max_queue),
        max_queue_bytes=int(max_queue_mb * MiB),
        request_timeout=float(request_timeout),
    )


def make_server(
    reward: Reward | Sequence[Reward],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    allow_remote: bool = False,
    max_batch: int = 64,
    batch_wait_ms: float = 5.0,
    max_body_mb: float = 64.0,
    max_image_pixels: int = Limits.max_image_pixels,
    max_request_pixels: int = Limits.max_request_pixels,
    max_queue: int = Limits.max_queue,
    max_queue_mb: float = Limits.max_queue_bytes / MiB,
    request_timeout: float = Limits.request_timeout,
    decode_threads: int | None = None,
    devices: Sequence[int | None] | None = None,
) -> RewardServer:
    """Bind a server for ``reward`` (or a list of replicas; port 0 = any free port, see ``server.url``).

    Call ``serve_forever()``; ``shutdown()`` from another thread, then ``close()``.
    """
    limits = make_limits(max_body_mb, max_image_pixels, max_request_pixels, max_queue, max_queue_mb, request_timeout)
    decode_threads = decode_threads or default_decode_threads()
    check_settings(host, port, allow_remote, max_batch, batch_wait_ms, limits, decode_threads)
    if Image.MAX_IMAGE_PIXELS is not None and limits.max_image_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limits.max_image_pixels  # our own check (before decoding) is the one that answers
    bind_host = host.strip("[]")
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind_host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise GenrewardError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    batcher = Batcher(reward, max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_batch_pixels=limits.max_request_pixels, devices=devices)
    return RewardServer(sock, batcher, limits, decode_threads)


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
    max_image_pixels: int = Limits.max_image_pixels,
    max_request_pixels: int = Limits.max_request_pixels,
    max_queue: int = Limits.max_queue,
    max_queue_mb: float = Limits.max_queue_bytes / MiB,
    request_timeout: float = Limits.request_timeout,
    decode_threads: int | None = None,
    devices: str | None = None,
    replicas: int = 1,
) -> int:
    """The ``serve-reward`` command: load, bind, print the address, serve until Ctrl-C or SIGTERM."""
    from genreward.config import load_config, save_config

    config = load_config(config_path, ServeConfig, list(overrides))
    limits = make_limits(max_body_mb, max_image_pixels, max_request_pixels, max_queue, max_queue_mb, request_timeout)
    decode_threads = decode_threads or default_decode_threads()
    if devices is not None and replicas != 1:
        raise GenrewardError("give either --devices (one replica per GPU) or --replicas N, not both")
    check_settings(host, port, allow_remote, max_batch, batch_wait_ms, limits, decode_threads, replicas)  # before the slow load
    indices = parse_devices(devices)
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels  # this process only serves: any PIL decode obeys the cap
    rewards = build_replicas(config, indices, replicas)
    save_config(config, config.output_dir)
    server = make_server(
        rewards,
        host,
        port,
        allow_remote=allow_remote,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        max_body_mb=max_body_mb,
        max_image_pixels=max_image_pixels,
        max_request_pixels=max_request_pixels,
        max_queue=max_queue,
        max_queue_mb=max_queue_mb,
        request_timeout=request_timeout,
        decode_threads=decode_threads,
        devices=indices or None,
    )
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: server.stop_soon())
    where = (f"{len(rewards)} replicas" if len(rewards) > 1 else "1 replica") + (f" on cuda:{', cuda:'.join(map(str, indices))}" if indices else "")
    try:
        print(
            f"serving reward {rewards[0].name!r} at {server.url} (GET /health, POST /score; {where}); Ctrl-C to stop",
            flush=True,
        )
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
    print("reward server stopped", flush=True)
    return 0
