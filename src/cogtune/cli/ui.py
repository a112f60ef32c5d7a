"""`cogtune ui`: the local web page."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

HELP = "a small web UI for generate and compare"


def _run(args) -> None:
    from ..infer.webui import make_server

    options = dict(dtype=args.dtype, cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling,
                   vae_slicing=args.vae_slicing)
    server = make_server(args.host, args.port, args.model, args.lora, args.out_dir, options, verbose=args.debug)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach it can run jobs and read model folders",
              file=sys.stderr)
    print(f"cogtune ui at {server.url} (outputs in {Path(args.out_dir).resolve()}); Ctrl-C stops it", flush=True)

    def stop(signum, frame):  # Ctrl-C or a service manager's SIGTERM, whatever a library set meanwhile
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    # a job still running would keep the interpreter from exiting (its torch threads): stop now, and leave no
    # half-written video behind (finished ones were renamed into place)
    for tmp in Path(args.out_dir).glob(".*.tmp.*"):
        tmp.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def register(sub) -> None:
    from .common import add_sampling_args

    u = sub.add_parser("ui", help="a small local web page to generate and compare videos")
    u.add_argument("--model", help="model folder to prefill")
    add_sampling_args(u)
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--out-dir", default="cogtune_ui", help="where videos are written")
    u.set_defaults(func=_run)
