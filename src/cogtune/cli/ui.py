"""`cogtune ui`: the Gradio web page (infer/ui_app.py)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

HELP = "a web UI (Gradio) to generate and compare videos"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _run(args) -> None:
    from ..errors import CogtuneError

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CogtuneError("cogtune ui needs Gradio, which is not installed: pip install 'cogtune[ui]'") from None
    from ..export.adapters import parse_loras
    from ..infer.ui_app import launch
    from ..infer.ui_jobs import Pick, Studio, adapter_name
    from ..infer.ui_library import Library

    if not (args.model or args.models_dir):
        raise CogtuneError("give --models-dir DIR (a folder holding diffusers pipeline folders) or --model DIR")
    specs = parse_loras(args.lora)
    library = Library(args.models_dir, args.loras_dir, [args.model] if args.model else [], [s.path for s in specs])
    if args.model:
        from ..models import resolve_variant

        resolve_variant(Path(args.model))  # a folder that is no pipeline cogtune knows: one line now
    options = dict(dtype=args.dtype, cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling,
                   vae_slicing=args.vae_slicing)
    studio = Studio(library, args.out_dir, options)
    picks = [Pick(s.path.resolve(), s.weight, s.name if "@" in text else adapter_name(s.path))
             for s, text in zip(specs, args.lora)]
    if args.host not in LOOPBACK:
        print(f"warning: listening on {args.host}: anyone who can reach it can run jobs on this machine and see "
              "the model and adapter folders it serves", file=sys.stderr)
    if args.share:
        print("warning: --share makes a public gradio.live link to this machine", file=sys.stderr)

    def stop(signum, frame):  # Ctrl-C or a service manager's SIGTERM, whatever a library set meanwhile
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # before the server starts: a signal at once also ends cleanly
        signal.signal(sig, stop)
    try:
        app, url = launch(studio, args.host, args.port, Path(args.model).resolve() if args.model else None, picks,
                          args.share, args.debug)
        print(f"cogtune ui at {url} (outputs in {studio.out_dir.resolve()}); Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    # a job still running would keep the interpreter from exiting (its torch threads): stop now, and leave no
    # half-written file behind (finished ones were renamed into place)
    for tmp in Path(args.out_dir).glob(".*.tmp.*"):
        tmp.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def register(sub) -> None:
    from .argtypes import int_range
    from .common import add_sampling_args

    u = sub.add_parser("ui", help=HELP, description="A Gradio page to generate and compare videos. It opens only "
                       "models and adapters found under the folders named here.")
    u.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="folder holding diffusers pipeline folders (searched 4 levels deep), repeatable")
    u.add_argument("--loras-dir", action="append", default=[], metavar="DIR",
                   help="folder holding LoRA files or cogtune runs (lora/, checkpoint-N/), repeatable")
    u.add_argument("--model", help="one pipeline folder (also offered; chosen first)")
    add_sampling_args(u)
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    u.add_argument("--port", type=int_range(1, 65535), default=7860)
    u.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    u.add_argument("--out-dir", default="cogtune_ui", help="where videos and their records are written")
    u.set_defaults(func=_run)
