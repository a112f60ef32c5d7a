"""The CogVideoX family's entry in the registry (light: no torch or diffusers at import): its five variants as
ModelFacts, variant detection from configs, and the real published configs of each. The model itself: cogvideox.py.

Sources of the real configs (checked 2026-11):
- transformer: diffusers `scripts/convert_cogvideox_to_diffusers.py` (`get_transformer_init_kwargs`: 1.0 →
  patch_size_t None, patch_bias True, sample 60x90x49; 1.5 → patch_size_t 2, patch_bias False, sample 300x300x81;
  `in_channels=32` for I2V, `use_learned_positional_embeddings` for 1.0 I2V only, `ofs_embed_dim=512` for 1.5 I2V),
  and the hub configs THUDM|zai-org/CogVideoX-2b and CogVideoX-5b `transformer/config.json` (30/30 and 48/42 heads/layers).
- vae: hub `vae/config.json` of CogVideoX-2b (scaling 1.15258426), CogVideoX-5b (0.7, invert false) and
  CogVideoX1.5-5B (0.7, `invert_scale_latents: true`; the converter sets it for every 1.5 VAE, T2V included).
- scheduler: hub `scheduler/scheduler_config.json`. Every variant *ships* `CogVideoXDDIMScheduler` (model_index.json
  too); snr_shift_scale 3.0 for 2B, 1.0 for all 5B ones (zai-org/CogVideoX-5b, CogVideoX1.5-5B as quoted in
  huggingface/finetrainers#120). The model cards / inference/cli_demo.py *recommend* swapping in
  `CogVideoXDPMScheduler` for the 5B variants at inference: that is `recommended_scheduler_class` below.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from cogtune.errors import CogtuneError, bounded

from .facts import ModelFacts, UndetectableVariant  # noqa: F401 (UndetectableVariant: its old home)

Variant = ModelFacts  # the old name of the record

FAMILY = "cogvideox"
CONFIG_KEYS = ("text_embed_dim", "time_embed_dim")
PIPELINES = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline")
OPTIONS = "i2v"  # the config section of this family's own options (I2V image noise and dropout)
# ComfyUI core's native CogVideoX names exist for these models and their LoRAs (export/lora_formats.py)
COMFYUI_LORAS = True
_COMMON = dict(
    family=FAMILY, size_multiple=16, text_tokens=226, guidance=6.0, objective="v_prediction",
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"), block_classes=("CogVideoXBlock",),
    fp8_skip=("patch_embed", "norm", "lora_", "proj_out", "pos_embedding", "time_embedding", "ofs_embedding"),
    # diffusers' CogVideoXAttnProcessor2_0 calls F.scaled_dot_product_attention itself, not the dispatcher
    transformer_class="CogVideoXTransformer3DModel", attention_dispatch=False,
)
LEARNED_TABLE = "use_learned_positional_embeddings"  # 5B-I2V's learned positional table (CogVideoXPatchEmbed)


def _variant(name: str, generation: str, i2v: bool, hub: str, fixed_resolution: bool = False,
             release_dtype: str = "bf16") -> ModelFacts:
    if generation == "1.0":
        shape = dict(frame_step=8, max_n=6, native_frames=49, native_height=480, native_width=720, fps=8)
    else:
        shape = dict(frame_step=16, max_n=10, native_frames=81, native_height=768, native_width=1360, fps=16)
    return ModelFacts(name=name, i2v=i2v, fixed_resolution=fixed_resolution, generation=generation,
                      hub_id=f"zai-org/{hub}", release_dtype=release_dtype, no_stills=I2V_STILLS if i2v else "",
                      size_lock_key=LEARNED_TABLE if fixed_resolution else "", **shape, **_COMMON)


# An I2V model is shown the first frame of its sample: a still image would be asked to reproduce itself.
I2V_STILLS = "image-to-video models condition on the sample's first frame, which for a still image is the image itself"


VARIANTS: dict[str, ModelFacts] = {
    v.name: v
    for v in (
        _variant("cogvideox-2b", "1.0", False, "CogVideoX-2b", release_dtype="fp16"),  # trained and released in fp16
        _variant("cogvideox-5b", "1.0", False, "CogVideoX-5b"),
        _variant("cogvideox-5b-i2v", "1.0", True, "CogVideoX-5b-I2V", fixed_resolution=True),
        _variant("cogvideox1.5-5b", "1.5", False, "CogVideoX1.5-5B"),
        _variant("cogvideox1.5-5b-i2v", "1.5", True, "CogVideoX1.5-5B-I2V"),
    )
}


def get_variant(name: str) -> ModelFacts:
    try:
        return VARIANTS[name]
    except KeyError:
        raise CogtuneError(f"unknown model variant {bounded(name)!r}: use one of {', '.join(VARIANTS)}") from None


def folder_facts(facts: ModelFacts, transformer_config: dict) -> ModelFacts:
    """The facts of one folder: a learned positional table fixes the size (and frame count) its config was built
    for; without one, a still image trains as one latent frame (padded to `patch_size_t` by the spec), and a folder
    of a variant that has one, saved without it (a full fine-tune trained with the table dropped), takes any size."""
    if not transformer_config.get(LEARNED_TABLE):
        if facts.size_lock_key:
            return replace(facts, fixed_resolution=False, positions_dropped=True)
        return facts
    if not facts.no_stills:
        facts = replace(facts, no_stills=f"its learned positional embeddings are fixed to "
                                         f"{transformer_config.get('sample_frames')} frames")
    try:
        h, w = int(transformer_config["sample_height"]) * 8, int(transformer_config["sample_width"]) * 8
    except (KeyError, TypeError, ValueError):
        return facts
    return replace(facts, native_height=h, native_width=w)


def load_spec(path, facts: ModelFacts, dtypes: dict | None = None):
    from .cogvideox import CogVideoXSpec

    return CogVideoXSpec.load(path, facts, dtypes)


def transformer_skeleton(config: dict):
    from .cogvideox import transformer_skeleton as skeleton

    return skeleton(config)


def comfyui_extra_tensors(config: dict) -> dict:
    from .cogvideox import comfyui_extra_tensors as extra

    return extra(config)


def comfyui_caveats(config: dict) -> list[str]:
    from .cogvideox import comfyui_caveats as caveats

    return caveats(config)


def build_tiny_pipeline(variant: str, seed: int = 0):
    from .tiny import build_tiny_pipeline as build

    return build(variant, seed)


def tiny_size(variant: str) -> dict[str, int]:
    from .tiny import TINY_DEFAULTS

    return TINY_DEFAULTS[variant]


def memory_configs(name: str) -> dict:
    """The real-size configs the planner prices (see plan/memory.py)."""
    return real_configs(name)


# --- the real published configs ---------------------------------------------------------------------------------

_TRANSFORMER_BASE: dict[str, Any] = {
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 64, "dropout": 0.0,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 16, "max_text_seq_length": 226,
    "norm_elementwise_affine": True, "norm_eps": 1e-05, "num_attention_heads": 48, "num_layers": 42,
    "ofs_embed_dim": None, "out_channels": 16, "patch_bias": True, "patch_size": 2, "patch_size_t": None,
    "sample_frames": 49, "sample_height": 60, "sample_width": 90, "spatial_interpolation_scale": 1.875,
    "temporal_compression_ratio": 4, "temporal_interpolation_scale": 1.0, "text_embed_dim": 4096,
    "time_embed_dim": 512, "timestep_activation_fn": "silu", "use_learned_positional_embeddings": False,
    "use_rotary_positional_embeddings": True,
}
_V15 = {"patch_size_t": 2, "patch_bias": False, "sample_frames": 81, "sample_height": 300, "sample_width": 300}
_TRANSFORMER: dict[str, dict[str, Any]] = {
    "cogvideox-2b": {"num_attention_heads": 30, "num_layers": 30, "use_rotary_positional_embeddings": False},
    "cogvideox-5b": {},
    "cogvideox-5b-i2v": {"in_channels": 32, "use_learned_positional_embeddings": True},
    "cogvideox1.5-5b": dict(_V15),
    "cogvideox1.5-5b-i2v": {**_V15, "in_channels": 32, "ofs_embed_dim": 512},
}

_VAE_BASE: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 256, 512], "down_block_types": ["CogVideoXDownBlock3D"] * 4,
    "force_upcast": True, "in_channels": 3, "invert_scale_latents": False, "latent_channels": 16,
    "latents_mean": None, "latents_std": None, "layers_per_block": 3, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_height": 480, "sample_width": 720, "scaling_factor": 0.7, "shift_factor": None,
    "temporal_compression_ratio": 4, "up_block_types": ["CogVideoXUpBlock3D"] * 4,
    "use_post_quant_conv": False, "use_quant_conv": False,
}
_VAE: dict[str, dict[str, Any]] = {
    "cogvideox-2b": {"scaling_factor": 1.15258426},
    "cogvideox-5b": {},
    "cogvideox-5b-i2v": {},
    "cogvideox1.5-5b": {"invert_scale_latents": True},
    "cogvideox1.5-5b-i2v": {"invert_scale_latents": True},
}

_SCHEDULER_BASE: dict[str, Any] = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "clip_sample_range": 1.0, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": 1.0,
    "steps_offset": 0, "timestep_spacing": "trailing", "trained_betas": None,
}


def real_configs(name: str) -> dict[str, Any]:
    """Fresh copies of the published configs of variant `name`.

    Keys: pipeline_class, transformer, vae, scheduler_class, scheduler, recommended_scheduler_class, text_encoder_id.
    `CogVideoXTransformer3DModel(**out["transformer"])` builds the real-size model (random weights).
    """
    v = get_variant(name)
    return copy.deepcopy({
        "pipeline_class": "CogVideoXImageToVideoPipeline" if v.i2v else "CogVideoXPipeline",
        "transformer": {**_TRANSFORMER_BASE, **_TRANSFORMER[name]},
        "vae": {**_VAE_BASE, **_VAE[name]},
        "scheduler_class": "CogVideoXDDIMScheduler",
        "scheduler": {**_SCHEDULER_BASE, "snr_shift_scale": 3.0 if name == "cogvideox-2b" else 1.0},
        "recommended_scheduler_class": "CogVideoXDDIMScheduler" if name == "cogvideox-2b" else "CogVideoXDPMScheduler",
        "text_encoder_id": "google/t5-v1_1-xxl",  # T5 v1.1 XXL encoder, d_model 4096 = text_embed_dim
    })


def detect_variant(transformer_config: dict[str, Any], vae_config: dict[str, Any] | None = None) -> str:
    """The variant name a CogVideoXTransformer3DModel config belongs to (real-size or tiny).

    Old configs (diffusers 0.30) lack patch_size_t / use_rotary_positional_embeddings: missing means None / False.
    With `vae_config`, a VAE whose scaling_factor does not match the detected variant is refused.
    """
    cfg = transformer_config
    in_ch, out_ch = cfg.get("in_channels", 16), cfg.get("out_channels") or 16
    if in_ch not in (out_ch, 2 * out_ch):
        raise UndetectableVariant(f"transformer in_channels={in_ch}: not a CogVideoX variant (expected {out_ch} for "
                                  f"T2V or {2 * out_ch} for I2V); set model.variant if this is a custom model")
    i2v = in_ch == 2 * out_ch
    if cfg.get("patch_size_t") is not None:
        name = "cogvideox1.5-5b-i2v" if i2v else "cogvideox1.5-5b"
    elif cfg.get("use_rotary_positional_embeddings", False):
        name = "cogvideox-5b-i2v" if i2v else "cogvideox-5b"
    elif not i2v:
        name = "cogvideox-2b"
    else:
        raise UndetectableVariant("transformer has I2V inputs (in_channels=32) but no rotary embeddings: no official "
                                  "CogVideoX variant looks like that; set model.variant if this is a custom model")
    if vae_config is not None and "scaling_factor" in vae_config:
        expected = _VAE_BASE["scaling_factor"] if name != "cogvideox-2b" else _VAE["cogvideox-2b"]["scaling_factor"]
        if abs(float(vae_config["scaling_factor"]) - expected) > 1e-6:
            raise CogtuneError(f"vae scaling_factor={vae_config['scaling_factor']} does not belong with a {name} "
                               f"transformer (expected {expected}): the vae/ folder comes from another model")
    return name
