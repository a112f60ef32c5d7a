"""Full-parameter SFT writes a diffusers `transformer/` folder that loads and equals the trained model."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, DiffusionPipeline

from cogtune.train.loop import train
from conftest import tiny_train_config

pytestmark = pytest.mark.slow


def _inputs(spec, frames, height, width):
    gen = torch.Generator().manual_seed(1)
    f = (frames - 1) // 4 + 1
    f += (-f) % (spec.patch_size_t or 1)
    latents = torch.randn(1, f, 16, height // 8, width // 8, generator=gen)
    text = torch.randn(1, 226, spec.transformer.config.text_embed_dim, generator=gen)
    image = torch.randn(latents.shape, generator=gen) if spec.variant.i2v else None
    return spec.transformer_inputs(latents, text, torch.tensor([400]), image)


@pytest.mark.parametrize("variant,shard", [("cogvideox-5b", "10GB"), ("cogvideox1.5-5b-i2v", "200KB")])
def test_sft_folder_loads_and_equals_trained(tiny_model, synth_data, tmp_path, variant, shard):
    model = tiny_model(variant)
    cfg = tiny_train_config(model, synth_data, tmp_path / "run", method="sft", max_steps=2, optimizer__lr=1e-3,
                            sft__max_shard_size=shard, sft__export_pipeline=True)
    result = train(cfg)
    folder = tmp_path / "run" / "transformer"
    assert result.outputs["transformer"] == folder
    shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if shard == "10GB":
        assert [p.name for p in shards] == ["diffusion_pytorch_model.safetensors"]
    else:
        n = len(shards)
        assert n > 1 and [p.name for p in shards] == [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
                                                      for i in range(1, n + 1)]
        index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {p.name for p in shards}

    inputs = _inputs(result.spec, cfg.data.frames, cfg.data.height, cfg.data.width)
    loaded = CogVideoXTransformer3DModel.from_pretrained(str(folder))
    base = CogVideoXTransformer3DModel.from_pretrained(str(model), subfolder="transformer")
    with torch.no_grad():
        trained_out = result.transformer(**inputs)[0]
        loaded_out = loaded(**inputs)[0]
        base_out = base(**inputs)[0]
    assert (trained_out - base_out).abs().max() > 1e-4, "training changed nothing; the comparison proves nothing"
    torch.testing.assert_close(loaded_out, trained_out, atol=1e-6, rtol=1e-6)

    pipe = DiffusionPipeline.from_pretrained(str(model), transformer=loaded)
    extra = {}
    if result.spec.variant.i2v:
        from PIL import Image

        extra["image"] = Image.new("RGB", (cfg.data.width, cfg.data.height), "red")
    frames = pipe(prompt="a red circle", num_frames=cfg.data.frames, height=cfg.data.height, width=cfg.data.width,
                  num_inference_steps=2, output_type="np", **extra).frames[0]
    assert frames.shape == (cfg.data.frames, cfg.data.height, cfg.data.width, 3)

    # --export-pipeline: a whole pipeline folder that loads as is, with the trained transformer in it
    exported = DiffusionPipeline.from_pretrained(str(tmp_path / "run" / "pipeline"))
    with torch.no_grad():
        torch.testing.assert_close(exported.transformer(**inputs)[0], trained_out, atol=1e-6, rtol=1e-6)
