"""Real LoRAs on tiny transformers (peft adapters with random, non-zero weights, saved by cogtune) and the
transformer run on fixed inputs that tests compare outputs with."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import CogVideoXTransformer3DModel
from peft import LoraConfig

from cogtune.train.lora import add_lora, save_lora


def make_lora(model: Path, out: Path, rank: int = 4, alpha: float = 2, targets=("to_q", "to_k", "to_v", "to_out.0"),
              alpha_pattern: dict | None = None, seed: int = 1, variant: str = "cogvideox-5b"):
    """A peft LoRA on the model's transformer with random (non-zero) A and B, saved by cogtune's save_lora.

    Returns (file, transformer with the adapter active) — the transformer is the reference output.
    """
    transformer = CogVideoXTransformer3DModel.from_pretrained(str(model / "transformer"))
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), alpha_pattern=alpha_pattern or {},
                     init_lora_weights=True)
    transformer.add_adapter(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    path = save_lora(transformer, out, {"variant": variant, "base_model": str(model)})
    return path, transformer.eval()


def transformer_inputs(config, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    frames = 2 * (config.patch_size_t or 1)
    hidden = torch.randn(1, frames, config.in_channels, config.sample_height, config.sample_width, generator=gen)
    text = torch.randn(1, config.max_text_seq_length, config.text_embed_dim, generator=gen)  # positions cover 226
    inputs = {"hidden_states": hidden, "encoder_hidden_states": text,
              "timestep": torch.tensor([500])}
    if config.ofs_embed_dim:
        inputs["ofs"] = torch.tensor([2.0])
    return inputs


def run_transformer(transformer, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]



def lora_folder(model, out, seed: int, variant: str = "cogvideox-5b"):
    """A real LoRA: peft adapter on the tiny transformer, lora_B randomised (peft starts it at zero), alpha != rank."""
    transformer = CogVideoXTransformer3DModel.from_pretrained(model / "transformer")
    add_lora(transformer, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    save_lora(transformer, out, {"variant": variant})
    return out
