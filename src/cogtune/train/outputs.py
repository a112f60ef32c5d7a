"""What a finished run leaves behind: a diffusers LoRA, or a diffusers `transformer/` folder (+ optional pipeline)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..config import STRATEGIES
from ..dtypes import DTYPES
from ..errors import CogtuneError, os_error_text

log = logging.getLogger("cogtune")



def export_pipeline_folder(base: Path, transformer_dir: Path, out: Path) -> Path:
    """A pipeline folder whose untouched components are symlinks into the base model (copies where links fail)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _fill_pipeline_folder(base, transformer_dir, tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _fill_pipeline_folder(base: Path, transformer_dir: Path, tmp: Path) -> None:
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


def full_state_dict(accelerator, model, fsdp2: bool) -> dict[str, torch.Tensor] | None:
    """The whole transformer's weights on the main process (a collective: every rank must call it)."""
    if fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = accelerator.get_state_dict(model)  # gathers ZeRO-3 partitions
    return state if accelerator.is_main_process else None


def save_outputs(accelerator, model, spec, cfg, step: int, out: Path | None = None) -> dict[str, Path]:
    """Call on every rank; only the main process writes (into `out`, by default the output_dir)."""
    out = Path(out or cfg.output_dir)
    unwrapped = accelerator.unwrap_model(model)
    info = {"variant": spec.variant_name, "base_model": str(Path(cfg.model.path).resolve()), "method": cfg.method,
            "frames": cfg.data.frames, "height": cfg.data.height, "width": cfg.data.width, "steps": step}
    sharded = STRATEGIES[cfg.distributed.strategy].sharded and accelerator.num_processes > 1
    fsdp2 = cfg.distributed.strategy == "fsdp2" and accelerator.num_processes > 1
    state = full_state_dict(accelerator, model, fsdp2) if cfg.method == "sft" or sharded else None
    if not accelerator.is_main_process:
        return {}
    if cfg.method == "lora":
        from .lora import save_lora

        return {"lora": save_lora(unwrapped, out / "lora", info, full_state=state)}
    from ..export.shards import save_transformer_folder

    dtype = DTYPES[cfg.sft.save_dtype] if cfg.sft.save_dtype else None
    folder = save_transformer_folder(state, dict(unwrapped.config), out / "transformer", dtype=dtype,
                                     max_shard_size=cfg.sft.max_shard_size, overwrite=True)
    outputs = {"transformer": folder}
    if cfg.sft.export_pipeline:
        outputs["pipeline"] = export_pipeline_folder(Path(cfg.model.path), folder, out / "pipeline")
    return outputs


def rescue(error: OSError, attempts: list[tuple[str, object]], last_checkpoint: Path | None) -> CogtuneError:
    """The one line for a failed final save, after saving the weights elsewhere: `attempts` are (how to use it,
    a call that saves and returns where), tried in order until one works."""
    what = os_error_text(error, "saving the final outputs")
    for how, attempt in attempts:
        try:
            where = attempt()
        except OSError as e:
            log.warning("rescue save failed too: %s", os_error_text(e))
            continue
        return CogtuneError(f"{what}; the trained weights are safe in {where}: {how.format(where=where)}")
    keep = f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
    return CogtuneError(f"{what}; the weights could not be saved anywhere else either; {keep}")


def rescue_folders() -> list[Path]:
    """Where a rescue save goes when the output folder refuses: the system temp dir, then the home folder."""
    return [Path(tempfile.gettempdir()), Path.home()]


def save_rescue(accelerator, model, spec, cfg, step: int, parent: Path) -> Path:
    """The final outputs in a new folder under `parent`; returns the LoRA file (or the transformer folder)."""
    folder = Path(tempfile.mkdtemp(prefix="cogtune-rescue-", dir=parent))
    try:
        saved = save_outputs(accelerator, model, spec, cfg, step, out=folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return saved.get("lora") or saved["transformer"]
