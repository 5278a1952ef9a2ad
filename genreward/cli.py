"""``genreward`` command line: train, eval, gallery.

User errors (:class:`GenrewardError`) print one line ``genreward: error: ...`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from genreward.errors import GenrewardError, RunInterrupted


def _cmd_eval(args: argparse.Namespace) -> int:
    from genreward.config import load_config, read_yaml
    from genreward.schema import EvalConfig

    if "dreambench" in read_yaml(args.config):  # subject-driven evaluation (DreamBench layout): genreward/dreambench.py
        from genreward.dreambench import DreamBenchConfig, run_dreambench

        return run_dreambench(load_config(args.config, DreamBenchConfig, args.overrides))
    config = load_config(args.config, EvalConfig, args.overrides)
    return run_eval(config)


def check_not_a_training_run(output_dir: str | Path, command: str) -> None:
    """Evaluation outputs (config.yaml, metrics.jsonl) would overwrite a training run's own files: refuse."""
    checkpoints = Path(output_dir) / "checkpoints"
    if checkpoints.is_dir() and any(p.name.startswith("checkpoint-") for p in checkpoints.iterdir()):
        raise GenrewardError(
            f"output_dir {output_dir} holds a training run (checkpoints/); `genreward {command}` would overwrite its "
            f"config.yaml and metrics.jsonl: write into another folder, e.g. output_dir={Path(output_dir) / 'eval' / 'manual'}"
        )


