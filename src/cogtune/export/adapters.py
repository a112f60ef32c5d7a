"""LoRA adapters as the commands take them: `PATH[:WEIGHT][@NAME]`, each checked before anything loads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import CogtuneError


@dataclass
class LoraSpec:
    path: Path
    weight: float = 1.0
    name: str | None = None

    @classmethod
    def parse(cls, text: str, index: int = 0) -> "LoraSpec":
        """`PATH[:WEIGHT][@NAME]`; PATH is a LoRA file or a folder holding one (diffusers or ComfyUI format)."""
        from .lora_formats import resolve_lora_path

        given, name = text, None
        if "@" in text:
            text, name = text.rsplit("@", 1)
        weight = 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                weight, text = float(tail), head
            except ValueError:
                if Path(head).exists() and not Path(text).exists():
                    raise CogtuneError(f"--lora {given}: weight {tail!r} is not a number; write PATH:WEIGHT, "
                                       f"e.g. {head}:0.8") from None
        if not math.isfinite(weight):
            raise CogtuneError(f"--lora {given}: weight {weight} is not a finite number")
        if name is not None and (not name or not name.replace("_", "").replace("-", "").isalnum()):
            raise CogtuneError(f"--lora ...@{name}: an adapter name uses letters, digits, '_' and '-' only")
        return cls(resolve_lora_path(text), weight, name or f"lora{index}")


def lora_argument(text: str) -> str:
    """argparse type of `--lora PATH[:WEIGHT][@NAME]`: a weight that is a number must be finite (checked while the
    command line is parsed); the path is resolved later, by `LoraSpec.parse`."""
    import argparse

    head, sep, tail = text.rsplit("@", 1)[0].rpartition(":")
    try:
        weight = float(tail) if sep and head else 1.0
    except ValueError:
        return text  # not a weight: PATH may hold ':' itself
    if not math.isfinite(weight):
        raise argparse.ArgumentTypeError(f"weight {tail} of {text} is not a finite number; write PATH:WEIGHT, "
                                         f"e.g. {head}:0.8")
    return text


def parse_loras(texts: Sequence[str]) -> list[LoraSpec]:
    specs = [LoraSpec.parse(text, i) for i, text in enumerate(texts)]
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise CogtuneError(f"--lora: adapter name {dup!r} is given twice; name them apart with PATH@NAME")
    return specs
