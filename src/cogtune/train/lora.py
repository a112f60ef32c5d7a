"""LoRA through peft, saved in the diffusers format so that stock `load_lora_weights` restores the trained scale.

diffusers reads the adapter's LoraConfig from the safetensors metadata key `lora_adapter_metadata` (keys prefixed with
`transformer.`); without it, it assumes alpha = rank and loads at scale 1.0 — the official trainer's silent 2× error.
We always write it, plus `cogtune.*` keys that say what the LoRA was trained on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from .. import __version__
from ..export.shards import new_file_mode, save_safetensors

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer."


ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)  # what LoRA adapts here, and what diffusers loads back


def check_targets(transformer: torch.nn.Module, target_modules: list[str]) -> None:
    """Each name of `lora.target_modules` must match (peft's rule: the full name or its dotted tail) at least one
    module, and only Linear/Conv2d ones: peft skips a name that matches nothing whenever another one matches."""
    import re

    from ..errors import CogtuneError, bounded

    modules = dict(transformer.named_modules())
    for target in target_modules:
        hits = [name for name in modules if name == target or name.endswith("." + target)]
        if not hits:
            names = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n, m in modules.items()  # block index and above
                            if isinstance(m, ADAPTABLE)})
            raise CogtuneError(f"lora.target_modules: {bounded(target)!r} matches no module of the transformer; "
                               f"the Linear/Conv2d names are: {', '.join(names)}")
        bad = next((name for name in hits if not isinstance(modules[name], ADAPTABLE)), None)
        if bad is not None:
            raise CogtuneError(f"lora.target_modules: {bounded(target)!r} matches {bad}, a "
                               f"{type(modules[bad]).__name__}; LoRA adapts Linear and Conv2d modules only: "
                               "name the Linear layers inside it instead")


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0):
    from peft import LoraConfig  # here: a refused run should not pay peft's import

    check_targets(transformer, target_modules)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout, init_lora_weights=True
    )
    transformer.add_adapter(config)
    for name, p in transformer.named_parameters():
        p.requires_grad_("lora_" in name)
    return config


def lora_state_dict(transformer: torch.nn.Module, full_state: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights in diffusers keys; `full_state`: the model's gathered state dict under ZeRO-3/FSDP2."""
    from peft import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(transformer, state_dict=full_state)
    return {PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.items()}


def save_lora(transformer: torch.nn.Module, out_dir: str | Path, info: dict, full_state: dict | None = None) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` atomically; `info` goes into `cogtune.*` metadata. A failed
    write leaves neither a temp file nor a `out_dir` it created."""
    out_dir = Path(out_dir)
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_cfg = transformer.peft_config["default"].to_dict()
    peft_cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_cfg.items()}
    metadata = {
        "format": "pt",
        DIFFUSERS_METADATA_KEY: json.dumps({PREFIX + k: v for k, v in peft_cfg.items()}, indent=2, sort_keys=True),
        "cogtune.version": __version__,
        "cogtune.rank": str(peft_cfg["r"]),
        "cogtune.alpha": str(peft_cfg["lora_alpha"]),
        "cogtune.target_modules": json.dumps(sorted(peft_cfg["target_modules"])),
    }
    metadata |= {f"cogtune.{k}": str(v) for k, v in info.items()}
    final = out_dir / WEIGHT_NAME
    tmp = out_dir / f".{WEIGHT_NAME}.tmp"
    try:  # safetensors writes 0600; a LoRA is made to be shared (e.g. a ComfyUI server)
        save_safetensors(lora_state_dict(transformer, full_state), tmp, metadata, mode=new_file_mode())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if made:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return final


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
