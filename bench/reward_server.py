"""``genreward serve-reward`` against the in-process reward and against the old stdlib server, side by side.

Each server runs in a subprocess, as it would in practice: the current one (``python -m genreward
serve-reward``) and, unless ``--no-legacy``, the stdlib ``http.server`` implementation it replaced,
read from git (``--legacy-ref``, the last commit that had it) into a temporary folder and run from
there, with the same reward and flags; the servers run side by side. Three measurements on each:

1. batch throughput: one client scores the same batch, in alternating repetitions with the
   in-process reward (run on one worker thread, as the servers' are, so only the transport differs);
2. load: ``--clients`` concurrent clients send ``--requests`` requests of ``--load-batch`` images in
   all (a new connection each, as the ``remote`` client does), the servers taking turns in 5 rounds
   so that both see the same machine noise; every answer is checked against the in-process scores;
   p50/p99/max latency and requests/s;
3. decompression bombs: ``--bombs`` concurrent requests whose PNG (≈190 KB) declares 8000×8000 RGB
   pixels; the server's peak RSS (VmHWM from /proc) before and after, and the status codes.

Last line: ``throughput ratio (new / legacy): batch X, load Y``.

    python bench/reward_server.py                                   # clip_score (tiny:clip), 64x64, batch 32
    python bench/reward_server.py --reward jpeg_compressibility --requests 2000 --bombs 0
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from PIL import Image

from genreward.rewards import build
from genreward.rewards.remote import RemoteReward, encode_png

ROOT = Path(__file__).resolve().parents[1]
LEGACY_REF = "01b4198310df7143987f7d3d42dd359781b083a3"  # the last commit with the stdlib http.server implementation

LEGACY_RUNNER = """
import importlib.util, sys
path, config, max_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = importlib.util.spec_from_file_location("legacy_serve", path)
module = importlib.util.module_from_spec(spec)
sys.modules["legacy_serve"] = module
spec.loader.exec_module(module)
sys.exit(module.serve_reward(config, port=0, max_batch=max_batch))
"""


def start(command: list[str], workdir: Path) -> tuple[subprocess.Popen, str]:
    """Launch a server command that prints its URL; return the process and the URL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 300
    seen = []
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line.rstrip())
        match = re.search(r"http://\S+:\d+", line)
        if match:
            proc.log = lines  # type: ignore[attr-defined]
            return proc, match.group(0)
    proc.kill()
    raise SystemExit("reward server did not start:\n" + "\n".join(seen))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json", "Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def close(got: list, want: list, atol: float = 1e-5) -> bool:
    """Scores equal up to float noise from batching (exact for rewards such as jpeg_compressibility)."""
    return len(got) == len(want) and all(g is not None and abs(g - w) <= atol for g, w in zip(got, want))


