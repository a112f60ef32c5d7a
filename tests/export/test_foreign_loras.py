"""LoRAs from other trainers: kohya-style `lora_unet_` files (VideoX-Fun's diffusers names and ComfyUI's names),
diffusion-pipe's `diffusion_model.` + diffusers names, peft's own layout with or without its adapter_config.json.
Each file is written here by its trainer's key rules from one reference LoRA; the weight change cogtune applies must
equal the one the trainer defines: kohya and ComfyUI W += (alpha / rank) * up @ down with alpha from `.alpha`
(none: scale 1), peft W += (lora_alpha / r) * B @ A with lora_alpha from adapter_config.json (none: diffusers'
alpha = r)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import CogVideoXPipeline
from safetensors.torch import load_file, save_file

from cogtune.errors import CogtuneError
from cogtune.export.lora_formats import load_lora_into_pipeline, read_lora
from helpers.lora import make_lora, run_transformer, transformer_inputs

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear", "proj_out"]
COMFY_BLOCK = {"attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.to_out.0": "attn_out",
               "ff.net.0.proj": "ff_proj", "ff.net.2": "ff_out", "norm1.linear": "norm1.linear"}  # ComfyUI's names


def comfy_name(module: str) -> str:
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    return f"blocks.{m[1]}.{COMFY_BLOCK[m[2]]}" if m else module


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """(model folder, {module: (A, B)}, alpha, rank, the stock-diffusers file) of one LoRA with alpha != rank."""
    model = tiny_model("cogvideox-5b")
    path, _ = make_lora(model, tmp_path_factory.mktemp("ref"), rank=4, alpha=2, targets=TARGETS)
    sd = load_file(str(path))
    pairs = {k[len("transformer."):-len(".lora_A.weight")]: (v, sd[k.replace("lora_A", "lora_B")])
             for k, v in sd.items() if ".lora_A." in k}
    return model, pairs, 2.0, 4, path


def write(folder, tensors, sidecar=None):
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))  # no metadata: as these trainers write them
    if sidecar is not None:
        (folder / "adapter_config.json").write_text(json.dumps(sidecar))
    return folder / "adapter_model.safetensors"


def layouts(pairs, alpha, rank):
    """name -> (tensors, sidecar config, the scale that trainer's own rule gives)."""
    kohya_diffusers = {}
    kohya_comfy = {}
    for module, (a, b) in pairs.items():
        for out, name in ((kohya_diffusers, module), (kohya_comfy, comfy_name(module))):
            key = "lora_unet_" + name.replace(".", "_")
            out |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(alpha)}
    no_alpha = {k: v for k, v in kohya_comfy.items() if not k.endswith(".alpha")}
    pipe = {f"diffusion_model.{m}.lora_{r}.weight": t for m, (a, b) in pairs.items() for r, t in (("A", a), ("B", b))}
    peft = {f"base_model.model.{m}.lora_{r}.weight": t for m, (a, b) in pairs.items() for r, t in (("A", a), ("B", b))}
    bare = {f"{m}.lora_{r}.weight": t for m, (a, b) in pairs.items() for r, t in (("A", a), ("B", b))}
    config = {"r": rank, "lora_alpha": alpha, "target_modules": TARGETS, "peft_type": "LORA"}
    return {
        "kohya, VideoX-Fun's diffusers names": (kohya_diffusers, None, alpha / rank),
        "kohya, ComfyUI's names": (kohya_comfy, None, alpha / rank),
        "kohya without .alpha": (no_alpha, None, 1.0),
        "diffusion-pipe": (pipe, config, alpha / rank),
        "peft save_pretrained": (peft, config, alpha / rank),
        "peft keys, no prefix, no config": (bare, None, 1.0),
    }


@pytest.mark.parametrize("layout", list(layouts({}, 1.0, 1)))
def test_the_applied_delta_is_the_trainers_own(reference, tmp_path, layout):
    _, pairs, alpha, rank, _ = reference
    tensors, sidecar, scale = layouts(pairs, alpha, rank)[layout]
    lora = read_lora(write(tmp_path / "lora", tensors, sidecar))
    assert lora.modules == sorted(pairs)
    for module, (a, b) in pairs.items():
        got = lora.alphas[module] / lora.rank(module) * (lora.state_dict[f"transformer.{module}.lora_B.weight"]
                                                         @ lora.state_dict[f"transformer.{module}.lora_A.weight"])
        torch.testing.assert_close(got, scale * (b @ a), rtol=1e-6, atol=1e-7)


def test_a_kohya_file_drives_the_pipeline_like_the_stock_load(reference, tmp_path):
    model, pairs, alpha, rank, path = reference
    tensors, _, _ = layouts(pairs, alpha, rank)["kohya, VideoX-Fun's diffusers names"]
    ours = CogVideoXPipeline.from_pretrained(str(model))
    inputs = transformer_inputs(ours.transformer.config)
    load_lora_into_pipeline(ours, write(tmp_path / "kohya", tensors), "kohya")
    stock = CogVideoXPipeline.from_pretrained(str(model))
    stock.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="ref")
    torch.testing.assert_close(run_transformer(ours.transformer, inputs), run_transformer(stock.transformer, inputs),
                               rtol=1e-5, atol=1e-5)


def test_unknown_modules_and_adapters_are_one_line(reference, tmp_path):
    _, pairs, alpha, rank, _ = reference
    tensors, _, _ = layouts(pairs, alpha, rank)["kohya, ComfyUI's names"]
    bad = dict(tensors) | {"lora_unet_blocks_0_nonexistent.lora_down.weight": torch.ones(4, 8)}
    with pytest.raises(CogtuneError, match="kohya-style key .*names no module"):
        read_lora(write(tmp_path / "a", bad))
    lokr = {k.replace("lora_down", "lokr_w1"): v for k, v in tensors.items()}
    with pytest.raises(CogtuneError, match="no plain LoRA weight"):
        read_lora(write(tmp_path / "b", lokr))
