"""ComfyUI core's published rules for a CogVideoX single file, re-derived for tests (no ComfyUI code).

Sources (read 2026-12-06, yzkee/ComfyUI, a mirror of comfyanonymous/ComfyUI):
- comfy/model_detection.py `detect_unet_config`, CogVideoX branch: triggered by `blocks.0.norm1.linear.weight`;
  width = its rows / 6, time_embed_dim = its columns, heads = width // 64, head dim 64, layers = count of
  `blocks.N.`; `patch_embed.proj.weight` 4-D (Conv2d) gives in_channels = dim 1 and patch_size = dim 2, 2-D
  (Linear) gives patch_size 2, patch_size_t 2, in_channels = dim 1 // 8; text_embed_dim from
  `patch_embed.text_proj.weight` dim 1; ofs_embed_dim from `ofs_embedding_linear_1.weight` dim 1;
  `patch_embed.pos_embedding` present -> learned table, no RoPE; absent -> RoPE, no table.
- comfy/supported_models.py: CogVideoX_Inpaint (in_channels 48), CogVideoX_I2V (32), CogVideoX_T2V (the rest),
  tried in that order.
- comfy/ldm/cogvideo/model.py: module names (those of export/lora_formats.py) and the table shape
  (1, max_text_seq_length + patches, width).
The inverse key map below is written out independently of cogtune's.
"""

from __future__ import annotations

import re

_BLOCK_BACK = {  # ComfyUI block module -> diffusers block module
    "q": "attn1.to_q", "k": "attn1.to_k", "v": "attn1.to_v", "attn_out": "attn1.to_out.0",
    "norm_q": "attn1.norm_q", "norm_k": "attn1.norm_k", "ff_proj": "ff.net.0.proj", "ff_out": "ff.net.2",
    "norm1.linear": "norm1.linear", "norm1.norm": "norm1.norm", "norm2.linear": "norm2.linear",
    "norm2.norm": "norm2.norm",
}
_TOP_BACK = {
    "patch_embed.proj": "patch_embed.proj", "patch_embed.text_proj": "patch_embed.text_proj",
    "time_embedding_linear_1": "time_embedding.linear_1", "time_embedding_linear_2": "time_embedding.linear_2",
    "ofs_embedding_linear_1": "ofs_embedding.linear_1", "ofs_embedding_linear_2": "ofs_embedding.linear_2",
    "norm_final": "norm_final", "norm_out.linear": "norm_out.linear", "norm_out.norm": "norm_out.norm",
    "proj_out": "proj_out",
}


def diffusers_key(comfy_key: str) -> str:
    """ComfyUI key -> diffusers key; KeyError for a key ComfyUI's model does not have."""
    if comfy_key == "patch_embed.pos_embedding":
        return comfy_key
    module, leaf = comfy_key.rsplit(".", 1)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m:
        return f"transformer_blocks.{m[1]}.{_BLOCK_BACK[m[2]]}.{leaf}"
    return f"{_TOP_BACK[module]}.{leaf}"


def detect(shapes: dict[str, tuple[int, ...]]) -> dict | None:
    """The config ComfyUI core infers from a state dict's {key: shape} (None: not CogVideoX)."""
    if "blocks.0.norm1.linear.weight" not in shapes:
        return None
    rows, cols = shapes["blocks.0.norm1.linear.weight"]
    cfg = {"width": rows // 6, "num_attention_heads": rows // 6 // 64, "attention_head_dim": 64,
           "time_embed_dim": cols}
    n = 0
    while any(k.startswith(f"blocks.{n}.") for k in shapes):
        n += 1
    cfg["num_layers"] = n
    proj = shapes.get("patch_embed.proj.weight")
    if proj is not None and len(proj) == 4:
        cfg |= {"in_channels": proj[1], "patch_size": proj[2], "patch_size_t": None}
    elif proj is not None and len(proj) == 2:
        cfg |= {"in_channels": proj[1] // 8, "patch_size": 2, "patch_size_t": 2}
    if "patch_embed.text_proj.weight" in shapes:
        cfg["text_embed_dim"] = shapes["patch_embed.text_proj.weight"][1]
    cfg["ofs_embed_dim"] = shapes["ofs_embedding_linear_1.weight"][1] if "ofs_embedding_linear_1.weight" in shapes \
        else None
    table = "patch_embed.pos_embedding" in shapes
    cfg |= {"use_learned_positional_embeddings": table, "use_rotary_positional_embeddings": not table}
    cfg["model_class"] = {48: "CogVideoX_Inpaint", 32: "CogVideoX_I2V"}.get(cfg.get("in_channels"), "CogVideoX_T2V")
    return cfg


def table_shape(detected: dict, sample_height: int, sample_width: int, sample_frames: int,
                text_tokens: int = 226, temporal_compression: int = 4) -> tuple[int, int, int]:
    """The positional table ComfyUI's patch embedding builds for a sample size (and loads the file's into)."""
    t = (sample_frames - 1) // temporal_compression + 1
    if detected["patch_size_t"] is not None:
        t //= detected["patch_size_t"]
    p = detected["patch_size"]
    return (1, text_tokens + (sample_height // p) * (sample_width // p) * t, detected["width"])