def bomb_body() -> bytes:
    """A ≈190 KB PNG that declares 8000×8000 RGB pixels (all zero) — 192 MB once decoded."""
    buffer = io.BytesIO()
    Image.new("RGB", (8000, 8000)).save(buffer, format="PNG", compress_level=9)
    return json.dumps({"prompts": ["bomb"], "images": [base64.b64encode(buffer.getvalue()).decode()]}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="clip_score", help="registered reward name")
    parser.add_argument("--options", default=None, help="reward options as YAML (default for clip_score: {model: tiny:clip})")
    parser.add_argument("--batch", type=int, default=32, help="images per request in the batch-throughput part")
    parser.add_argument("--size", type=int, default=64, help="image height = width")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000, help="requests in the load part, over all clients")
    parser.add_argument("--load-batch", type=int, default=4, help="images per request in the load part")
    parser.add_argument("--bombs", type=int, default=4, help="concurrent decompression-bomb requests (0: skip)")
    parser.add_argument("--legacy-ref", default=LEGACY_REF, help="git revision whose genreward/serve.py is the old server")
    parser.add_argument("--legacy-file", default=None, help="an old serve.py to run instead of reading it from git")
    parser.add_argument("--no-legacy", action="store_true", help="measure the current server only")
    args = parser.parse_args()

    if args.options is not None:
        options = yaml.safe_load(args.options) or {}
    else:
        options = {"model": "tiny:clip"} if args.reward == "clip_score" else {}
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=g).float() / 255.0
    prompts = [f"a photo of animal number {i}" for i in range(args.batch)]
    local = build(args.reward, **options)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-worker")

    # The load part's requests, and the scores the in-process reward gives them.
    n_bodies = 16
    load_images = [torch.randint(0, 256, (args.load_batch, 3, args.size, args.size), generator=g).float() / 255.0 for _ in range(n_bodies)]
    load_prompts = [[f"load {i} {k}" for k in range(args.load_batch)] for i in range(n_bodies)]
    load_bodies = [json.dumps({"prompts": p, "images": encode_png(x)}).encode() for x, p in zip(load_images, load_prompts)]
    with torch.no_grad():
        expected = [worker.submit(lambda x=x, p=p: local(x, p).scores.tolist()).result() for x, p in zip(load_images, load_prompts)]
    bomb = bomb_body() if args.bombs else b""

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "serve.yaml"
        config.write_text(yaml.safe_dump({"output_dir": str(Path(tmp) / "out"), "reward": [{"name": args.reward, "options": options}]}))
        commands = {"new": [sys.executable, "-m", "genreward", "serve-reward", str(config), "--port", "0", "--max-batch", str(args.batch)]}
        if not args.no_legacy:
            legacy = Path(tmp) / "legacy_serve.py"
            if args.legacy_file:
                legacy.write_text(Path(args.legacy_file).read_text())
            else:
                shown = subprocess.run(["git", "show", f"{args.legacy_ref}:genreward/serve.py"], cwd=ROOT, capture_output=True, text=True)
                if shown.returncode != 0:
                    raise SystemExit(f"cannot read the legacy server from git ({shown.stderr.strip()}); pass --legacy-file or --no-legacy")
                legacy.write_text(shown.stdout)
            runner = Path(tmp) / "legacy_runner.py"
            runner.write_text(LEGACY_RUNNER)
            commands = {"legacy": [sys.executable, str(runner), str(legacy), str(config), str(args.batch)], **commands}
        print(
            f"reward={args.reward} options={options} size={args.size}x{args.size} batch={args.batch} reps={args.reps} | "
            f"load: {args.clients} clients x {args.requests} requests of {args.load_batch} images | bombs: {args.bombs}",
            flush=True,
        )
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        try:
            for label, command in commands.items():
                servers[label] = start(command, Path(tmp))
                results[label] = {}
            measure_batches(servers, results, args, images, prompts, local, worker)
            measure_load(servers, results, args, load_bodies, expected)
            for label, (proc, url) in servers.items():  # one server at a time: the legacy one may take gigabytes
                measure_bombs(label, proc, url, results[label], args, bomb)
        finally:
            for label, (proc, _) in servers.items():
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log = []
                while not proc.log.empty():  # type: ignore[attr-defined]
                    log.append(proc.log.get_nowait())  # type: ignore[attr-defined]
                results[label]["tracebacks"] = sum("Traceback" in line for line in log)
    worker.shutdown()

    print()
    labels = list(results)
    rows = [
        ("in-process ms/batch", "local_ms", "{:.1f}"),
        ("server ms/batch", "remote_ms", "{:.1f}"),
        ("batch images/s", "batch_ips", "{:.0f}"),
        ("server / in-process time", "ratio", "{:.2f}"),
        ("load requests/s", "load_rps", "{:.1f}"),
        ("load p50 ms", "p50", "{:.1f}"),
        ("load p99 ms", "p99", "{:.1f}"),
        ("load max ms", "max", "{:.0f}"),
        ("load answers correct", "correct", "{:.0f}"),
        ("peak RSS before bombs MB", "rss_before", "{:.0f}"),
        ("peak RSS after bombs MB", "rss_after", "{:.0f}"),
        ("bomb statuses", "bomb_statuses", "{}"),
        ("tracebacks in the server log", "tracebacks", "{:.0f}"),
    ]
    print(f"{'':32}" + "".join(f"{label:>16}" for label in labels))
    for title, key, fmt in rows:
        print(f"{title:32}" + "".join(f"{fmt.format(results[label].get(key, float('nan'))):>16}" for label in labels))
    if "legacy" in results:
        batch = results["new"]["batch_ips"] / results["legacy"]["batch_ips"]
        load = results["new"]["load_rps"] / results["legacy"]["load_rps"]
        print(f"throughput ratio (new / legacy): batch {batch:.2f}, load {load:.2f}")


