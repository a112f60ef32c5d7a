"""The `cogtune` command. A user's mistake is one line on stderr and exit code 2; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .errors import CogtuneError, one_line, os_error_text


def _cmd_tiny(args) -> None:
    from .models import write_tiny_pipeline

    path = write_tiny_pipeline(args.dir, args.variant, seed=args.seed)
    print(f"wrote tiny {args.variant} pipeline to {path}")


def _cmd_data_synth(args) -> None:
    from .data.synth import write_synth_dataset

    written = write_synth_dataset(args.dir, clips=args.clips, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {len(written)} clips to {args.dir} (prompts.txt, videos.txt, videos/)")


def _cmd_data_cache(args) -> None:
    from .config import load_config
    from .models import load_spec
    from .train.distributed import make_accelerator
    from .train.encode import cache_root, prepare_data
    from .train.memory import encoder_dtype

    cfg = load_config(args.config, args.overrides)
    accelerator = make_accelerator(cfg)  # under torchrun each rank encodes its own share
    enc = encoder_dtype(cfg, accelerator.device)
    spec = load_spec(cfg.model.path, cfg.model.variant, {"text_encoder": enc, "vae": enc, "transformer": enc})
    spec.set_vae_memory(slicing=cfg.memory.vae_slicing, tiling=cfg.memory.vae_tiling)
    spec.encoders_to(accelerator.device, enc, stream_text=cfg.memory.stream_text_encoder)
    data = prepare_data(spec, cfg, accelerator)
    if accelerator.is_main_process:
        print(f"cache {cache_root(cfg)}: {len(data.dataset)} clips ready, {len(data.skipped)} skipped; "
              f"{data.report.summary()}")


def _model_facts(model_cfg):
    """(fps, allowed frame counts) of a config's model for `data check`, or None without a folder or variant."""
    from .models import get_variant, resolve_variant

    if os.path.exists(model_cfg.path):  # the folder's own configs decide; a model.variant must agree with them
        v = resolve_variant(model_cfg.path, model_cfg.variant, weights=False)
    elif model_cfg.variant:
        v = get_variant(model_cfg.variant)
    else:
        return None
    return v.fps, v.allowed_frames()


def _launch_torchrun(args) -> None:
    """`cogtune train --nproc N`: re-run this command under torchrun on this node (N processes)."""
    import subprocess

    from .train.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={free_port()}",
           "-m", "cogtune", *(["--debug"] if args.debug else []), "train", args.config, *args.overrides,
           *(["--unsafe-pickle"] if args.unsafe_pickle else [])]
    code = subprocess.call(cmd)
    if code:
        raise SystemExit(code)


def _cmd_train(args) -> None:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before any process starts
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_torchrun(args)
    from . import pickles
    from .train.loop import train

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


class Parser(argparse.ArgumentParser):
    """argparse with cogtune's error format: one line naming the option and where to read more, exit 2."""

    def error(self, message: str):
        self.exit(2, f"cogtune: error: {one_line(message)} (see: {self.prog} --help)\n")


COMMANDS = {  # top-level command: its help line (the --help listing needs no module of any command)
    "tiny": "write a tiny random-weight pipeline folder of a variant (no download)",
    "data": "dataset tools",
    "train": "train from a YAML config; key=value pairs override it",
    "plan": "predict peak GPU and host memory of a run; propose switches that fit a GPU",
    "lora": "LoRA tools: convert between formats, merge into a model",
    "convert": "convert foreign checkpoints to diffusers",
    "generate": "generate a video (T2V or I2V) with optional LoRA adapters",
    "ui": "a small web UI for generate and compare",
}


def _register_tiny(sub) -> None:
    from .cli_types import SEED
    from .models import all_variants

    t = sub.add_parser("tiny", help=COMMANDS["tiny"])
    t.add_argument("dir")
    t.add_argument("--variant", default="cogvideox-5b", choices=sorted(all_variants()))
    t.add_argument("--seed", type=SEED, default=0)
    t.set_defaults(func=_cmd_tiny)


def _register_data(sub) -> None:
    from .cli_types import SEED, int_range
    from .data import check

    d = sub.add_parser("data", help=COMMANDS["data"]).add_subparsers(dest="data_command", required=True)
    s = d.add_parser("synth", help="write a small synthetic dataset of real H.264 clips (official layout)")
    s.add_argument("dir")
    s.add_argument("--clips", type=int_range(1, 10_000), default=8)
    s.add_argument("--seed", type=SEED, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_data_synth)
    c = d.add_parser("cache", help="encode every clip and caption of a training config into the latent cache")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*", metavar="key=value")
    c.set_defaults(func=_cmd_data_cache)
    check.register_cli(d, model_facts=_model_facts)


def _register_train(sub) -> None:
    from .cli_types import int_range
    from .pickles import add_unsafe_argument

    tr = sub.add_parser("train", help=COMMANDS["train"])
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*", metavar="key=value")
    tr.add_argument("--nproc", type=int_range(1, 1024), default=1, help="start N processes on this node with torchrun")
    add_unsafe_argument(tr)
    tr.set_defaults(func=_cmd_train)


def _register_plan(sub) -> None:
    from .plan import cli as plan_cli

    plan_cli.register_cli(sub)


def _register_lora(sub) -> None:
    from .export import lora_formats, merge

    lora_formats.register_cli(sub)
    merge.register_cli(sub)


def _register_convert(sub) -> None:
    from .export import fsdp, lora_formats, sat, zero

    sat.register_cli(sub)
    convert = lora_formats.cli_group(sub, "convert", COMMANDS["convert"])
    zero.register_cli(convert)
    fsdp.register_cli(convert)


def _register_generate(sub) -> None:
    from .infer import cli as generate_cli

    generate_cli.register_cli(sub)


def _register_ui(sub) -> None:
    from .infer import webui

    webui.register_cli(sub)


def _command_of(argv: list[str]) -> str | None:
    """The top-level command named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `command` only that command's (the others are listed, not built: a command's
    module is imported only when it runs, so `cogtune --help` and a refused config cost no torch import)."""
    p = Parser(prog="cogtune", description="Fine-tune video diffusion models; outputs load in stock diffusers.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        if command is None or command == name:
            globals()[f"_register_{name}"](sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print as escapes, never crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if "--debug" not in (sys.argv[1:] if argv is None else argv):
        # bitsandbytes (imported by diffusers when installed) warns about 4-bit CPU kernels cogtune never uses
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
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
