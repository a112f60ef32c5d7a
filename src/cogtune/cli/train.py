"""`cogtune train CONFIG [key=value ...] [--nproc N]`."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "train from a YAML config; key=value pairs override it"


def _launch_torchrun(args) -> None:
    """`cogtune train --nproc N`: re-run this command under torchrun on this node (N processes)."""
    import subprocess

    from ..train.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={free_port()}",
           "-m", "cogtune", *(["--debug"] if args.debug else []), "train", args.config, *args.overrides,
           *(["--unsafe-pickle"] if args.unsafe_pickle else [])]
    code = subprocess.call(cmd)
    if code:
        raise SystemExit(code)


def _run(args) -> None:
    from ..config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before any process starts
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_torchrun(args)
    from .. import pickles
    from ..train.loop import train

    pickles.allow_unsafe(args.unsafe_pickle)  # for resume's checkpoint files
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        # the other ranks have nothing left to write; skipping the interpreter's teardown avoids a rare abort
        # ("terminate called without an active exception") from threads of the process group's backend at exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if result.skipped:
        print(f"skipped {len(result.skipped)} clips:", *result.skipped, sep="\n  ")
    if result.interrupted:
        print(result.message or f"stopped at step {result.steps}; checkpoint: {result.checkpoint} "
              "(resume: latest continues it)")
        return  # exit 0: a requested stop that saved its work is not a failure
    saved = ", ".join(f"{k}: {v}" for k, v in result.outputs.items())
    print(f"trained {result.steps} steps on {result.clips} clips; {saved}")


class _HelpKeys(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        from .keys import print_keys

        print_keys()
        parser.exit(0)


def register(sub) -> None:
    from .argtypes import int_range
    from .common import add_unsafe

    tr = sub.add_parser("train", help=HELP)
    tr.add_argument("--help-keys", action=_HelpKeys, nargs=0, help="list every config key with its default and meaning")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*", metavar="key=value")
    tr.add_argument("--nproc", type=int_range(1, 1024), default=1, help="start N processes on this node with torchrun")
    add_unsafe(tr)
    tr.set_defaults(func=_run)
