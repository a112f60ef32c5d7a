"""A Hugging Face model card (README.md, read by `huggingface_hub.ModelCard`) beside a LoRA or a transformer folder:
what it was trained from and how, and which file each client takes. It holds no local paths."""

from __future__ import annotations

from pathlib import Path

from ..files import write_text_atomic
from .lora_formats import COMFY_NAME, WEIGHT_NAME

CLIENTS = {  # file name -> the clients that load it as it is
    WEIGHT_NAME: "diffusers `load_lora_weights`, kijai's ComfyUI wrapper node packs, the official demos",
    COMFY_NAME: "ComfyUI core (its \"Load LoRA\" node)",
}


def _comfyui_names(variant: str) -> bool:
    """Whether `cogtune convert comfyui` writes a ComfyUI file for models of this variant's family."""
    from ..models import all_variants, family

    facts = all_variants().get(variant)
    return facts is not None and bool(family(facts.family).COMFYUI_LORAS)


def write_model_card(folder: str | Path, *, base_model: str, hub_id: str, variant: str, i2v: bool, method: str,
                     settings: dict, files: list[str], trigger: str | None = None,
                     transformer_overrides: dict | None = None) -> Path:
    """`base_model`: its name (the hub id of a published model, else the folder's name); `hub_id`: "" for a model
    that is not a published one. `settings`: what to list under "Training"; `files`: the LoRA files in `folder`.
    `transformer_overrides`: transformer config values it was trained with that the base model's config lacks
    (e.g. its learned positional table dropped): a LoRA's snippet loads the transformer with them; a full
    fine-tune's config.json holds them already."""
    from huggingface_hub import ModelCardData

    folder = Path(folder)
    lora = method == "lora"
    data = ModelCardData(base_model=hub_id or None, library_name="diffusers", instance_prompt=trigger or None,
                         pipeline_tag="image-to-video" if i2v else "text-to-video",
                         tags=["cogtune", variant, "lora" if lora else "full-fine-tune", "video-generation"])
    what = "LoRA" if lora else "full fine-tune"
    rows = "\n".join(f"| `{name}` | {CLIENTS.get(name, 'diffusers')} |" for name in files) if lora else \
        "| this folder (safetensors shards, index, config.json) | diffusers `from_pretrained`, as the transformer |"
    if not lora and _comfyui_names(variant):
        rows += ("\n| one file from `cogtune convert comfyui THIS_FOLDER model.safetensors` | ComfyUI core (its "
                 "\"Load Diffusion Model\" node, file in `models/diffusion_models/`) |")
    trained = "\n".join(f"- {k}: {v}" for k, v in settings.items())
    overrides = "".join(f", {k}={v!r}" for k, v in (transformer_overrides or {}).items())
    if lora and overrides:  # the base transformer must be built as it was trained
        use = (f'from diffusers import AutoModel, DiffusionPipeline\n\n'
               f'transformer = AutoModel.from_pretrained("{hub_id or "BASE_MODEL"}", subfolder="transformer"'
               f'{overrides}, torch_dtype=torch.bfloat16)  # as it was trained\n'
               f'pipe = DiffusionPipeline.from_pretrained("{hub_id or "BASE_MODEL"}", transformer=transformer, '
               f'torch_dtype=torch.bfloat16)\n'
               f'pipe.load_lora_weights("PATH_TO_THIS_FOLDER", weight_name="pytorch_lora_weights.safetensors", '
               f'adapter_name="mine")\n'
               f'pipe.set_adapters(["mine"], [1.0])  # the scale it was trained at')
    elif lora:
        use = (f'from diffusers import DiffusionPipeline\n\n'
               f'pipe = DiffusionPipeline.from_pretrained("{hub_id or "BASE_MODEL"}", torch_dtype=torch.bfloat16)\n'
               f'pipe.load_lora_weights("PATH_TO_THIS_FOLDER", weight_name="pytorch_lora_weights.safetensors", '
               f'adapter_name="mine")\n'
               f'pipe.set_adapters(["mine"], [1.0])  # the scale it was trained at')
    else:
        use = (f'from diffusers import AutoModel, DiffusionPipeline\n\n'
               f'transformer = AutoModel.from_pretrained("PATH_TO_THIS_FOLDER", torch_dtype=torch.bfloat16)\n'
               f'pipe = DiffusionPipeline.from_pretrained("{hub_id or "BASE_MODEL"}", transformer=transformer, '
               f'torch_dtype=torch.bfloat16)')
    note = ""
    if overrides:
        how = ("the snippet below does, and `cogtune generate` does it from the LoRA's metadata; ComfyUI reads no "
               "metadata, so load the base model there without the table yourself" if lora else
               "this folder's config.json says so, so `from_pretrained` does it by itself")
        note = (f"\nTrained with the transformer built as `{overrides.lstrip(', ')}` (the learned positional table "
                f"dropped, which frees the size): inference must build it the same way ({how}).\n")
    trigger_line = note + (f"\nTrigger word: `{trigger}` (it was in every training caption: put it in your prompts).\n"
                    if trigger else "")
    body = f"""
# {variant} {what}, trained with cogtune

Base model: {f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"{base_model} (a local model folder)"}
({variant}, {"image-to-video" if i2v else "text-to-video"}).
{trigger_line}
## Files

| file | loads in |
|---|---|
{rows}

## Use it with diffusers

```python
import torch
{use}
```

With cogtune: `cogtune generate --model BASE_MODEL_FOLDER {"--lora PATH_TO_THIS_FOLDER " if lora else ""}--prompt "..."`.

## Training

{trained}
"""
    return write_text_atomic(folder / "README.md", f"---\n{data.to_yaml()}\n---\n{body}")
