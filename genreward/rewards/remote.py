"""``remote``: a reward computed by ``genreward serve-reward`` in another process or on another machine.

Images are sent as lossless PNG (so scores match the in-process reward for images that are exact
uint8 values), in requests of ``batch_size`` images. Connection failures and 5xx answers are retried
with exponential backoff; 4xx answers are the caller's mistake and raised at once with the server's
message. Every socket operation has a timeout, so a dead or stuck server is a one-line
:class:`GenrewardError` naming the URL, never a hang. Not differentiable: gradients do not cross HTTP.

Config form: ``{name: remote, options: {url: "http://127.0.0.1:8765"}}``.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import logging
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

import torch

from genreward.errors import GenrewardError
from genreward.images import check_images, to_pil
from genreward.rewards.base import RewardOutput, register

log = logging.getLogger(__name__)


class _Retryable(Exception):
    """A failure worth another attempt (server down, timed out, 5xx); ``str`` says what happened."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _describe(exc: BaseException, timeout: float) -> str:
    """A short phrase for a network failure: 'connection refused', 'timed out after 5s', ..."""
    reason: Any = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (TimeoutError, socket.timeout)) or (isinstance(reason, str) and "timed out" in reason):
        return f"timed out after {timeout:g}s"
    if isinstance(reason, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(reason, (ConnectionResetError, BrokenPipeError)):
        return "connection reset by the server"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host ({reason.strerror or reason})"
    if isinstance(reason, str):
        return reason
    text = " ".join(str(reason).split())
    return f"{type(reason).__name__}: {text}" if text else type(reason).__name__


def _floats(values: Any, n: int, what: str) -> torch.Tensor:
    """JSON numbers (null = NaN) with leading length ``n`` → float32 tensor."""
    if not isinstance(values, list) or len(values) != n:
        raise GenrewardError(f"{what} must be a list of {n} numbers")

    def fix(v: Any) -> Any:
        if isinstance(v, list):
            return [fix(x) for x in v]
        return math.nan if v is None else v

    try:
        return torch.tensor(fix(values), dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise GenrewardError(f"{what} is not a list of numbers: {exc}") from None


def encode_png(images: torch.Tensor) -> list[str]:
    """``[B,3,H,W]`` in [0,1] → base64 PNG strings (fast zlib level: the link is usually loopback)."""
    encoded = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


@register("remote")
class RemoteReward:
    """Client of ``genreward serve-reward``: scores come back as float32 ``[B]`` on the images' device."""

    differentiable = False

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        batch_size: int = 32,
        name: str | None = None,
    ):
        parsed = urllib.parse.urlsplit(str(url))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise GenrewardError(f"remote option url must look like http://HOST:PORT, got {url!r}")
        try:
            parsed.port
        except ValueError as exc:
            raise GenrewardError(f"remote option url has a bad port: {url!r} ({exc})") from None
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise GenrewardError(f"remote option timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise GenrewardError(f"remote option retries must be an integer >= 0, got {retries!r}")
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or backoff < 0:
            raise GenrewardError(f"remote option backoff must be a number of seconds >= 0, got {backoff!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise GenrewardError(f"remote option batch_size must be an integer >= 1, got {batch_size!r}")
        self.url = str(url).rstrip("/")
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.batch_size = batch_size
        self._name = name
        self.server_info: dict[str, Any] | None = None
        # A loopback server must not be reached through an HTTP proxy from the environment.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    @property
    def name(self) -> str:
        """The display name; by default the served reward's name, asked from ``/health`` on first use."""
        if self._name is None:
            self._name = str(self.health()["reward"])
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    def health(self) -> dict[str, Any]:
        """``GET /health`` (with retries): ``{"status", "reward", "differentiable"}``."""
        info = self._request("GET", "/health", None)
        if not isinstance(info, dict) or info.get("status") != "ok" or "reward" not in info:
            raise GenrewardError(f"reward server {self.url} answered /health with {info!r}, not a genreward reward server")
        self.server_info = info
        return info

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> RewardOutput:
        check_images(images)
        n = images.shape[0]
        if isinstance(prompts, str) or len(prompts) != n:
            got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise GenrewardError(f"remote reward needs one prompt per image: {n} images, {got}")
        metadata = context.get("metadata")
        if metadata is not None and (isinstance(metadata, (str, dict)) or len(metadata) != n):
            raise GenrewardError(f"remote reward needs one metadata entry per image ({n})")
        scores: list[torch.Tensor] = []
        details: dict[str, list[torch.Tensor]] = {}
        for start in range(0, n, self.batch_size):
            end = min(start + self.batch_size, n)
            body: dict[str, Any] = {"prompts": [str(p) for p in prompts[start:end]], "images": encode_png(images[start:end])}
            if metadata is not None:
                body["metadata"] = list(metadata[start:end])
            try:
                payload = json.dumps(body, allow_nan=False).encode("utf-8")
            except (TypeError, ValueError) as exc:
                raise GenrewardError(f"remote reward: metadata must be JSON-serialisable to send it ({exc})") from None
            answer = self._request("POST", "/score", payload)
            batch_scores, batch_details = self._parse_scores(answer, end - start)
            if start and set(batch_details) != set(details):
                raise GenrewardError(f"reward server {self.url} returned different detail keys for different batches")
            scores.append(batch_scores)
            for key, value in batch_details.items():
                details.setdefault(key, []).append(value)
        if not scores:
            return RewardOutput(scores=torch.zeros(0, device=images.device), details={})
        return RewardOutput(
            scores=torch.cat(scores).to(images.device),
            details={k: torch.cat(v).to(images.device) for k, v in details.items()},
        )

    def _parse_scores(self, answer: Any, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        where = f"reward server {self.url}"
        if not isinstance(answer, dict) or "scores" not in answer:
            raise GenrewardError(f"{where} answered /score without 'scores'")
        scores = _floats(answer["scores"], n, f"{where}: 'scores'")
        if scores.ndim != 1:
            raise GenrewardError(f"{where}: 'scores' must be a flat list of {n} numbers")
        raw_details = answer.get("details") or {}
        if not isinstance(raw_details, dict):
            raise GenrewardError(f"{where}: 'details' must be an object")
        details = {str(k): _floats(v, n, f"{where}: details[{k!r}]") for k, v in raw_details.items()}
        return scores, details

    def _request(self, method: str, path: str, payload: bytes | None) -> Any:
        """One JSON request with retries; raises a one-line GenrewardError naming the URL."""
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._request_once(method, path, payload)
            except _Retryable as exc:
                last = str(exc)
                log.debug("remote reward %s%s attempt %d/%d: %s", self.url, path, attempt + 1, attempts, last)
        tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
        raise GenrewardError(f"reward server {self.url} failed ({method} {path}, {tries}): {last}")

    def _request_once(self, method: str, path: str, payload: bytes | None) -> Any:
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=payload, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            message = self._error_message(exc)
            if 400 <= exc.code < 500:
                raise GenrewardError(f"reward server {self.url} rejected {method} {path} (HTTP {exc.code}): {message}") from None
            raise _Retryable(f"HTTP {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _Retryable(_describe(exc, self.timeout)) from None
        try:
            return json.loads(body)
        except ValueError:
            raise GenrewardError(f"reward server {self.url} answered {method} {path} with something that is not JSON") from None

    def _error_message(self, exc: urllib.error.HTTPError) -> str:
        """The server's ``{"error": ...}`` message, or the HTTP reason when the body is not ours."""
        try:
            data = json.loads(exc.read())
            message = data["error"] if isinstance(data, dict) and "error" in data else exc.reason
        except Exception:  # body unreadable or not JSON: fall back to the status line
            message = exc.reason
        finally:
            exc.close()
        return " ".join(str(message).split())
