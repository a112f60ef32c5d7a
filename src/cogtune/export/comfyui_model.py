"""`cogtune convert comfyui SRC OUT.safetensors`: a diffusers transformer folder as ComfyUI core's single file.

ComfyUI core loads a full model from `models/diffusion_models/` ("Load Diffusion Model") only in its own module
names and finds the variant from the tensors alone (comfy/model_detection.py); it has no map from diffusers names.
The file written here holds every tensor of the source under ComfyUI's names (the map of export/lora_formats.py,
which ComfyUI LoRAs use too), plus what ComfyUI needs that diffusers does not store (the family says what: a
sin-cos positional table, whose presence tells ComfyUI there is no RoPE). Tensors are copied one at a time, in
their own dtype or in --dtype, into a temporary file beside OUT that is renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from safetensors import safe_open

from ..errors import CogtuneError, display_path
from .lora_formats import COMFY_NAME, WEIGHT_NAME, check_output_file, to_comfy_key
from .shards import (_SAFETENSORS_DTYPE, CONFIG_NAME, WEIGHTS_NAME, ShardWriter, TensorSpec, folder_shapes,
                     model_specs, new_file_mode, read_safetensors_header, resolve_dtype, shape_problems, target_dtype)

LORA_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", ".alpha", "base_layer")
_LORA_HINT = "for ComfyUI, convert a LoRA with `cogtune lora convert LORA OUT --to comfyui`"
_DIFFUSERS_FIRST = ("convert it to a diffusers folder first (`cogtune convert zero CKPT DIR --base MODEL`, "
                    "`cogtune convert fsdp ...` or `cogtune convert sat CKPT DIR`), then `cogtune convert comfyui DIR OUT`")


def _refuse_lora_file(path: Path) -> None:
    try:
        keys = [k for k in read_safetensors_header(path) if k != "__metadata__"]
    except (OSError, ValueError, CogtuneError):
        raise CogtuneError(f"{display_path(path)} is damaged or not a safetensors file: copy or export it again") \
            from None
    if any(m in k for k in keys for m in LORA_MARKERS):
        raise CogtuneError(f"{display_path(path)} is a LoRA, not a full model: `convert comfyui` converts "
                           f"transformer folders; {_LORA_HINT}")


def source_folder(src: str | Path) -> Path:
    """The diffusers transformer folder SRC names (itself, or a pipeline folder's transformer/); else one line."""
    src = Path(src)
    where = display_path(src)
    if not src.exists():
        raise CogtuneError(f"{where}: no such file or folder; give a diffusers transformer folder or pipeline folder")
    if src.is_file():
        if src.suffix == ".safetensors":
            _refuse_lora_file(src)
        if src.suffix == ".pt":
            raise CogtuneError(f"{where} is a training checkpoint, not a diffusers folder: {_DIFFUSERS_FIRST}")
        raise CogtuneError(f"{where} is a file: give the diffusers transformer folder (config.json + "
                           f"{WEIGHTS_NAME} or its shards) or the pipeline folder holding transformer/")
    for folder in (src / "transformer", src):
        if (folder / CONFIG_NAME).is_file():
            return folder
    if (src / "latest").is_file() or any(src.glob("*/*model_states.pt")) or any(src.glob("*model_states.pt")):
        raise CogtuneError(f"{where} is a DeepSpeed ZeRO or SAT checkpoint, not a diffusers folder: {_DIFFUSERS_FIRST}")
    for name in (WEIGHT_NAME, COMFY_NAME, f"lora/{WEIGHT_NAME}"):  # a LoRA folder, or a LoRA run's output_dir
        if (src / name).is_file():
            _refuse_lora_file(src / name)
    raise CogtuneError(f"{where} has no {CONFIG_NAME} and no transformer/{CONFIG_NAME}: give a diffusers "
                       "transformer folder (an SFT export, a `lora merge` output) or a pipeline folder")


def _family(config: dict, where: str):
    from ..models import family_of_config

    fam = family_of_config(config, f"the transformer in {where}")
    if not fam.COMFYUI_LORAS:
        raise CogtuneError(f"{where} holds a {fam.FAMILY} model: cogtune does not know ComfyUI's names for "
                           f"{fam.FAMILY} models yet, so it cannot write ComfyUI's single file")
    return fam


def _variant_name(config: dict) -> str | None:
    from ..models import variant_of_configs

    try:
        return variant_of_configs(config).name
    except CogtuneError:  # a custom model of the family: its config still says everything ComfyUI needs
        return None


def convert_comfyui(src: str | Path, out: str | Path, dtype: str | None = None,
                    overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write SRC's transformer as ComfyUI core's single file OUT; (OUT, where ComfyUI would differ from diffusers)."""
    from ..models.folder import check_weights, read_json

    folder, out = source_folder(src), Path(out)
    where = display_path(folder)
    if out.suffix != ".safetensors":
        raise CogtuneError(f"output {display_path(out)}: give a file name ending in .safetensors (ComfyUI's "
                           "models/diffusion_models/ takes single files)")
    to = resolve_dtype(dtype)
    check_output_file(out, overwrite)
    config = read_json(folder / CONFIG_NAME, "a diffusers config.json")
    fam = _family(config, where)
    check_weights(folder)
    stored = folder_shapes(folder)
    if out.exists() and any(out.resolve() == (folder / f).resolve() for _, _, f in stored.values()):
        raise CogtuneError(f"output {display_path(out)} is one of the source's weight files: write to another path")
    lora = next((k for k in stored if any(m in k for m in LORA_MARKERS)), None)
    if lora is not None:
        raise CogtuneError(f"{where} holds LoRA weights ({lora}), not a plain model: merge them first "
                           "(`cogtune lora merge`) or " + _LORA_HINT)
    expected = model_specs(config)
    problems = shape_problems({k: s for k, (s, _, _) in stored.items()}, {k: s.shape for k, s in expected.items()},
                              "weights", "config.json")
    if problems:
        raise CogtuneError(f"{where}: its weights do not match its {CONFIG_NAME}: {'; '.join(problems)}; "
                           "export or copy the folder again")

    names = {v: k for k, v in _SAFETENSORS_DTYPE.items()}
    extra = fam.comfyui_extra_tensors(config)
    sources = {k: (shape, names[dt]) for k, (shape, dt, _) in stored.items()}
    fill = Counter(dt for _, dt in sources.values()).most_common(1)[0][0]  # the dtype of the added tensors
    sources.update({k: (tuple(t.shape), fill) for k, t in extra.items() if k not in sources})
    specs, renamed = {}, {}
    for key, (shape, stored_dtype) in sources.items():
        comfy = to_comfy_key(key)
        if comfy is None:
            raise CogtuneError(f"{where}: tensor {key} has no counterpart in ComfyUI's model; nothing was written")
        renamed[key] = comfy
        specs[comfy] = TensorSpec(tuple(shape), target_dtype(stored_dtype, to))
    metadata = {"cogtune.source": "diffusers", "cogtune.transformer_config": json.dumps(config, sort_keys=True)}
    variant = _variant_name(config)
    if variant:
        metadata["cogtune.variant"] = variant

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with ShardWriter(tmp, specs, max_shard_size=1 << 62, metadata=metadata) as writer:
            by_file: dict[str, list[str]] = {}
            for key, (_, _, name) in stored.items():
                by_file.setdefault(name, []).append(key)
            for name, keys in sorted(by_file.items()):
                with safe_open(str(folder / name), framework="pt") as f:
                    for key in keys:
                        writer.add(renamed[key], f.get_tensor(key))
            for key, tensor in extra.items():
                if key not in stored:
                    writer.add(renamed[key], tensor)
        os.chmod(tmp / WEIGHTS_NAME, new_file_mode())
        os.replace(tmp / WEIGHTS_NAME, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, fam.comfyui_caveats(config)


def summary(out: Path, caveats: list[str]) -> str:
    header = read_safetensors_header(out)
    dtypes = sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"})
    lines = [f"wrote {display_path(out)}: {len(header) - 1} tensors ({', '.join(dtypes)}) in ComfyUI's names; put it "
             "in ComfyUI/models/diffusion_models/ and open it with \"Load Diffusion Model\""]
    return "\n".join(lines + [f"note: {c}" for c in caveats])

