"""What a finished run leaves behind: a diffusers LoRA, or a diffusers `transformer/` folder (+ optional pipeline)."""

from __future__ import annotations

import functools
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
from ..export.lora_compat import DROP_INFO

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


@functools.lru_cache(maxsize=4)
def _base_fingerprint(transformer_dir: str) -> str:
    """Once per run, not at every checkpoint: the base model does not change under a run."""
    from ..data.cache import fingerprint_files

    return fingerprint_files([transformer_dir])


def run_info(spec, cfg, step: int) -> dict:
    """What a LoRA's `cogtune.*` metadata and the model cards record: no local paths (a LoRA is made to be shared),
    the base model by its published name and a content fingerprint of its transformer."""
    model = Path(cfg.model.path)
    return {"variant": spec.variant_name, "base_model": spec.facts.hub_id or model.resolve().name,
            "base_model_fingerprint": _base_fingerprint(str((model / "transformer").resolve())), "method": cfg.method,
            "frames": cfg.data.frames, "height": cfg.data.height, "width": cfg.data.width, "steps": step,
            **({"trigger": cfg.data.trigger} if cfg.data.trigger else {}),
            **positions_info(spec.facts)}


def positions_info(facts) -> dict:
    """For a model with a learned positional table: whether it was trained without it (`cogtune.drop_learned_positions`
    "true"/"false", which generate and merge follow); nothing for a model that has none."""
    return {DROP_INFO: "true" if facts.positions_dropped else "false"} if facts.size_lock_key else {}


def write_lora_files(unwrapped, folder: Path, info: dict, state: dict | None) -> dict[str, Path]:
    """The LoRA for every client: the diffusers file, and beside it the ComfyUI core one (where cogtune knows the
    family's ComfyUI names)."""
    from ..export.lora_formats import comfyui_copy
    from .lora import save_lora

    files = {"lora": save_lora(unwrapped, folder, info, full_state=state)}
    try:
        comfy = comfyui_copy(files["lora"])
    except CogtuneError as e:  # e.g. modules ComfyUI's model does not have: the diffusers file stands alone
        log.warning("no ComfyUI copy of the LoRA: %s", e)
        comfy = None
    if comfy is not None:
        files["lora_comfyui"] = comfy
    return files


def card_settings(cfg, info: dict, clips: int | None) -> dict:
    settings = {"method": cfg.method, "steps": info["steps"],
                "frames x height x width": f"{cfg.data.frames} x {cfg.data.height} x {cfg.data.width}",
                "learning rate": cfg.optimizer.lr, "optimizer": cfg.optimizer.name,
                "batch size x accumulation": f"{cfg.batch_size} x {cfg.gradient_accumulation_steps}",
                "mixed precision": cfg.mixed_precision, "seed": cfg.seed,
                "base model fingerprint": info["base_model_fingerprint"]}
    if info.get(DROP_INFO) == "true":
        settings["learned positional table"] = "dropped (model.drop_learned_positions): inference must drop it too"
    if cfg.method == "lora":
        settings |= {"rank / alpha": f"{cfg.lora.rank} / {cfg.lora.alpha:g}",
                     "target modules": ", ".join(cfg.lora.target_modules)}
    if clips is not None:
        settings["clips"] = clips
    if cfg.data.caption_dropout:
        settings["caption dropout"] = cfg.data.caption_dropout
    if "ema_decay" in info:
        settings["weights"] = (f"exponential moving average, decay {info['ema_decay']} (from step "
                               f"{cfg.ema.start_step}, every {cfg.ema.every})")
    return settings


def gathered_state(accelerator, model, cfg) -> dict[str, torch.Tensor] | None:
    """Every rank: the full state dict where the weights are sharded or the whole model is saved (main process
    only), else None (the unwrapped model holds them)."""
    sharded = STRATEGIES[cfg.distributed.strategy].sharded and accelerator.num_processes > 1
    fsdp2 = cfg.distributed.strategy == "fsdp2" and accelerator.num_processes > 1
    return full_state_dict(accelerator, model, fsdp2) if cfg.method == "sft" or sharded else None


def lora_files_into(accelerator, model, spec, cfg, step: int, folder: Path) -> None:
    """Every rank: this step's LoRA files into `folder` (a checkpoint being written), so any checkpoint-N is a LoRA
    as it is (`--lora checkpoint-N`, `load_lora_weights(checkpoint-N)`, ComfyUI)."""
    state = gathered_state(accelerator, model, cfg)
    if accelerator.is_main_process:
        write_lora_files(accelerator.unwrap_model(model), folder, run_info(spec, cfg, step), state)


def save_outputs(accelerator, model, spec, cfg, step: int, out: Path | None = None,
                 clips: int | None = None, suffix: str = "") -> dict[str, Path]:
    """Call on every rank; only the main process writes (into `out`, by default the output_dir: lora{suffix}/ or
    transformer{suffix}/, and pipeline/ for the plain weights)."""
    from ..export.model_card import write_model_card

    out = Path(out or cfg.output_dir)
    unwrapped = accelerator.unwrap_model(model)
    info = run_info(spec, cfg, step)
    state = gathered_state(accelerator, model, cfg)
    if not accelerator.is_main_process:
        return {}
    if suffix == "_ema":
        info["ema_decay"] = cfg.ema.decay
    card = dict(base_model=info["base_model"], hub_id=spec.facts.hub_id, variant=spec.variant_name,
                trigger=cfg.data.trigger, transformer_overrides=spec.facts.transformer_overrides(),
                i2v=spec.facts.i2v, method=cfg.method, settings=card_settings(cfg, info, clips))
    if cfg.method == "lora":
        outputs = write_lora_files(unwrapped, out / f"lora{suffix}", info, state)
        write_model_card(out / f"lora{suffix}", files=[p.name for p in outputs.values()], **card)
        return outputs
    from ..export.shards import save_transformer_folder

    dtype = DTYPES[cfg.sft.save_dtype] if cfg.sft.save_dtype else None
    folder = save_transformer_folder(state, dict(unwrapped.config), out / f"transformer{suffix}", dtype=dtype,
                                     max_shard_size=cfg.sft.max_shard_size, overwrite=True)
    write_model_card(folder, files=[], **card)
    outputs = {"transformer": folder}
    if cfg.sft.export_pipeline and not suffix:
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
