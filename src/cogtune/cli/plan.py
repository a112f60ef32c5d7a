"""`cogtune plan CONFIG [--gpu-memory 24GB] [key=value ...]`: the memory table of a run and the cheapest switches
that fit a GPU."""

from __future__ import annotations

import argparse

HELP = "predict peak GPU and host memory of a run; propose switches that fit a GPU"


def _run(args) -> None:
    from ..config import load_config
    from ..plan.memory import plan_memory
    from ..plan.report import format_plan, format_proposal, parse_size

    cfg = load_config(args.config, [*args.overrides, *args.late_overrides])
    gpu = parse_size(args.gpu_memory) if args.gpu_memory else None
    plan = plan_memory(cfg, args.variant, gpu, world_size=args.world_size)
    print(format_plan(plan))
    if gpu is not None:
        print(format_proposal(plan))


class _ValueThenOverrides(argparse.Action):
    """`--gpu-memory 24GB lora.rank=16`: the first value is the option's, the rest are key=value overrides (argparse
    cannot give positionals back once an option came between them)."""

    def __call__(self, parser, namespace, values, option_string=None):
        value, *rest = values
        setattr(namespace, self.dest, self.type(value) if self.type else value)
        namespace.late_overrides = [*getattr(namespace, "late_overrides", []), *rest]


def register(sub) -> None:
    from .argtypes import int_range

    p = sub.add_parser("plan", help=HELP)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    extra = dict(nargs="+", action=_ValueThenOverrides)
    p.add_argument("--gpu-memory", metavar="SIZE", help="e.g. 24GB, 48GB, 80GB: propose the cheapest switches that fit",
                   **extra)
    p.add_argument("--variant", help="plan for this variant (default: model.variant or the model folder's configs)",
                   **extra)
    p.add_argument("--world-size", type=int_range(1, 65536), help="processes in all (default: $WORLD_SIZE or 1)",
                   **extra)
    p.set_defaults(func=_run, late_overrides=[])
