"""The CogVideoX family (all five variants) as a ModelSpec.

Everything the transformer sees during training is built the way the stock diffusers pipelines build it at inference
(`CogVideoXPipeline` / `CogVideoXImageToVideoPipeline`): rotary grids from the transformer config, latent frames padded
at the front for `patch_size_t` (the pipeline drops the first latent frames after sampling, so that is where padding
lives), image latents scaled by `scaling_factor` or by its inverse when the VAE says `invert_scale_latents`, zero
latents after the first frame, `ofs = 2.0` for 1.5-I2V.

The loss is the v-prediction objective of cogtune/objectives.py over the model's own scheduler.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

from ..errors import CogtuneError
from ..objectives import VPrediction, randn  # noqa: F401 (randn: its old home)
from .base import PipelineSpec
from .facts import ModelFacts
from .folder import _read_json, check_model_dir, pick_variant, resolve_variant  # noqa: F401 (their old home)
from .variants import _COMMON

MAX_TEXT_TOKENS = _COMMON["text_tokens"]  # the pipelines' default max_sequence_length


def transformer_skeleton(config: dict | str | Path) -> torch.nn.Module:
    """The transformer of a config (or of a pipeline folder) on the meta device: structure and shapes, no weights."""
    from diffusers import CogVideoXTransformer3DModel

    if not isinstance(config, dict):
        config = _read_json(Path(config) / "transformer" / "config.json")
    try:
        with torch.device("meta"):
            return CogVideoXTransformer3DModel.from_config(config)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:  # a config.json with values of the wrong kind
        raise CogtuneError(f"the transformer's config.json does not build a CogVideoX transformer "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:200]}): fetch it again") from None


class CogVideoXSpec(PipelineSpec):
    def __init__(self, pipe, facts: ModelFacts, model_path: str):
        super().__init__(pipe, facts, model_path)
        cfg = self.transformer.config
        self.patch_size, self.patch_size_t = cfg.patch_size, cfg.patch_size_t
        self.spatial_ratio = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.temporal_ratio = self.vae.config.temporal_compression_ratio
        self.scaling = self.vae.config.scaling_factor
        self.invert_image_scale = bool(self.vae.config.get("invert_scale_latents", False))
        self.objective = VPrediction(self.scheduler)

    # --- checks -------------------------------------------------------------------------------------------
    def check_size(self, frames: int, height: int, width: int) -> None:
        problem = self.facts.check_size(frames, height, width)
        if problem:
            raise CogtuneError(problem)
        cfg = self.transformer.config
        if cfg.use_learned_positional_embeddings and frames != cfg.sample_frames:
            # diffusers would silently swap the learned table for sin-cos
            raise CogtuneError(f"data.frames={frames}: {self.variant.name}'s learned positional embeddings are for "
                               f"{cfg.sample_frames} frames; set data.frames={cfg.sample_frames}")

    @property
    def vae_in_training(self) -> bool:
        """Whether the VAE encodes during training steps (I2V image noise re-encodes the first frame)."""
        return self.facts.i2v and (self.family_cfg is None or bool(self.family_cfg.image_noise))

    # --- encoding (no grad, frozen parts) ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self._on_device(self.pipe.text_encoder, away=self.vae)
        embeds, _ = self.pipe.encode_prompt(
            captions,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_TEXT_TOKENS,
            device=self.encode_device,
        )
        return {"prompt_embeds": embeds.float()}

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """[B, F, 3, H, W] → latent mean/logvar [B, C, f, h, w] (+ I2V conditioning-image ones: from `images`
        [B, 3, H, W] when the dataset lists images, else from the first selected frame)."""
        self._on_device(self.vae, away=self.pipe.text_encoder)
        x = videos.to(self.vae.device, self.vae.dtype).permute(0, 2, 1, 3, 4)
        dist = self.vae.encode(x).latent_dist
        out = {"latent_mean": dist.mean.float(), "latent_logvar": dist.logvar.float()}
        if self.variant.i2v:
            image = x[:, :, :1] if images is None else images.to(x)[:, :, None]
            first = self.vae.encode(image).latent_dist
            out |= {"image_mean": first.mean.float(), "image_logvar": first.logvar.float(),
                    "image_pixels": image[:, :, 0].float()}
        return out

    # --- transformer inputs, as the pipelines build them ------------------------------------------------------
    def pad_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, f, C, h, w]: repeat the first latent frame at the front up to a multiple of patch_size_t."""
        if not self.patch_size_t:
            return latents
        extra = (-latents.shape[1]) % self.patch_size_t
        return torch.cat([latents[:, :1].expand(-1, extra, -1, -1, -1), latents], dim=1) if extra else latents

    def image_condition(self, image_latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Unscaled first-frame latents [B, 1, C, h, w] → the pipeline's image input [B, num_frames, C, h, w]."""
        scale = 1 / self.scaling if self.invert_image_scale else self.scaling
        image_latents = image_latents * scale
        zeros = image_latents.new_zeros((image_latents.shape[0], num_frames - 1, *image_latents.shape[2:]))
        return torch.cat([image_latents, zeros], dim=1)

    def rotary_embeddings(self, frames: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        cfg = self.transformer.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        p = self.patch_size
        grid_h, grid_w = h // p, w // p
        base_h, base_w = cfg.sample_height // p, cfg.sample_width // p
        if self.patch_size_t is None:
            crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
            return get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(grid_h, grid_w),
                temporal_size=frames, device=device,
            )
        return get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
            temporal_size=(frames + self.patch_size_t - 1) // self.patch_size_t, grid_type="slice",
            max_size=(base_h, base_w), device=device,
        )

    def transformer_inputs(
        self, noisy: torch.Tensor, prompt_embeds: torch.Tensor, timesteps: torch.Tensor,
        image_latents: torch.Tensor | None = None,
    ) -> dict:
        """Keyword arguments for the transformer; `noisy` is [B, f, C, h, w] already padded."""
        hidden = noisy if image_latents is None else torch.cat([noisy, image_latents], dim=2)
        ofs = noisy.new_full((1,), 2.0) if self.transformer.config.ofs_embed_dim else None
        return {
            "hidden_states": hidden,
            "encoder_hidden_states": prompt_embeds,
            "timestep": timesteps,
            "ofs": ofs,
            "image_rotary_emb": self.rotary_embeddings(noisy.shape[1], noisy.shape[3], noisy.shape[4], noisy.device),
            "return_dict": False,
        }

    # --- the loss ---------------------------------------------------------------------------------------------
    def sample_timesteps(self, gens: list[torch.Generator], loss_cfg=None) -> torch.Tensor:
        return self.objective.sample(gens, loss_cfg)

    def prediction_loss(self, pred, x0, noisy, timesteps, weighting: str = "default") -> torch.Tensor:
        return self.objective.loss(pred, x0, None, noisy, timesteps, weighting)

    @torch.no_grad()
    def _image_latents(self, batch: dict, gens: list[torch.Generator], i2v_cfg) -> torch.Tensor:
        """Unscaled first-frame latents [B, 1, C, h, w]: re-encoded with pixel noise (official), or from the cache."""
        if i2v_cfg is not None and i2v_cfg.image_noise:
            pixels = batch["image_pixels"]  # [B, 3, H, W] in [-1, 1]
            sigma = torch.exp(-3.0 + 0.5 * randn(gens, (len(gens),))).to(pixels)
            noise = randn(gens, pixels.shape).to(pixels)
            noisy = (pixels + sigma.view(-1, 1, 1, 1) * noise).unsqueeze(2).to(self.vae.device, self.vae.dtype)
            dist = self.vae.encode(noisy).latent_dist
            latents = self._sample(dist.mean.float(), dist.logvar.float(), gens).to(pixels.device)
        else:
            latents = self._sample(batch["image_mean"], batch["image_logvar"], gens)
        latents = latents.permute(0, 2, 1, 3, 4)
        if i2v_cfg is not None and i2v_cfg.image_dropout > 0:
            keep = torch.cat([torch.rand(1, generator=g) for g in gens]) >= i2v_cfg.image_dropout
            latents = latents * keep.to(latents).view(-1, 1, 1, 1, 1)
        return latents

    def clean_latents(self, batch: dict, gens: list[torch.Generator] | None = None) -> torch.Tensor:
        """x0 as the transformer denoises it, [B, f, C, h, w] padded: a draw from the cached latent distribution (its
        mean without `gens`), scaled as the pipeline's decode step undoes it."""
        x0 = batch["latent_mean"] if gens is None else self._sample(batch["latent_mean"], batch["latent_logvar"], gens)
        return self.pad_frames(x0.permute(0, 2, 1, 3, 4) * self.scaling)

    def training_loss(self, transformer, batch, gens, timesteps=None, heldout: bool = False, loss_cfg=None,
                      i2v_cfg=None):
        """All randomness (latent sample, timestep, noise, image noise/dropout) of sample i comes from gens[i], so a
        sample's loss does not depend on which rank or micro-batch it lands in. `heldout`: the cached conditioning
        image as it is (no noise, no dropout). `loss_cfg`/`i2v_cfg` default to the configured ones."""
        loss_cfg = loss_cfg if loss_cfg is not None else self.loss_cfg
        i2v_cfg = None if heldout else (i2v_cfg if i2v_cfg is not None else self.family_cfg)
        dtype = self.compute_dtype
        x0 = self.clean_latents(batch, gens)
        if timesteps is None:
            timesteps = self.sample_timesteps(gens, loss_cfg)
        timesteps = self.objective.prepare(timesteps, x0.device)
        noise = randn(gens, x0.shape).to(x0)
        noisy = self.objective.add_noise(x0, noise, timesteps)
        image = None
        if self.variant.i2v:
            image = self.image_condition(self._image_latents(batch, gens, i2v_cfg), x0.shape[1]).to(dtype)
        kwargs = self.transformer_inputs(noisy.to(dtype), batch["prompt_embeds"].to(dtype), timesteps, image)
        pred = transformer(**kwargs)[0].float()
        weighting = loss_cfg.weighting if loss_cfg is not None else "default"
        return self.objective.loss(pred, x0, noise, noisy, timesteps, weighting)


