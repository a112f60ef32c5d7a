"""The CogVideoX family (all five variants) as a ModelSpec.

Everything the transformer sees during training is built the way the stock diffusers pipelines build it at inference
(`CogVideoXPipeline` / `CogVideoXImageToVideoPipeline`): rotary grids from the transformer config, latent frames padded
at the front for `patch_size_t` (the pipeline drops the first latent frames after sampling, so that is where padding
lives), image latents scaled by `scaling_factor` or by its inverse when the VAE says `invert_scale_latents`, zero
latents after the first frame, `ofs = 2.0` for 1.5-I2V.

Loss ("official", as every CogVideoX trainer defines it): t ~ U{0..T-1}; x_t = add_noise(x0, ε, t); the output is
read as v; x̂0 = get_velocity(out, x_t, t) = sqrt(ᾱ)·x_t − sqrt(1−ᾱ)·out; loss = mean(w·(x̂0 − x0)²) with
w = 1/(1−ᾱ_t). Since x̂0 − x0 = −sqrt(1−ᾱ)·(out − v), this is exactly the plain MSE on v; "none" drops w and so
down-weights low-noise timesteps by (1−ᾱ_t).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

from ..errors import CogtuneError
from .folder import _read_json, check_model_dir, pick_variant, resolve_variant  # noqa: F401 (their old home)
from .variants import Variant

MAX_TEXT_TOKENS = 226  # the pipelines' default max_sequence_length


def randn(gens: list[torch.Generator], shape) -> torch.Tensor:
    """Standard normal noise of `shape` (batch first), sample i drawn from gens[i] (on the CPU, so any device agrees)."""
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in gens])


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


class CogVideoXSpec:
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]

    def __init__(self, pipe, variant: Variant, model_path: str):
        self.pipe = pipe
        self.variant = variant
        self.variant_name = variant.name
        self.model_path = model_path
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        cfg = self.transformer.config
        self.patch_size, self.patch_size_t = cfg.patch_size, cfg.patch_size_t
        self.spatial_ratio = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.temporal_ratio = self.vae.config.temporal_compression_ratio
        self.scaling = self.vae.config.scaling_factor
        self.invert_image_scale = bool(self.vae.config.get("invert_scale_latents", False))
        self.compute_dtype = torch.float32
        self.encode_device = torch.device("cpu")
        self.text_streamed = False  # T5 lives on the CPU and streams to encode_device layer by layer

    @classmethod
    def load(cls, path: str | Path, variant: str | None = None, dtypes: dict | None = None) -> "CogVideoXSpec":
        var = resolve_variant(path, variant)
        dtype = {"default": torch.float32, **dtypes} if dtypes else torch.float32
        pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True, use_safetensors=True)
        for part in (pipe.transformer, pipe.vae, pipe.text_encoder):
            part.requires_grad_(False)
        return cls(pipe, var, str(path))

    # --- checks -------------------------------------------------------------------------------------------
    def check_size(self, frames: int, height: int, width: int) -> None:
        problem = self.variant.check_frames(frames)
        if problem:
            raise CogtuneError(f"data.frames={frames}: {problem}")
        unit = self.spatial_ratio * self.patch_size
        if height % unit or width % unit:
            raise CogtuneError(f"data.height/width {height}x{width}: both must be multiples of {unit} for {self.variant.name}")
        cfg = self.transformer.config
        if cfg.use_learned_positional_embeddings:
            native = (cfg.sample_height * self.spatial_ratio, cfg.sample_width * self.spatial_ratio)
            if (height, width) != native:
                raise CogtuneError(
                    f"data.height/width {height}x{width}: {self.variant.name} has learned positional embeddings "
                    f"that fix its size to {native[0]}x{native[1]}; set data.height={native[0]} data.width={native[1]}"
                )
            if frames != cfg.sample_frames:  # diffusers would silently swap the learned table for sin-cos
                raise CogtuneError(
                    f"data.frames={frames}: {self.variant.name}'s learned positional embeddings are for "
                    f"{cfg.sample_frames} frames; set data.frames={cfg.sample_frames}"
                )

    # --- encoding (no grad, frozen parts) ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> torch.Tensor:
        self._on_device(self.pipe.text_encoder, away=self.vae)
        embeds, _ = self.pipe.encode_prompt(
            captions,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_TEXT_TOKENS,
            device=self.encode_device,
        )
        return embeds.float()

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

    @staticmethod
    def _sample(mean: torch.Tensor, logvar: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * randn(gens, mean.shape).to(mean)

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
        steps = self.scheduler.config.num_train_timesteps
        if loss_cfg is None or loss_cfg.timestep_sampling == "uniform":
            return torch.cat([torch.randint(0, steps, (1,), generator=g) for g in gens])
        u = torch.sigmoid(loss_cfg.logit_mean + loss_cfg.logit_std * randn(gens, (len(gens),)))
        shift = loss_cfg.timestep_shift
        u = shift * u / (1 + (shift - 1) * u)
        return (u * (steps - 1)).round().long()

    def prediction_loss(self, pred, x0, noisy, timesteps, weighting: str = "official") -> torch.Tensor:
        """Per-batch mean of w·(x̂0 − x0)² with x̂0 = get_velocity(pred, x_t, t) (see the module docstring)."""
        x0_hat = self.scheduler.get_velocity(pred, noisy, timesteps)
        err = (x0_hat - x0) ** 2
        if weighting == "official":
            alpha_bar = self.scheduler.alphas_cumprod.to(x0.device)[timesteps].to(err.dtype)
            err = err / (1 - alpha_bar).view(-1, *[1] * (err.dim() - 1))
        return err.reshape(err.shape[0], -1).mean(dim=1).mean()

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

    def training_loss(self, transformer, batch, gens, timesteps=None, loss_cfg=None, i2v_cfg=None):
        """All randomness (latent sample, timestep, noise, image noise/dropout) of sample i comes from gens[i], so a
        sample's loss does not depend on which rank or micro-batch it lands in."""
        dtype = self.compute_dtype
        x0 = self._sample(batch["latent_mean"], batch["latent_logvar"], gens)
        x0 = self.pad_frames(x0.permute(0, 2, 1, 3, 4) * self.scaling)  # [B, f, C, h, w]
        if timesteps is None:
            timesteps = self.sample_timesteps(gens, loss_cfg)
        timesteps = timesteps.to(x0.device).long()
        noise = randn(gens, x0.shape).to(x0)
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        image = None
        if self.variant.i2v:
            image = self.image_condition(self._image_latents(batch, gens, i2v_cfg), x0.shape[1]).to(dtype)
        kwargs = self.transformer_inputs(noisy.to(dtype), batch["prompt_embeds"].to(dtype), timesteps, image)
        pred = transformer(**kwargs)[0].float()
        weighting = loss_cfg.weighting if loss_cfg is not None else "official"
        return self.prediction_loss(pred, x0, noisy, timesteps, weighting)

    # --- devices and inference ----------------------------------------------------------------------------
    def set_vae_memory(self, slicing: bool, tiling: bool) -> None:
        (self.vae.enable_slicing if slicing else self.vae.disable_slicing)()
        (self.vae.enable_tiling if tiling else self.vae.disable_tiling)()

    def encoders_to(self, device, dtype: torch.dtype | None = None, stream_text: bool = False) -> None:
        """Where (and in which dtype) T5 and the VAE encode. Each moves to `device` when it is used and sends the
        other one back to the CPU, so the accelerator holds one of them at a time: T5-XXL alone is 9.5 GB in bf16.
        `stream_text`: T5 stays on the CPU and each layer visits `device` for its forward, the next one prefetched
        (diffusers' leaf-level group offloading): ~0.5 GB on the accelerator instead of 9.5."""
        self.encode_device = torch.device(device)
        for part in (self.vae, self.pipe.text_encoder):
            if dtype not in (None, part.dtype):  # .to() with a dtype makes diffusers warn, even when it is a no-op
                part.to(dtype=dtype)
        if stream_text and not self.text_streamed:
            from diffusers.hooks import apply_group_offloading

            self.pipe.text_encoder.to("cpu")
            apply_group_offloading(self.pipe.text_encoder, onload_device=self.encode_device, offload_type="leaf_level",
                                   use_stream=self.encode_device.type == "cuda")
            self.text_streamed = True

    def _on_device(self, part, away) -> None:
        """`part` to the encode device, `away` to the CPU (a streamed T5 is never moved as a whole)."""
        for module, where in ((away, torch.device("cpu")), (part, self.encode_device)):
            if module is self.pipe.text_encoder and self.text_streamed:
                continue
            if module.device != where:
                module.to(where)
                if where.type == "cpu" and torch.cuda.is_available():
                    torch.cuda.empty_cache()

    @property
    def encoder_dtype(self) -> torch.dtype:
        return self.pipe.text_encoder.dtype

    def encoders_for_training(self, text: bool, vae: bool) -> None:
        """Once everything is encoded: which encoders stay on the accelerator (the rest go to the CPU)."""
        if not self.text_streamed:
            self.pipe.text_encoder.to(self.encode_device if text else "cpu")
        self.vae.to(self.encode_device if vae else "cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def cast(self, dtype) -> None:
        self.compute_dtype = dtype
        for p in self.transformer.parameters():
            p.data = p.data.to(dtype if not p.requires_grad else torch.float32)

    def to(self, device, keep_on_host=()) -> None:
        # parameter by parameter, so weights that block offload keeps on the host never visit the device
        keep = {id(p) for p in keep_on_host}
        for module in self.transformer.modules():
            for p in module.parameters(recurse=False):
                if id(p) not in keep:
                    p.data = p.data.to(device)
            for name, b in module.named_buffers(recurse=False):
                setattr(module, name, b.to(device))

    def pipeline(self, transformer=None):
        if transformer is None or transformer is self.transformer:
            return self.pipe
        return type(self.pipe)(**{**self.pipe.components, "transformer": transformer})