def run_eval(config) -> int:
    """Evaluate ``config.model`` on ``config.eval.prompts`` and write outputs + gallery.

    Every input is checked (output folder, prompts, rewards, model, image size) before anything is written, so a
    bad input leaves an earlier evaluation in ``output_dir`` as it was.
    """
    from genreward.config import check_output_dir, save_config
    from genreward.evaluation import evaluate
    from genreward.gallery import write_gallery
    from genreward.models import load_pipeline
    from genreward.prompts import load_prompts
    from genreward.rewards import build_from_spec
    from genreward.sampling import check_image_size

    start = time.perf_counter()
    out = check_output_dir(config.output_dir)
    check_not_a_training_run(out, "eval")
    items = load_prompts(config.eval.prompts)
    rewards = [build_from_spec(spec) for spec in config.eval.rewards]
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise GenrewardError(f"two rewards in eval.rewards share the name {next(n for n in names if names.count(n) > 1)!r}; "
                             "give one a 'label'")
    m = config.model
    pipe = load_pipeline(m.pipeline, device=m.device, dtype=m.dtype, lora=m.lora, unet=m.unet)
    check_image_size(pipe, config.sample.height, config.sample.width, prefix="sample.")
    save_config(config, out)
    result = evaluate(
        pipe,
        items,
        rewards,
        out,
        config.sample,
        images_per_prompt=config.eval.images_per_prompt,
        seed=config.eval.seed,
        eta=config.eval.eta,
    )
    if config.eval.gallery:
        gallery = write_gallery(out)
        print(f"gallery: {gallery}")
    print((out / "summary.md").read_text(encoding="utf-8"))
    summary = ", ".join(f"{k}={v:.4g}" for k, v in result.summary.items())
    print(f"evaluated {len(result.records)} images in {time.perf_counter() - start:.1f}s: {summary}")
    print(f"outputs: {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    """Dispatch on the config's ``trainer:`` key; works unchanged under ``accelerate launch``."""
    from genreward.config import check_output_dir

    config, train = _load_trainer_config(args.config, args.overrides)
    check_output_dir(config.output_dir)  # before any model loads
    start = time.perf_counter()
    result = train(config)
    print(f"trained in {time.perf_counter() - start:.1f}s; outputs: {config.output_dir}")
    for key, value in (result or {}).items():
        print(f"{key}: {value}")
    return 0


def _load_trainer_config(path: str, overrides: list[str]):
    from genreward.config import config_from_dict, parse_override, read_yaml
    from trainers import get_trainer

    data = read_yaml(path)
    name = data.get("trainer")
    for text in overrides:
        key, value = parse_override(text)
        if key == ["trainer"]:
            name = value
    if name is None:
        raise GenrewardError(f"{path}: missing required key 'trainer' (e.g. trainer: prdp)")
    config_cls, train = get_trainer(name)
    return config_from_dict(data, config_cls, overrides, source=str(path), default_name=Path(path).stem), train


def _cmd_check(args: argparse.Namespace) -> int:
    """The on-policy self-check: recorded vs recomputed log-probs and the first importance ratio; exit 1 when off-policy."""
    from trainers.check import check

    config, _ = _load_trainer_config(args.config, args.overrides)
    start = time.perf_counter()
    result = check(config, samples=args.samples)
    for line in result.lines():
        print(line)
    print(f"checked in {time.perf_counter() - start:.1f}s")
    return 0 if result.ok else 1


def _cmd_export(args: argparse.Namespace) -> int:
    """A run folder (newest verified checkpoint) or one checkpoint → diffusers pipeline / LoRA folder + model card."""
    from genreward.export import export

    start = time.perf_counter()
    out = export(args.source, args.out, lora_only=args.lora_only, ema=False if args.no_ema else None, base=args.base)
    what = "LoRA adapter" if args.lora_only else "pipeline"
    print(f"exported {what} to {out} in {time.perf_counter() - start:.1f}s (model card: {out / 'README.md'})")
    return 0


def _cmd_gallery(args: argparse.Namespace) -> int:
    from genreward.gallery import write_gallery

    path = write_gallery(args.run_dir, compare_dir=args.compare, out_path=args.out)
    print(f"gallery: {path}")
    return 0


def _cmd_best_of_n(args: argparse.Namespace) -> int:
    """Sample N images per prompt, keep the top k as reference images for pairwise judges/trainers."""
    from genreward.best_of_n import BestOfNConfig, run_best_of_n
    from genreward.config import check_output_dir, load_config

    config = load_config(args.config, BestOfNConfig, args.overrides)
    check_not_a_training_run(check_output_dir(config.output_dir), "best-of-n")  # before any model loads
    start = time.perf_counter()
    result = run_best_of_n(config)
    prompts = len({rec["prompt_index"] for rec in result.chosen})
    print(f"kept {len(result.chosen)} of {prompts * config.n} images ({config.ranking}, top {config.top_k} of {config.n}) "
          f"in {time.perf_counter() - start:.1f}s")
    print(f"references: {result.references}")
    print(f"gallery: {result.gallery}")
    return 0


def _cmd_serve_reward(args: argparse.Namespace) -> int:
    """Serve the config's reward over HTTP until Ctrl-C/SIGTERM (clients use the ``remote`` reward)."""
    from genreward.serve import serve_reward

    return serve_reward(
        args.config,
        args.overrides,
        host=args.host,
        port=args.port,
        allow_remote=args.allow_remote,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_body_mb=args.max_body_mb,
        max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        max_queue=args.max_queue,
        max_queue_mb=args.max_queue_mb,
        request_timeout=args.request_timeout,
        decode_threads=args.decode_threads,
        devices=args.devices,
        replicas=args.replicas,
    )


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: every error line starts ``genreward: error:`` (a subcommand's too,
    which argparse would start with ``genreward train: error:``), and the top level adds one line naming the commands."""

    def error(self, message: str):  # argparse's hook: print, then exit 2
        self.print_usage(sys.stderr)
        command = self.prog.partition(" ")[2]
        print(f"genreward: error: {command + ': ' if command else ''}{message}", file=sys.stderr)
        commands = [name for action in self._actions if isinstance(action, argparse._SubParsersAction) for name in action.choices]
        if not command and commands:
            print(f"genreward: commands: {', '.join(commands)} (run `genreward COMMAND --help` for one)", file=sys.stderr)
        sys.exit(2)


def _train_epilog() -> str:
    """The registered trainers, by name only (no trainer module is imported for the help)."""
    try:
        from trainers import TRAINERS
    except ImportError:  # an installation without the trainers package
        return ""
    return (
        f"trainers (the config's `trainer:` key): {', '.join(TRAINERS)}\n"
        "config reference: README.md, sections \"Train\" and \"Runs, checkpoints and resume\";\n"
        "the algorithms: docs/algorithms/; example configs: configs/ (e.g. configs/prdp_tiny_jpeg.yaml)\n"
    )


def build_parser() -> argparse.ArgumentParser:
    from genreward import __version__

    parser = _Parser(prog="genreward", description="Reward fine-tuning of visual generators.")
    parser.add_argument("--version", action="version", version=f"genreward {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with the config's trainer (prdp, ddpo, ...); also under accelerate launch",
                       epilog=_train_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. prdp.epochs=5 output_dir=/tmp/x")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("check", help="on-policy self-check of a training config: recorded vs recomputed log-probs, first ratio")
    p.add_argument("config", help="a prdp / ddpo / grpo / nft YAML config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.mixed_precision=bf16")
    p.add_argument("--samples", type=int, default=None, help="trajectories to sample (default: sample.batch_size)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("eval", help="evaluate a pipeline on a prompt set with rewards")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sample.num_steps=10 output_dir=/tmp/x")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("gallery", help="write a static HTML gallery for a run folder")
    p.add_argument("run_dir", help="folder written by `genreward eval`")
    p.add_argument("--compare", default=None, help="another run folder shown as the 'before' column")
    p.add_argument("--out", default=None, help="where to write the HTML (default: inside RUN_DIR)")
    p.set_defaults(func=_cmd_gallery)
    p = sub.add_parser("export", help="export a training run as a diffusers pipeline (LoRA fused) or LoRA + model card")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a training run folder (its newest verified checkpoint is used) or a checkpoints/checkpoint-<N> folder")
    p.add_argument("out", metavar="OUT", help="new (or empty) folder to write; README.md there is a hub-ready model card")
    p.add_argument("--lora-only", action="store_true",
                   help="write only the LoRA adapter (pytorch_lora_weights.safetensors, diffusers format) and the card")
    p.add_argument("--no-ema", action="store_true",
                   help="nft runs: export the trained LoRA instead of its eval-EMA (checkpoint-N/ema/, the default when present)")
    p.add_argument("--base", default=None,
                   help="base pipeline (default: model.pipeline of the run's config.yaml; needed for a checkpoint copied elsewhere)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("best-of-n", help="best-of-N reference images per prompt (for pairwise judges)")
    p.add_argument("config", help="YAML with model, sample, prompts, n, top_k, seed, reward, ranking")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. n=16 top_k=2 ranking=pairwise_wins")
    p.set_defaults(func=_cmd_best_of_n)

    p = sub.add_parser("serve-reward", help="serve a reward over HTTP for other processes (the `remote` reward)")
    p.add_argument("config", help="YAML with a `reward:` list of {name, options, weight}")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. reward.0.options.model=tiny:clip")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port (0 = any free port; the bound address is printed)")
    p.add_argument("--allow-remote", action="store_true", help="allow a --host that other machines can reach")
    p.add_argument("--max-batch", type=int, default=64, help="most images in one reward call")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to wait for more requests to batch")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body; larger ones get HTTP 413")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="most pixels (width x height, read from the PNG header before decoding) in one image; more: 413")
    p.add_argument("--max-request-pixels", type=int, default=32 * 1024 * 1024,
                   help="most pixels in all images of one request (also caps one reward call); more: 413")
    p.add_argument("--max-queue", type=int, default=64, help="requests admitted at once (reading to scoring); more get 503")
    p.add_argument("--max-queue-mb", type=float, default=2048.0,
                   help="memory admitted requests may hold (bodies + 3 bytes per decoded pixel); more get 503")
    p.add_argument("--request-timeout", type=float, default=50.0,
                   help="seconds from a request's arrival to its answer; later: 504 (408 if the body is that slow)")
    p.add_argument("--decode-threads", type=int, default=None, help="threads decoding JSON and PNG (default: min(4, CPUs))")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--devices", default=None, help="one replica (model copy) per CUDA device, e.g. 0,1; load-balanced")
    where.add_argument("--replicas", type=int, default=1, help="number of model copies, built where the config says")
    p.set_defaults(func=_cmd_serve_reward)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except RunInterrupted as exc:  # a clean stop on SIGINT/SIGTERM, with a checkpoint to resume from
        print(f"\ngenreward: {exc}", file=sys.stderr)  # on its own line, after any progress bar
        return exc.exit_code
    except GenrewardError as exc:
        print(f"genreward: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("genreward: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
