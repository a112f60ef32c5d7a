"""Argument groups several commands share."""

from __future__ import annotations

import argparse

from .. import pickles
from .argtypes import float_range


def group(subparsers, name: str, help_text: str):
    """The sub-subparsers of top-level command `name` (`cogtune lora convert|merge`), created on first use."""
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help_text)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=f"{name}_command", required=True)


def add_unsafe(parser) -> None:
    parser.add_argument(pickles.FLAG, dest="unsafe_pickle", action="store_true", help=pickles.FLAG_HELP)


def lora_option(parser, **kwargs) -> None:
    from ..export.adapters import lora_argument

    parser.add_argument("--lora", action="append", metavar="PATH[:WEIGHT][@NAME]", type=lora_argument, **kwargs)


def add_sampling_args(p) -> None:
    """Arguments shared by `generate` and `ui` (the model's adapters and memory options)."""
    from ..infer.generate import DTYPES

    lora_option(p, default=[], help="LoRA file or folder, repeatable; WEIGHT defaults to 1.0, NAME to lora<i>")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 with CUDA, fp32 on the CPU")
    p.add_argument("--cpu-offload", action="store_true", help="keep idle parts on the CPU (CUDA only)")
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles (less memory at large sizes)")
    p.add_argument("--vae-slicing", action="store_true", help="decode one video at a time")


__all__ = ["group", "add_unsafe", "lora_option", "add_sampling_args", "float_range"]
