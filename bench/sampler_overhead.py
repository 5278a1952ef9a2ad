"""Wall time of genreward's trajectory sampler vs diffusers' ``StableDiffusionPipeline.__call__``.

Both run the same DDIM scheduler, steps, guidance, η and batch, alternately in one process, so the
ratio is measured side by side. The sampler additionally records every latent and per-step
log-probability (what the trainers need). Last line: ``ratio: <sampler / pipeline>`` (median times).

    python bench/sampler_overhead.py                 # tiny:sd on CPU
    python bench/sampler_overhead.py --full-size     # SD-1.5 architecture, random weights (GPU, bf16)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from genreward.models import load_pipeline
from genreward.sampling import make_generators, sample_trajectories


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="SD-1.5 architecture with random weights (for a GPU)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 (default: bf16 for --full-size, else fp32)")
    args = parser.parse_args()

    spec = "random:sd15" if args.full_size else "tiny:sd"
    dtype = args.dtype or ("bf16" if args.full_size else "fp32")
    steps = args.steps or (50 if args.full_size else 20)
    batch = args.batch or (8 if args.full_size else 8)
    reps = args.reps or (5 if args.full_size else 7)
    pipe = load_pipeline(spec, device=args.device, dtype=dtype)
    device = pipe.unet.device
    prompts = [f"a photo of animal number {i}" for i in range(batch)]
    seeds = list(range(batch))
    print(f"model={spec} device={device} dtype={dtype} steps={steps} batch={batch} guidance={args.guidance} eta={args.eta}")

    def run_sampler() -> None:
        sample_trajectories(pipe, prompts, num_steps=steps, guidance_scale=args.guidance, eta=args.eta, seeds=seeds)

    def run_pipeline() -> None:
        pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=args.guidance,
            eta=args.eta,
            generator=make_generators(seeds, device),
            output_type="pt",
        )

    for fn in (run_sampler, run_pipeline):  # warm-up (kernels, allocator)
        fn()
    _sync(device)
    times: dict[str, list[float]] = {"sampler": [], "pipeline": []}
    for rep in range(reps):
        order = [("sampler", run_sampler), ("pipeline", run_pipeline)]
        if rep % 2:
            order.reverse()
        for name, fn in order:
            _sync(device)
            start = time.perf_counter()
            with torch.inference_mode():
                fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:9s} median {statistics.median(values):.4f}s  min {min(values):.4f}s  runs {len(values)}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    ratio = statistics.median(times["sampler"]) / statistics.median(times["pipeline"])
    print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
