"""Images/s of one reward in-process vs through ``genreward serve-reward`` on loopback.

The server runs in a subprocess (as it would in practice); both sides score the same batch, in
alternating repetitions, so the ratio is measured side by side. The in-process reward runs on one
worker thread, as the server's does, so both compute under the same threading conditions (on a busy
CPU, torch's intra-op threads behave very differently on the main thread) and only the transport
differs: PNG encoding, base64 + JSON, HTTP on loopback, decoding and the server's batching wait.
Last line: ``ratio: <remote / in-process time>`` (median times).

    python bench/reward_server.py                                   # clip_score, tiny:clip, 64x64, batch 32
    python bench/reward_server.py --reward jpeg_compressibility --size 256
"""

from __future__ import annotations

import argparse
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

from genreward.rewards import build
from genreward.rewards.remote import RemoteReward

ROOT = Path(__file__).resolve().parents[1]


def start_server(config: Path, workdir: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    """Launch ``python -m genreward serve-reward`` on a free loopback port; return it and its URL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "genreward", "serve-reward", str(config), "--port", "0", "--max-batch", str(max_batch)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
            return proc, match.group(0)
    proc.kill()
    raise SystemExit("reward server did not start:\n" + "\n".join(seen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="clip_score", help="registered reward name")
    parser.add_argument("--options", default=None, help="reward options as YAML (default for clip_score: {model: tiny:clip})")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="image height = width")
    parser.add_argument("--reps", type=int, default=10)
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
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "serve.yaml"
        config.write_text(yaml.safe_dump({"output_dir": str(Path(tmp) / "out"), "reward": [{"name": args.reward, "options": options}]}))
        proc, url = start_server(config, Path(tmp), max_batch=args.batch)
        try:
            remote = RemoteReward(url=url, batch_size=args.batch, timeout=120)
            print(f"reward={args.reward} options={options} batch={args.batch} size={args.size}x{args.size} reps={args.reps} server={url}")

            def score_local() -> None:
                with torch.no_grad():
                    local(images, prompts).scores.tolist()

            def run_local() -> None:
                worker.submit(score_local).result()

            def run_remote() -> None:
                remote(images, prompts)

            run_local(), run_remote()  # warm-up: caches, lazy model parts, first connection
            times: dict[str, list[float]] = {"in-process": [], "remote": []}
            for _ in range(args.reps):
                for label, fn in (("in-process", run_local), ("remote", run_remote)):
                    start = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - start)
        finally:
            proc.terminate()
            proc.wait(30)
            worker.shutdown()

    medians = {k: statistics.median(v) for k, v in times.items()}
    for label, t in medians.items():
        print(f"{label:>10}: {t * 1000:8.1f} ms/batch  {args.batch / t:8.1f} images/s")
    print(f"ratio: {medians['remote'] / medians['in-process']:.2f}")


if __name__ == "__main__":
    main()