# --- ComfyUI core's single-file layout (export/comfyui_model.py) ---------------------------------------------------
# ComfyUI core (comfy/model_detection.py, CogVideoX branch) reads a file's variant from its tensors alone: width from
# blocks.0.norm1.linear (heads = width // 64), in_channels / patch sizes from patch_embed.proj, ofs from its
# embedding, and "a patch_embed.pos_embedding is present" as learned table AND no RoPE (absent: RoPE). Its model
# (comfy/ldm/cogvideo/model.py) builds that table for sample 60x90x49 after 226 text tokens and slices it.
COMFY_HEAD_DIM = 64
COMFY_TABLE_SAMPLE = (60, 90, 49)  # sample_height, sample_width, sample_frames ComfyUI builds the table for
POSITIONS_KEY = "patch_embed.pos_embedding"


def comfyui_extra_tensors(config: dict) -> dict[str, torch.Tensor]:
    """Tensors ComfyUI's file needs that diffusers does not store: 2B's sin-cos table (a non-persistent buffer in
    diffusers), without which ComfyUI would pick RoPE. Keys in diffusers names."""
    from diffusers.models.embeddings import CogVideoXPatchEmbed

    cfg = transformer_skeleton(config).config  # the config with diffusers' defaults filled in
    if cfg.use_rotary_positional_embeddings or cfg.use_learned_positional_embeddings:
        return {}
    embed = CogVideoXPatchEmbed(
        patch_size=cfg.patch_size, patch_size_t=cfg.patch_size_t, in_channels=cfg.in_channels,
        embed_dim=cfg.num_attention_heads * cfg.attention_head_dim, text_embed_dim=cfg.text_embed_dim,
        bias=cfg.patch_bias, sample_width=cfg.sample_width, sample_height=cfg.sample_height,
        sample_frames=cfg.sample_frames, temporal_compression_ratio=cfg.temporal_compression_ratio,
        max_text_seq_length=cfg.max_text_seq_length, spatial_interpolation_scale=cfg.spatial_interpolation_scale,
        temporal_interpolation_scale=cfg.temporal_interpolation_scale, use_positional_embeddings=True,
        use_learned_positional_embeddings=False)
    return {POSITIONS_KEY: embed.pos_embedding.detach().clone()}


