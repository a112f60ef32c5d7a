"""The Wan 2.1 text-to-video family (1.3B and 14B) as a ModelSpec: its registry entry, tiny build and training inputs.

Built the way diffusers' `WanPipeline` builds its inputs at inference: latents [B, 16, (F−1)/4+1, H/8, W/8] channels
first, normalised per channel by the VAE's `latents_mean`/`latents_std` (the pipeline decodes z·std + mean, so a clip
encodes to (x − mean)/std), UMT5 prompt embeddings padded with zeros to 512 tokens (`max_sequence_length` of the
pipeline's call), the timestep as σ·1000. The objective is flow matching (cogtune/objectives.py).

Sources (checked 2026-12): diffusers `pipelines/wan/pipeline_wan.py` and `models/transformers/transformer_wan.py`;
hub `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` and `-14B-Diffusers` configs: transformer 12 heads × 128, 30 layers, ffn 8960
(1.3B) and 40 heads × 128, 40 layers, ffn 13824 (14B), patch (1, 2, 2), text_dim 4096; VAE z_dim 16 with 8×
spatial and 4× temporal compression; `UniPCMultistepScheduler` with flow sigmas, flow_shift 3.0; native 81 frames
at 16 fps, 480×832 (1.3B) and 720×1280 (14B); guidance 5.0.
"""

from __future__ import annotations

import torch

from ..errors import CogtuneError
from ..objectives import FlowMatching, randn
from .base import PipelineSpec
from .facts import ModelFacts, UndetectableVariant

FAMILY = "wan"
CONFIG_KEYS = ("ffn_dim", "text_dim")
PIPELINES = ("WanPipeline",)
OPTIONS = None  # no options of its own
COMFYUI_LORAS = False  # ComfyUI's names for Wan LoRAs: not yet
TEXT_TOKENS = 512
_COMMON = dict(
    family=FAMILY, i2v=False, frame_step=4, max_n=40, native_frames=81, fps=16, size_multiple=16,
    fixed_resolution=False, text_tokens=TEXT_TOKENS, guidance=5.0, objective="flow_matching",
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"), block_classes=("WanTransformerBlock",),
    fp8_skip=("patch_embedding", "condition_embedder", "norm", "lora_", "proj_out", "scale_shift_table"),
    transformer_class="WanTransformer3DModel", attention_dispatch=True,
)
VARIANTS: dict[str, ModelFacts] = {
    "wan2.1-t2v-1.3b": ModelFacts(name="wan2.1-t2v-1.3b", native_height=480, native_width=832,
                                  hub_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", **_COMMON),
    "wan2.1-t2v-14b": ModelFacts(name="wan2.1-t2v-14b", native_height=720, native_width=1280,
                                 hub_id="Wan-AI/Wan2.1-T2V-14B-Diffusers", **_COMMON),
}
TINY_SIZE = {"frames": 9, "height": 32, "width": 48}  # latent 3 × 4 × 6, 2 × 3 patches a latent frame


def get_variant(name: str) -> ModelFacts:
    if name not in VARIANTS:
        raise CogtuneError(f"unknown Wan variant {name!r}: use one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def detect_variant(transformer_config: dict, vae_config: dict | None = None) -> str:
    """1.3B and 14B share one structure; their feed-forward width tells them apart (5.8× the model width against
    2.7×), which the tiny builds keep."""
    cfg = transformer_config
    if cfg.get("image_dim") or cfg.get("added_kv_proj_dim") or cfg.get("in_channels", 16) != cfg.get("out_channels", 16):
        raise CogtuneError("this Wan transformer takes image inputs (an I2V or other Wan model): cogtune trains "
                           "Wan 2.1 text-to-video only so far")
    try:
        ratio = cfg["ffn_dim"] / (cfg["num_attention_heads"] * cfg["attention_head_dim"])
    except (KeyError, TypeError, ZeroDivisionError):
        raise UndetectableVariant("the Wan transformer config lacks ffn_dim / num_attention_heads / "
                                  "attention_head_dim: set model.variant") from None
    return "wan2.1-t2v-1.3b" if ratio > 4 else "wan2.1-t2v-14b"


def folder_facts(facts: ModelFacts, transformer_config: dict) -> ModelFacts:
    return facts


def memory_configs(name: str) -> None:
    return None  # no memory profile yet: `cogtune plan` says so


def transformer_skeleton(config: dict) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    try:
        with torch.device("meta"):
            return WanTransformer3DModel.from_config(config)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CogtuneError(f"the transformer's config.json does not build a Wan transformer "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:200]}): fetch it again") from None


