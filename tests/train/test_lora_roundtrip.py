"""What you trained is what loads: stock `load_lora_weights` reproduces the trained transformer at its trained scale."""

from __future__ import annotations

import json
import stat

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from cogtune.train.loop import train
from conftest import tiny_train_config

pytestmark = pytest.mark.slow


def _inputs(spec, frames, height, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = (frames - 1) // spec.temporal_ratio + 1
    f += (-f) % (spec.patch_size_t or 1)
    c = spec.transformer.config.out_channels
    latents = torch.randn(1, f, c, height // 8, width // 8, generator=gen)
    text = torch.randn(1, 226, spec.transformer.config.text_embed_dim, generator=gen)
    image = torch.randn(latents.shape, generator=gen) if spec.variant.i2v else None
    return spec.transformer_inputs(latents, text, torch.tensor([500]), image)


@pytest.mark.parametrize(
    "variant,rank,alpha",
    [("cogvideox-5b", 8, 4), ("cogvideox-5b", 8, 8), ("cogvideox-5b-i2v", 8, 4), ("cogvideox1.5-5b-i2v", 4, 8)],
)
def test_lora_loads_at_trained_scale(tiny_model, synth_data, tmp_path, variant, rank, alpha):
    model = tiny_model(variant)
    cfg = tiny_train_config(model, synth_data, tmp_path / "run", lora__rank=rank, lora__alpha=alpha,
                            optimizer__lr=5e-3, max_steps=3)
    result = train(cfg)
    lora_file = tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"
    assert result.lora_path == lora_file and lora_file.is_file()

    inputs = _inputs(result.spec, cfg.data.frames, cfg.data.height, cfg.data.width)
    with torch.no_grad():
        trained = result.transformer(**inputs)[0]

    pipe = DiffusionPipeline.from_pretrained(str(model))
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="x")
    with torch.no_grad():
        loaded = pipe.transformer(**inputs)[0]

    delta = (trained - base).abs().max().item()
    assert delta > 1e-3, "training left the LoRA at zero; the comparison would prove nothing"
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)

    # the metadata is what carries the scale: the same tensors without it load at alpha = rank
    meta_free = tmp_path / "no_meta.safetensors"
    save_file(load_file(str(lora_file)), str(meta_free))
    pipe2 = DiffusionPipeline.from_pretrained(str(model))
    pipe2.load_lora_weights(str(tmp_path), weight_name=meta_free.name, adapter_name="y")
    with torch.no_grad():
        naive = pipe2.transformer(**inputs)[0]
    if alpha != rank:
        assert (naive - trained).abs().max().item() > 0.1 * delta
    else:
        torch.testing.assert_close(naive, trained, atol=1e-5, rtol=1e-5)


def test_lora_metadata_records_training(tiny_model, synth_data, tmp_path):
    from cogtune.train.lora import read_metadata

    model = tiny_model("cogvideox-5b")
    cfg = tiny_train_config(model, synth_data, tmp_path / "run", lora__rank=4, lora__alpha=2, max_steps=1)
    cfg.checkpoint.every_steps = 1
    path = train(cfg).lora_path
    # the LoRA and the checkpoint's weights get the mode any new file gets (safetensors itself writes 0600)
    plain = tmp_path / "plain"
    plain.write_text("")
    for written in (path, tmp_path / "run" / "checkpoint-1" / "trainable.safetensors"):
        assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode), written
    meta = read_metadata(path)
    assert meta["cogtune.rank"] == "4" and float(meta["cogtune.alpha"]) == 2.0
    assert meta["cogtune.variant"] == "cogvideox-5b"
    assert sorted(json.loads(meta["cogtune.target_modules"])) == sorted(["to_q", "to_k", "to_v", "to_out.0"])
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["transformer.r"] == 4 and adapter["transformer.lora_alpha"] == 2
    keys = load_file(str(path)).keys()
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    # each block has one (joint text+video) attention with 4 target projections, each an A and a B matrix
    n_blocks = json.loads((model / "transformer" / "config.json").read_text())["num_layers"]
    assert len(keys) == n_blocks * 4 * 2
