"""`cogtune tiny DIR --variant V`: a tiny random-weight pipeline folder (no download)."""

from __future__ import annotations

HELP = "write a tiny random-weight pipeline folder of a variant (no download)"


def _run(args) -> None:
    from ..models import write_tiny_pipeline

    path = write_tiny_pipeline(args.dir, args.variant, seed=args.seed)
    print(f"wrote tiny {args.variant} pipeline to {path}")


def register(sub) -> None:
    from ..models import all_variants
    from .argtypes import SEED

    t = sub.add_parser("tiny", help=HELP)
    t.add_argument("dir")
    t.add_argument("--variant", default="cogvideox-5b", choices=sorted(all_variants()))
    t.add_argument("--seed", type=SEED, default=0)
    t.set_defaults(func=_run)