def measure_batches(servers, results, args, images, prompts, local, worker) -> None:
    """One client, one batch: the in-process reward and every server in alternating repetitions."""

    def run_local() -> None:
        def score() -> None:
            with torch.no_grad():
                local(images, prompts).scores.tolist()

        worker.submit(score).result()

    runs = {"in-process": run_local}
    for label, (_, url) in servers.items():
        remote = RemoteReward(url=url, batch_size=args.batch, timeout=120)
        runs[label] = lambda remote=remote: remote(images, prompts)
    for fn in runs.values():
        fn()  # warm-up: caches, lazy model parts, first connection
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(args.reps):
        for label, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    local_t = statistics.median(times["in-process"])
    for label in servers:
        t = statistics.median(times[label])
        results[label].update(local_ms=local_t * 1000, remote_ms=t * 1000, batch_ips=args.batch / t, ratio=t / local_t)


def measure_load(servers, results, args, load_bodies, expected, rounds: int = 5) -> None:
    """``args.clients`` concurrent clients; the servers take turns in ``rounds`` rounds (same noise for all)."""
    per_round = max(1, args.requests // rounds)
    stats = {label: {"latencies": [], "wall": 0.0, "wrong": []} for label in servers}
    for _ in range(rounds):
        for label, (_, url) in servers.items():
            latencies, wrong, wall = load_round(url, args.clients, per_round, load_bodies, expected)
            stats[label]["latencies"] += latencies
            stats[label]["wrong"] += wrong
            stats[label]["wall"] += wall
    for label, s in stats.items():
        latencies = sorted(s["latencies"])
        results[label].update(
            load_rps=len(latencies) / s["wall"],
            p50=1000 * latencies[len(latencies) // 2],
            p99=1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            max=1000 * latencies[-1],
            correct=len(latencies) - len(s["wrong"]),
        )
        if s["wrong"]:
            print(f"{label}: {len(s['wrong'])} wrong answers, first: {s['wrong'][0]}")


def load_round(url, clients, requests, bodies, expected) -> tuple[list[float], list[str], float]:
    latencies: list[float] = []
    wrong: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            k = i % len(bodies)
            start = time.perf_counter()
            try:
                status, body = post(url, bodies[k])
            except OSError as exc:
                status, body = 0, str(exc).encode()
            elapsed = time.perf_counter() - start
            ok = status == 200 and close(json.loads(body)["scores"], expected[k])
            with lock:
                latencies.append(elapsed)
                if not ok:
                    wrong.append(f"request {i}: HTTP {status} {body[:200]!r}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, wrong, time.perf_counter() - start


def measure_bombs(label, proc, url, out, args, bomb) -> None:
    """``args.bombs`` concurrent bomb requests; peak RSS of the server before and after."""
    out["rss_before"] = peak_rss_mb(proc.pid)
    if not args.bombs:
        return
    with ThreadPoolExecutor(args.bombs) as pool:
        statuses = list(pool.map(lambda _: post(url, bomb)[0], range(args.bombs)))
    out["rss_after"] = peak_rss_mb(proc.pid)
    out["bomb_statuses"] = ",".join(sorted(set(map(str, statuses))))
    assert RemoteReward(url=url, timeout=30).health()["status"] == "ok"
    proc.terminate()  # free what it took before the next server's turn


if __name__ == "__main__":
    main()
