"""Checkpoints that never half-exist, and resume that never silently starts fresh.

`{output_dir}/checkpoint-{step}/` is written as `.checkpoint-{step}.tmp/` and renamed when complete; only folders
holding `trainer_state.json` count, so a write killed midway leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import pickles
from ..errors import CogtuneError
from ..export.shards import new_file_mode, read_safetensors_header, save_safetensors

STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
SHARDED = "sharded"  # torch.distributed.checkpoint folder of an FSDP2 checkpoint
# What a resumed run must share with the run that wrote the checkpoint (max_steps, logging, validation may change).
MUST_MATCH = ("model.path", "model.variant", "method", "lora.rank", "lora.alpha", "lora.target_modules",
              "data.root", "data.frames", "data.height", "data.width", "data.sampling", "data.crop", "seed",
              "batch_size", "gradient_accumulation_steps", "distributed.strategy", "world_size", "validation.holdout",
              "data.datasets", "data.shuffle_tags", "data.keep_tokens", "data.tag_variants")
# keys checkpoints of earlier versions lack: what they meant then
ADDED_LATER = {"validation.holdout": 0, "data.datasets": [], "data.shuffle_tags": False, "data.keep_tokens": 0,
               "data.tag_variants": 4}


def _entries(datasets):
    """data.datasets as far as a run depends on it: unset keys (and repeats 1, the default) left out, so an entry
    saved before a key existed matches the same entry now."""
    if not isinstance(datasets, list):
        return datasets
    return [{k: v for k, v in e.items() if v is not None and not (k == "repeats" and v == 1)} if isinstance(e, dict)
            else e for e in datasets]


def _dig(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def checkpoints(out: Path) -> list[Path]:
    found = [p for p in Path(out).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


RUN_FILES = ("config.yaml", "logs", "lora", "transformer", "pipeline", "validation", "lora_ema", "transformer_ema",
             "loss.png")  # not "cache": hours of encoding


def previous_run(out: Path) -> list[Path]:
    """What an earlier run left in `out`: its checkpoints (complete or not) and outputs."""
    out = Path(out)
    stale = [p for p in out.glob("*checkpoint-*") if re.fullmatch(r"\.?checkpoint-\d+(\.tmp)?", p.name)]
    return sorted(stale) + [out / name for name in RUN_FILES if (out / name).exists()]


def check_fresh_output(out: Path, overwrite: bool) -> list[Path]:
    """A run that does not resume must not mix with an earlier one in the same folder (a later `resume: latest`
    would pick up the earlier run's newest checkpoint). Returns what `overwrite` allows deleting."""
    left = previous_run(out)
    if left and not overwrite:
        names = ", ".join(p.name for p in left[:4]) + (", ..." if len(left) > 4 else "")
        raise CogtuneError(f"output_dir {out} holds an earlier run ({names}); continue it with resume=latest, "
                           f"start over with overwrite=true (deletes those), or choose another output_dir")
    return left


def resolve_resume(resume: str | None, out: Path) -> Path | None:
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        found = checkpoints(out)
        if found:
            return found[-1]
        if resume == "auto":
            return None
        raise CogtuneError(f"resume: latest: no complete checkpoint-N folder in {out} "
                           f"(use resume: auto to start fresh when there is none)")
    path = Path(resume)
    if not (path / STATE).is_file():
        raise CogtuneError(f"resume: {path} is not a complete cogtune checkpoint (no {STATE}); "
                           f"complete ones: {', '.join(p.name for p in checkpoints(out)) or 'none'}")
    return path


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    for key in MUST_MATCH:
        a, b = _dig(saved, key), _dig(current, key)
        a = ADDED_LATER.get(key) if a is None else a
        if key == "data.datasets":
            a, b = _entries(a), _entries(b)
            if a != b and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
                i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                k = next(k for k in sorted(a[i].keys() | b[i].keys()) if a[i].get(k) != b[i].get(k))
                key, a, b = f"data.datasets.{i}.{k}", a[i].get(k), b[i].get(k)
        if a != b:
            raise CogtuneError(f"resume: {path} was written with {key}={a!r}, this run has {key}={b!r}; "
                               f"a checkpoint only continues the run that wrote it")


def install_trainable_only_hooks(accelerator, model) -> None:
    """Without DeepSpeed/FSDP, save only the parameters that train (a LoRA checkpoint is MBs, not the 11 GB base)."""

    def save_hook(models, weights, output_dir):
        unwrapped = accelerator.unwrap_model(model)
        state = {n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}
        if accelerator.is_main_process:
            save_safetensors(state, Path(output_dir) / TRAINABLE, mode=new_file_mode())  # like its other files
        weights.clear()

    def load_hook(models, input_dir):
        unwrapped = accelerator.unwrap_model(model)
        state = load_file(str(Path(input_dir) / TRAINABLE))
        trainable = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
        if set(state) != trainable:
            missing = sorted(trainable - set(state))[:1] or sorted(set(state) - trainable)[:1]
            raise CogtuneError(f"resume: {input_dir} does not match this model's trainable parameters (e.g. {missing[0]})")
        params = dict(unwrapped.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_sharded(accelerator, path: Path, model, optimizer, scheduler) -> None:
    """FSDP2: each rank writes its own shards with torch.distributed.checkpoint (the same on CPU/gloo and CUDA);
    the scheduler, identical on every rank, once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path / SHARDED))
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), path / "scheduler.bin")


def load_sharded(path: Path, model, optimizer, scheduler) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / SHARDED).is_dir():
        raise CogtuneError(f"resume: {path} holds no {SHARDED}/ folder; it was not written by an fsdp2 run")
    model_state, optim_state = get_state_dict(model, optimizer)  # initialises the optimizer state to load into
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, storage_reader=pickles.dcp_reader(path / SHARDED))  # .metadata without plain pickle.load
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(pickles.load_checkpoint_file(path / "scheduler.bin", mmap=False))


def save_checkpoint(accelerator, out: Path, step: int, trainer_state: dict, config: dict, keep_last: int | None,
                    sharded: tuple | None = None, extra=None) -> Path:
    """`sharded`: (model, optimizer, scheduler) of an FSDP2 run, saved with torch.distributed.checkpoint. `extra`:
    called on every rank with the folder being written, before it is marked complete (e.g. the LoRA files)."""
    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_checkpoint(accelerator, tmp, trainer_state, config, sharded, extra)
    except BaseException as e:  # a full disk, a second signal: no half-written folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, RuntimeError) and any(m in str(e) for m in ("write", "inline_container", "StreamWriter")):
            # torch.save's failed write is a RuntimeError without an errno
            raise OSError(_write_errno(out), os.strerror(_write_errno(out)), str(tmp)) from None
        raise
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in checkpoints(out)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_errno(out: Path) -> int:
    import resource

    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return errno.EFBIG
    return errno.ENOSPC if shutil.disk_usage(out).free < 64 << 20 else errno.EIO


def _write_checkpoint(accelerator, tmp: Path, trainer_state: dict, config: dict, sharded: tuple | None,
                      extra=None) -> None:
    accelerator.wait_for_everyone()
    if sharded:
        tmp.mkdir(parents=True, exist_ok=True)
        save_sharded(accelerator, tmp, *sharded)
    else:
        accelerator.save_state(str(tmp))
    if extra is not None:
        extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        (tmp / STATE).write_text(json.dumps(trainer_state, indent=1))  # last: its presence marks completeness


def _damaged(path: Path, file: Path, why: str) -> CogtuneError:
    others = [p.name for p in checkpoints(path.parent) if p.resolve() != path.resolve()]
    return CogtuneError(f"resume: {file} is damaged ({why}); resume from an earlier checkpoint with resume=PATH "
                        f"({', '.join(others) if others else 'there is none in ' + str(path.parent)})")


def _read_json(path: Path, file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(path, file, f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise _damaged(path, file, "not a JSON object")
    return value


def check_resumable(path: Path, current_config: dict) -> None:
    """A checkpoint only continues the run that wrote it, and must be intact: said before anything is loaded."""
    state = _read_json(path, path / STATE)
    step, sampler = state.get("step"), state.get("sampler")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(sampler, dict):
        raise _damaged(path, path / STATE, "its 'step' must be a whole number >= 0 and 'sampler' an object")
    check_compatible(_read_json(path, path / "config.json"), current_config, path)
    trainable = path / TRAINABLE
    if trainable.is_file():  # the header, and a size that holds all the data it lists
        try:
            header = read_safetensors_header(trainable)
            with open(trainable, "rb") as f:
                head = int.from_bytes(f.read(8), "little")
            need = 8 + head + max(
                [e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"], default=0)
        except (CogtuneError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
            raise _damaged(path, trainable, f"not a safetensors file: {str(e)[:120]}") from None
        if trainable.stat().st_size < need:
            raise _damaged(path, trainable, f"truncated: {trainable.stat().st_size} of {need} bytes")
    pickles.check_folder(path)  # intact, and nothing in its pickles but tensors and harmless state (or --unsafe-pickle)


def load_checkpoint(accelerator, path: Path, current_config: dict, sharded: tuple | None = None) -> dict:
    check_resumable(path, current_config)
    if sharded:
        load_sharded(path, *sharded)
    else:
        accelerator.load_state(str(path), load_kwargs={"weights_only": False} if pickles.unsafe_allowed() else None)
    return json.loads((path / STATE).read_text())