def comfyui_caveats(config: dict) -> list[str]:
    """Where ComfyUI core, reading only the tensors, would build this model differently from diffusers."""
    cfg = transformer_skeleton(config).config
    notes = []
    if cfg.attention_head_dim != COMFY_HEAD_DIM:
        notes.append(f"ComfyUI core assumes {COMFY_HEAD_DIM}-wide attention heads; this model has "
                     f"{cfg.num_attention_heads} heads of {cfg.attention_head_dim}, so ComfyUI would split its "
                     f"attention differently")
    if cfg.use_rotary_positional_embeddings and cfg.use_learned_positional_embeddings:
        notes.append("ComfyUI core reads a learned positional table as 'no RoPE', so it runs this model without its "
                     "rotary embeddings; a model trained with model.drop_learned_positions has no table and runs "
                     "with RoPE as in diffusers")
    has_table = cfg.use_learned_positional_embeddings or not cfg.use_rotary_positional_embeddings
    sample = (cfg.sample_height, cfg.sample_width, cfg.sample_frames)
    if has_table and (sample != COMFY_TABLE_SAMPLE or cfg.max_text_seq_length != MAX_TEXT_TOKENS):
        notes.append(f"ComfyUI core builds the positional table for sample {COMFY_TABLE_SAMPLE[0]}x"
                     f"{COMFY_TABLE_SAMPLE[1]}x{COMFY_TABLE_SAMPLE[2]} after {MAX_TEXT_TOKENS} text tokens; this "
                     f"model's is for {sample[0]}x{sample[1]}x{sample[2]} after {cfg.max_text_seq_length}, so the "
                     f"file will not load there")
    if not cfg.use_rotary_positional_embeddings and not cfg.use_learned_positional_embeddings:
        notes.append("ComfyUI core slices the stored sin-cos table where diffusers recomputes it for the size "
                     "asked: outputs match at the model's native height and width")
    return notes
