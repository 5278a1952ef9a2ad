"""Scoring throughput of the yes-token judge (``vlm_judge``): images/s without and with gradients.

Black-box use (PRDP/RPO) scores under no-grad; differentiable use (SDS/VLM3D, ReFL) back-propagates
d reward / d pixels. Both are timed on the same batch, after a warm-up, in one run.

    python bench/judge_throughput.py                 # tiny:qwen2.5-vl on CPU
    python bench/judge_throughput.py --full-size     # Qwen2.5-VL-3B architecture, random weights, bf16 (GPU)
    python bench/judge_throughput.py --model tiny:llava-effnet --size 64   # any vlm_judge model spec / folder
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from genreward.rewards import build


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model", default=None, help="judge spec or folder (default: tiny:qwen2.5-vl, or the 3B architecture)")
    args = parser.parse_args()
    model = args.model or ("random:qwen2.5-vl-3b" if args.full_size else "tiny:qwen2.5-vl")
    dtype = "bf16" if args.full_size else "fp32"
    size = args.size or (448 if args.full_size else 56)
    start = time.perf_counter()
    judge = build("vlm_judge", model=model, dtype=dtype, batch_size=args.batch, normalization="log_odds")
    print(f"model={model} dtype={dtype} batch={args.batch} image={size}x{size} built in {time.perf_counter() - start:.1f}s")
    device = judge.device if hasattr(judge, "device") else ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = [f"a photo of {n} red cubes on a table" for n in range(args.batch)]
    images = torch.rand(args.batch, 3, size, size, device=device)

    def no_grad() -> None:
        judge(images, prompts)

    def with_grad() -> None:
        x = images.clone().requires_grad_(True)
        judge(x, prompts).scores.sum().backward()

    results = {}
    for name, fn in (("no_grad", no_grad), ("with_grad", with_grad)):
        fn()  # warm-up
        times = []
        for _ in range(args.reps):
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times.append(time.perf_counter() - t0)
        results[name] = statistics.median(times)
        print(f"{name:9s} median {results[name] * 1000:.1f} ms/batch  {args.batch / results[name]:.1f} images/s")
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"ratio: {results['with_grad'] / results['no_grad']:.3f}")


if __name__ == "__main__":
    main()
