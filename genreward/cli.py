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


def run_eval(config) -> int:
    """Evaluate ``config.model`` on ``config.eval.prompts`` and write outputs + gallery."""
    from genreward.config import save_config
    from genreward.evaluation import evaluate
    from genreward.gallery import write_gallery
    from genreward.models import load_pipeline
    from genreward.prompts import load_prompts
    from genreward.rewards import build_from_spec

    start = time.perf_counter()
    out = Path(config.output_dir)
    save_config(config, out)
    items = load_prompts(config.eval.prompts)
    rewards = [build_from_spec(spec) for spec in config.eval.rewards]
    m = config.model
    pipe = load_pipeline(m.pipeline, device=m.device, dtype=m.dtype, lora=m.lora, unet=m.unet)
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
    from genreward.config import config_from_dict, parse_override, read_yaml
    from trainers import get_trainer

    data = read_yaml(args.config)
    name = data.get("trainer")
    for text in args.overrides:
        path, value = parse_override(text)
        if path == ["trainer"]:
            name = value
    if name is None:
        raise GenrewardError(f"{args.config}: missing required key 'trainer' (e.g. trainer: prdp)")
    config_cls, train = get_trainer(name)
    config = config_from_dict(data, config_cls, args.overrides, source=str(args.config), default_name=Path(args.config).stem)
    start = time.perf_counter()
    result = train(config)
    print(f"trained in {time.perf_counter() - start:.1f}s; outputs: {config.output_dir}")
    for key, value in (result or {}).items():
        print(f"{key}: {value}")
    return 0


def _cmd_gallery(args: argparse.Namespace) -> int:
    from genreward.gallery import write_gallery

    path = write_gallery(args.run_dir, compare_dir=args.compare, out_path=args.out)
    print(f"gallery: {path}")
    return 0


def _cmd_best_of_n(args: argparse.Namespace) -> int:
    """Sample N images per prompt, keep the top k as reference images for pairwise judges/trainers."""
    from genreward.best_of_n import BestOfNConfig, run_best_of_n
    from genreward.config import load_config

    config = load_config(args.config, BestOfNConfig, args.overrides)
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
    )


def build_parser() -> argparse.ArgumentParser:
    from genreward import __version__

    parser = argparse.ArgumentParser(prog="genreward", description="Reward fine-tuning of visual generators.")
    parser.add_argument("--version", action="version", version=f"genreward {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with the config's trainer (prdp, ddpo, ...); also under accelerate launch")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. prdp.epochs=5 output_dir=/tmp/x")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a pipeline on a prompt set with rewards")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sample.num_steps=10 output_dir=/tmp/x")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("gallery", help="write a static HTML gallery for a run folder")
    p.add_argument("run_dir", help="folder written by `genreward eval`")
    p.add_argument("--compare", default=None, help="another run folder shown as the 'before' column")
    p.add_argument("--out", default=None, help="where to write the HTML (default: inside RUN_DIR)")
    p.set_defaults(func=_cmd_gallery)

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
    p.set_defaults(func=_cmd_serve_reward)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except RunInterrupted as exc:  # a clean stop on SIGINT/SIGTERM, with a checkpoint to resume from
        print(f"genreward: {exc}", file=sys.stderr)
        return exc.exit_code
    except GenrewardError as exc:
        print(f"genreward: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("genreward: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
