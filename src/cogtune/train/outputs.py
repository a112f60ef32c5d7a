"""What a finished run leaves behind: a diffusers LoRA, or a diffusers `transformer/` folder (+ optional pipeline)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .lora import save_lora

SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_pipeline_folder(base: Path, transformer_dir: Path, out: Path) -> Path:
    """A pipeline folder whose untouched components are symlinks into the base model (copies where links fail)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = json.loads((base / "model_index.json").read_text())
    shutil.copy2(base / "model_index.json", tmp / "model_index.json")
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        src = transformer_dir if name == "transformer" else base / name
        if not src.exists():
            continue
        try:
            os.symlink(src.resolve(), tmp / name, target_is_directory=True)
        except OSError:
            shutil.copytree(src, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def full_state_dict(accelerator, model, fsdp2: bool) -> dict[str, torch.Tensor] | None:
    """The whole transformer's weights on the main process (a collective: every rank must call it)."""
    if fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = accelerator.get_state_dict(model)  # gathers ZeRO-3 partitions
    return state if accelerator.is_main_process else None


def save_outputs(accelerator, model, spec, cfg, step: int) -> dict[str, Path]:
    """Call on every rank; only the main process writes."""
    out = Path(cfg.output_dir)
    unwrapped = accelerator.unwrap_model(model)
    info = {"variant": spec.variant_name, "base_model": str(Path(cfg.model.path).resolve()), "method": cfg.method,
            "frames": cfg.data.frames, "height": cfg.data.height, "width": cfg.data.width, "steps": step}
    sharded = cfg.distributed.strategy in ("zero3", "zero3_offload", "fsdp2") and accelerator.num_processes > 1
    fsdp2 = cfg.distributed.strategy == "fsdp2" and accelerator.num_processes > 1
    state = full_state_dict(accelerator, model, fsdp2) if cfg.method == "sft" or sharded else None
    if not accelerator.is_main_process:
        return {}
    if cfg.method == "lora":
        return {"lora": save_lora(unwrapped, out / "lora", info, full_state=state)}
    from ..export.shards import save_transformer_folder

    dtype = SAVE_DTYPES[cfg.sft.save_dtype] if cfg.sft.save_dtype else None
    folder = save_transformer_folder(state, dict(unwrapped.config), out / "transformer", dtype=dtype,
                                     max_shard_size=cfg.sft.max_shard_size, overwrite=True)
    outputs = {"transformer": folder}
    if cfg.sft.export_pipeline:
        outputs["pipeline"] = export_pipeline_folder(Path(cfg.model.path), folder, out / "pipeline")
    return outputs
