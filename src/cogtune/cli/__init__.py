"""The `cogtune` command, one module per command here (each has `HELP` and `register(subparsers)`). A user's
mistake is one line on stderr and exit code 2; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

from ..errors import CogtuneError, one_line, os_error_text


class Parser(argparse.ArgumentParser):
    """argparse with cogtune's error format: one line naming the option and where to read more, exit 2."""

    def error(self, message: str):
        self.exit(2, f"cogtune: error: {one_line(message)} (see: {self.prog} --help)\n")


COMMANDS = ("tiny", "data", "train", "plan", "lora", "convert", "generate", "ui")  # each is a module here


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())  # argparse's own version action re-wraps the line
        parser.exit(0)


def version_line() -> str:
    """cogtune's version and those of the libraries that decide its outputs (read without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libs = ", ".join(f"{n} {of(n)}" for n in ("torch", "diffusers", "transformers", "peft", "accelerate"))
    return f"cogtune {__version__} ({libs}; python {sys.version.split()[0]})"


def _command_of(argv: list[str]) -> str | None:
    """The top-level command named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `command` only that command's (the others are listed, not built: a command's
    module is imported only when it runs, so `cogtune --help` and a refused config cost no torch import)."""
    p = Parser(prog="cogtune", description="Fine-tune video diffusion models; outputs load in stock diffusers.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action=_Version, nargs=0, help="show the versions of cogtune and its libraries")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")  # each module's top imports only the stdlib
        if command is None or command == name:
            module.register(sub)
        else:
            sub.add_parser(name, help=module.HELP, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print as escapes, never crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if "--debug" not in (sys.argv[1:] if argv is None else argv):
        # bitsandbytes (imported by diffusers when installed) warns about 4-bit CPU kernels cogtune never uses;
        # torchao (memory.nf4_weights) about optional CUDA kernels it did not load and enums torch registers
        for name in ("bitsandbytes", "torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
    given = sys.argv[1:] if argv is None else argv
    command = _command_of(given)
    parser = build_parser(command if command in COMMANDS else "")  # an unknown one: argparse names the choices
    try:  # a bad option is its one line and exit 2 (--help: exit 0), also for callers of main() in Python
        args, extra = parser.parse_known_args(argv)
        if getattr(args, "overrides", None) is not None:  # key=value pairs may come after options too
            args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
            extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads unless the user asks
    if not args.debug:  # their "Loading pipeline components" bars, once a command loads them (ours stay)
        os.environ["COGTUNE_QUIET_LIBRARIES"] = "1"
    start = time.perf_counter()
    try:
        args.func(args)
    except CogtuneError as e:
        if args.debug:
            raise
        print(f"cogtune: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cogtune: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, read-only, permissions, ...: the file and what to do, not a traceback
        if args.debug:
            raise
        print(f"cogtune: error: {one_line(os_error_text(e))}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours or a library's: still one line, and how to see more
        if args.debug:
            raise
        print(f"cogtune: internal error: {type(e).__name__}: {one_line(str(e))} "
              "(run with --debug for the traceback and please report it)", file=sys.stderr)
        return 1
    if args.debug:
        print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
