"""Fuse one or more LoRAs (diffusers or ComfyUI format), each with a weight, into a standalone transformer.

`cogtune lora merge --model DIR --lora A[:W] [--lora B[:W] ...] OUT [--pipeline]`

The transformer is loaded in float32, every LoRA is checked against it (`check_lora_compat`) and loaded with its own
LoraConfig (so each runs at its trained alpha/rank), then `set_adapters(names, weights)` + `fuse_lora()` +
`unload_lora()` leave plain weights W + sum_i w_i * alpha_i/r_i * B_i A_i. The result is written as a diffusers
transformer folder (sharded safetensors + index + config.json, via export/shards.py) in the dtype the model was
stored in (or `--dtype`). With `--pipeline`, OUT is a whole pipeline folder: the merged transformer/ plus the
model's other components, hard-linked where the filesystem allows (copied otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import CogtuneError
from .lora_formats import read_lora

MERGE_INFO = "cogtune_merge.json"


def _transformer_dir(model: Path) -> tuple[Path, bool]:
    """(transformer folder, is a pipeline folder)."""
    if (model / "transformer" / "config.json").is_file():
        return model / "transformer", True
    if (model / "config.json").is_file():
        return model, False
    raise CogtuneError(f"--model {model}: no transformer/config.json or config.json there; give a diffusers "
                       "pipeline folder or its transformer/ folder")


def stored_dtype(transformer_dir: Path) -> torch.dtype:
    """The dtype most of the folder's weights are stored in (read from the safetensors headers only)."""
    from .shards import _SAFETENSORS_DTYPE, DTYPES, folder_shapes

    names = {_SAFETENSORS_DTYPE[dtype]: dtype for dtype in DTYPES.values()}
    counts: dict[str, int] = {}
    for shape, dtype, _ in folder_shapes(transformer_dir).values():
        n = 1
        for s in shape:
            n *= s
        counts[dtype] = counts.get(dtype, 0) + n
    return names.get(max(counts, key=counts.get), torch.float32) if counts else torch.float32


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def check_fused(transformer: torch.nn.Module, to: torch.dtype, loras: list) -> None:
    """Every merged weight finite, and within range of the output dtype: else the model would sample NaN."""
    limit = torch.finfo(to).max
    for name, p in transformer.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CogtuneError(f"merged weight {name} has NaN/inf values, nothing was written: the base model holds "
                               f"them or the LoRA weights ({', '.join(f'{s.weight:g}' for s in loras)}) are too large")
        if to != torch.float32 and float(p.abs().max()) > limit:
            raise CogtuneError(f"merged weight {name} exceeds what {str(to).removeprefix('torch.')} holds "
                               f"({limit:g}), nothing was written: use --dtype fp32 or bf16, or smaller LoRA weights")


def fuse_loras(transformer_dir: Path, loras: list, model_dir: Path):
    """The float32 transformer with `loras` ([LoraSpec]) fused in at their weights."""
    from .lora_compat import check_lora_compat, positions_for, transformer_config
    from ..models import load_transformer, variant_of_configs

    read = []
    for spec in loras:  # every LoRA checked before the slow load
        lora = read_lora(spec.path)
        check_lora_compat(lora, model_dir)
        read.append(lora)
    # LoRAs trained without the learned positional table: the merged model is built (and saved) without it too
    facts = positions_for(variant_of_configs(*transformer_config(model_dir)), read, [str(s.path) for s in loras])
    from .. import quiet_libraries

    quiet_libraries()
    transformer = load_transformer(transformer_dir, torch.float32, facts)
    names = []
    for spec, lora in zip(loras, read):  # names are unique: parse_loras checks that
        with warnings.catch_warnings():  # peft warns on every adapter after the first; several is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.load_lora_adapter(dict(lora.state_dict), prefix="transformer", adapter_name=spec.name,
                                          metadata=lora.adapter_metadata())
        names.append(spec.name)
    transformer.set_adapters(names, [spec.weight for spec in loras])
    transformer.fuse_lora()
    transformer.unload_lora()
    return transformer


def merge_loras(model: str | Path, loras: list[str], out: str | Path, pipeline: bool = False,
                dtype: str | None = None, max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    """Fuse `loras` (`PATH[:WEIGHT][@NAME]` strings) into the model's transformer; write OUT. Returns OUT."""
    from .adapters import parse_loras
    from ..models.folder import check_pipeline_folder, check_weights
    from .shards import (check_output_folder, plan_shards, refuse_overlap, resolve_dtype, save_transformer_folder,
                         staged_folder)

    model, out = Path(model), Path(out)
    if not loras:
        raise CogtuneError("give at least one --lora PATH[:WEIGHT] to merge")
    transformer_dir, is_pipeline = _transformer_dir(model)
    if pipeline and not is_pipeline:
        raise CogtuneError(f"--pipeline needs a pipeline folder as --model, {model} is a transformer folder")
    if pipeline:  # every component is copied into OUT: all of them must be whole
        check_pipeline_folder(model)
    check_weights(transformer_dir)
    plan_shards({}, max_shard_size)  # a bad --max-shard-size is one line now, not after the merge
    specs = parse_loras(loras)
    refuse_overlap(out, **{"--model": model})
    check_output_folder(out, overwrite)  # say so before the slow part
    to = resolve_dtype(dtype) or stored_dtype(transformer_dir)
    transformer = fuse_loras(transformer_dir, specs, model)
    check_fused(transformer, to, specs)
    info = {"model": str(model.absolute()), "dtype": str(to).removeprefix("torch."),
            "loras": [{"path": str(s.path.absolute()), "weight": s.weight, "name": s.name} for s in specs]}
    with staged_folder(out, overwrite) as tmp:  # OUT appears complete (merge info included) or not at all
        for entry in sorted(model.iterdir()) if pipeline else ():
            if entry.name == "transformer":
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(entry), str(tmp / entry.name))
        save_transformer_folder(transformer, None, tmp / "transformer" if pipeline else tmp, dtype=to,
                                max_shard_size=max_shard_size, overwrite=True)
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out