def load_spec(path, facts: ModelFacts, dtypes: dict | None = None) -> "WanSpec":
    return WanSpec.load(path, facts, dtypes)


def tiny_size(variant: str) -> dict[str, int]:
    return dict(TINY_SIZE)


def build_tiny_pipeline(variant: str, seed: int = 0):
    """The real Wan classes at a size where a CPU step takes milliseconds (float32, deterministic for `seed`)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from .tiny import TEXT_DIM, build_tokenizer

    get_variant(variant)
    tokenizer = build_tokenizer()
    width = 2 * 12  # heads × head_dim
    ffn = {"wan2.1-t2v-1.3b": 140, "wan2.1-t2v-14b": 64}[variant]  # 5.8× / 2.7× the width, as the real ones
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=width // 2, in_channels=16,
            out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=ffn, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)


class WanSpec(PipelineSpec):
    def __init__(self, pipe, facts: ModelFacts, model_path: str):
        super().__init__(pipe, facts, model_path)
        self.objective = FlowMatching(self.scheduler.config.num_train_timesteps)
        z = self.vae.config.z_dim
        self.latents_mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        self.latents_std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)

    def text_fingerprint(self) -> dict:
        from diffusers.utils import is_ftfy_available

        # the pipeline cleans prompts with ftfy when it is installed: with it, some captions encode differently
        return {"max_length": TEXT_TOKENS, "ftfy": is_ftfy_available()}

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self._on_device(self.pipe.text_encoder, away=self.vae)
        embeds, _ = self.pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                            max_sequence_length=TEXT_TOKENS, device=self.encode_device)
        return {"prompt_embeds": embeds.float()}

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """[B, F, 3, H, W] in [-1, 1] → latent mean/logvar [B, 16, f, h, w] (unnormalised, as the VAE gives them)."""
        self._on_device(self.vae, away=self.pipe.text_encoder)
        dist = self.vae.encode(videos.to(self.vae.device, self.vae.dtype).permute(0, 2, 1, 3, 4)).latent_dist
        return {"latent_mean": dist.mean.float(), "latent_logvar": dist.logvar.float()}

    def clean_latents(self, batch: dict, gens: list[torch.Generator] | None = None) -> torch.Tensor:
        """x0 as the transformer denoises it, [B, 16, f, h, w]: a draw from the cached latent distribution (its mean
        without `gens`), normalised per channel (the inverse of the pipeline's decode step)."""
        x = batch["latent_mean"] if gens is None else self._sample(batch["latent_mean"], batch["latent_logvar"], gens)
        return (x - self.latents_mean.to(x)) / self.latents_std.to(x)

    def transformer_inputs(self, noisy: torch.Tensor, prompt_embeds: torch.Tensor, timestep: torch.Tensor,
                           image_latents: None = None) -> dict:
        """Keyword arguments for the transformer, as WanPipeline passes them; `noisy` is [B, 16, f, h, w]."""
        return {"hidden_states": noisy, "timestep": timestep, "encoder_hidden_states": prompt_embeds,
                "return_dict": False}

    def training_loss(self, transformer, batch, gens, timesteps=None, heldout: bool = False):
        """Latent sample, σ and noise of sample i all come from gens[i]."""
        dtype = self.compute_dtype
        x0 = self.clean_latents(batch, gens)
        sigma = self.objective.sample(gens, self.loss_cfg) if timesteps is None else timesteps
        sigma = self.objective.prepare(sigma, x0.device)
        noise = randn(gens, x0.shape).to(x0)
        noisy = self.objective.add_noise(x0, noise, sigma)
        kwargs = self.transformer_inputs(noisy.to(dtype), batch["prompt_embeds"].to(dtype),
                                         self.objective.model_timestep(sigma))
        pred = transformer(**kwargs)[0].float()
        weighting = self.loss_cfg.weighting if self.loss_cfg is not None else "default"
        return self.objective.loss(pred, x0, noise, noisy, sigma, weighting)

