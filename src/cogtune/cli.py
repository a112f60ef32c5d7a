"""The `cogtune` command. A user's mistake is one line on stderr and exit code 2; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .errors import CogtuneError


def _cmd_tiny(args) -> None:
    from .models.tiny import write_tiny_pipeline

    path = write_tiny_pipeline(args.dir, args.variant, seed=args.seed)
    print(f"wrote tiny {args.variant} pipeline to {path}")


def _cmd_data_synth(args) -> None:
    from .data.synth import write_synth_dataset

    written = write_synth_dataset(args.dir, clips=args.clips, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {len(written)} clips to {args.dir} (prompts.txt, videos.txt, videos/)")


def _cmd_train(args) -> None:
    from .config import load_config
    from .train.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if result.skipped:
        print(f"skipped {len(result.skipped)} clips:", *result.skipped, sep="\n  ")
    print(f"trained {result.steps} steps on {result.clips} clips; LoRA: {result.lora_path}")


def _cmd_generate(args) -> None:
    from .infer.generate import generate

    path = generate(
        args.model, args.prompt, args.out, loras=args.lora or [], frames=args.frames, height=args.height,
        width=args.width, steps=args.steps, seed=args.seed, guidance_scale=args.guidance_scale, fps=args.fps,
    )
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    from .models.variants import VARIANTS

    p = argparse.ArgumentParser(prog="cogtune", description="Fine-tune CogVideoX models; outputs load in stock diffusers.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny", help="write a tiny random-weight pipeline folder of a variant (no download)")
    t.add_argument("dir")
    t.add_argument("--variant", default="cogvideox-5b", choices=sorted(VARIANTS))
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_tiny)

    d = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("synth", help="write a small synthetic dataset of real H.264 clips (official layout)")
    s.add_argument("dir")
    s.add_argument("--clips", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_data_synth)

    tr = sub.add_parser("train", help="train from a YAML config; key=value pairs override it")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*", metavar="key=value")
    tr.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="generate a video (T2V) with optional LoRA adapters")
    g.add_argument("--model", required=True, help="diffusers CogVideoX pipeline folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", required=True, help="output .mp4")
    g.add_argument("--lora", action="append", metavar="PATH[:WEIGHT][@NAME]", help="repeatable")
    g.add_argument("--frames", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--guidance-scale", type=float, default=6.0)
    g.add_argument("--fps", type=int)
    g.set_defaults(func=_cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads unless the user asks
    start = time.perf_counter()
    try:
        args.func(args)
    except CogtuneError as e:
        if args.debug:
            raise
        print(f"cogtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cogtune: interrupted", file=sys.stderr)
        return 130
    if args.debug:
        print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
