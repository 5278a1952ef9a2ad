"""Wall time of genreward's trajectory sampler vs the family's own diffusers pipeline ``__call__``.

Both run the same scheduler, steps, guidance and batch, alternately in one process, so the ratio is measured
side by side. SD/SDXL: DDIM with η (the sampler records per-step log-probabilities when η > 0). SD3/FLUX: the
sampler's flow SDE step with noise level a (``--noise-level``; a = 0 is the pipeline's Euler step, so 0 compares
like with like, a > 0 adds the log-prob bookkeeping training needs) against ``StableDiffusion3Pipeline`` /
``FluxPipeline``. Last line: ``ratio: <sampler / pipeline>`` (median times).

    python bench/sampler_overhead.py                          # tiny:sd on CPU
    python bench/sampler_overhead.py --family sd3 --noise-level 0
    python bench/sampler_overhead.py --full-size              # SD-1.5 architecture, random weights (GPU, bf16)
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
    parser.add_argument("--full-size", action="store_true",
                        help="the family's full architecture with random weights (random:sd15/sdxl/sd35m/flux-dev; a GPU)")
    parser.add_argument("--family", choices=["sd", "sdxl", "sd3", "flux"], default="sd", help="tiny model of this family")
    parser.add_argument("--noise-level", type=float, default=0.0, help="flow families: a (0 = the pipeline's Euler step)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 (default: bf16 for --full-size, else fp32)")
    args = parser.parse_args()

    full_size = {"sd": "random:sd15", "sdxl": "random:sdxl", "sd3": "random:sd35m", "flux": "random:flux-dev"}
    spec = full_size[args.family] if args.full_size else f"tiny:{args.family}"
    dtype = args.dtype or ("bf16" if args.full_size else "fp32")
    steps = args.steps or (50 if args.full_size else 20)
    batch = args.batch or (8 if args.full_size else 8)
    reps = args.reps or (5 if args.full_size else 7)
    pipe = load_pipeline(spec, device=args.device, dtype=dtype)
    from genreward.models.families import family_of

    family = family_of(pipe)
    device = family.denoiser.device
    height, width = family.default_size()
    prompts = [f"a photo of animal number {i}" for i in range(batch)]
    seeds = list(range(batch))
    stochastic = f"eta={args.eta}" if family.kernel == "ddim" else f"noise_level={args.noise_level}"
    print(f"model={spec} family={family.name} device={device} dtype={dtype} steps={steps} batch={batch} "
          f"guidance={args.guidance} {stochastic}")

    def run_sampler() -> None:
        sample_trajectories(pipe, prompts, num_steps=steps, guidance_scale=args.guidance, eta=args.eta, seeds=seeds,
                            noise_level=args.noise_level)

    extra = {"eta": args.eta} if family.kernel == "ddim" else {}
    if family.name == "flux":
        extra.update(height=height, width=width)
    if family.name in ("sd3", "flux"):
        extra["max_sequence_length"] = family._max_sequence_length()
    if family.supports_negative_prompt:
        extra["negative_prompt"] = [""] * batch

    def run_pipeline() -> None:
        pipe(prompts, num_inference_steps=steps, guidance_scale=args.guidance,
             generator=make_generators(seeds, device), output_type="pt", **extra)

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
