"""What the training loop, the cache and validation may know about a model: this interface and nothing else.

A new model family is one new module (see models/__init__.py) whose spec implements it. Tensors cross the boundary
as plain dicts (latents from `encode_videos`, text encodings from `encode_prompts`) so that caches and collation stay
model-agnostic; the loss comes from the family's objective (cogtune/objectives.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from .facts import ModelFacts


class ModelSpec(Protocol):
    facts: ModelFacts
    variant_name: str
    model_path: str
    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    objective: object  # VPrediction or FlowMatching: sample, add_noise, loss, heldout_points
    compute_dtype: torch.dtype
    default_lora_targets: list[str]

    def check_size(self, frames: int, height: int, width: int) -> None:
        """Raise CogtuneError (one line) when the model cannot train at this size."""

    def configure(self, loss_cfg=None, family_cfg=None) -> None:
        """The run's `loss:` section and the family's own options (validated by the family)."""

    @property
    def vae_in_training(self) -> bool:
        """Whether training steps use the VAE (so it must stay on the accelerator)."""

    def text_fingerprint(self) -> dict:
        """What besides the text encoder's files changes the cached text encodings."""

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text encodings exactly as the inference pipeline computes them, each [n, ...]; every key `name` is a
        keyword of the pipeline's call (and `negative_name` its negative)."""

    def encode_videos(self, videos: torch.Tensor, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Videos [B, F, 3, H, W] in [-1, 1] (and I2V conditioning images [B, 3, H, W], when listed) → cacheable
        tensors (latent distribution parameters, image latents)."""

    def clean_latents(self, batch: dict[str, torch.Tensor], gens: list[torch.Generator] | None = None) -> torch.Tensor:
        """x0 in the layout and scale the transformer denoises (the inverse of the pipeline's decode step): a draw
        from the cached latent distribution, or its mean without `gens`."""

    def transformer_inputs(self, noisy: torch.Tensor, prompt_embeds: torch.Tensor, timesteps: torch.Tensor,
                           image_latents: torch.Tensor | None = None) -> dict:
        """The transformer's keyword arguments, exactly as the pipeline builds them for the same tensors."""

    def training_loss(self, transformer: torch.nn.Module, batch: dict[str, torch.Tensor],
                      gens: list[torch.Generator], timesteps: torch.Tensor | None = None,
                      heldout: bool = False) -> torch.Tensor:
        """Scalar loss for one batch of cached tensors; sample i draws all its randomness from gens[i].
        `timesteps`: fixed ones (the objective's heldout_points); `heldout`: no augmentation of the conditioning."""

    def blocks(self) -> list[torch.nn.Module]:
        """The transformer's repeated blocks, in order (what checkpointing, offload and compilation work on)."""

    def set_vae_memory(self, slicing: bool, tiling: bool) -> None: ...

    def encoders_to(self, device: torch.device, dtype: torch.dtype | None = None, stream_text: bool = False) -> None:
        """Where and in which dtype the encoders run; stream_text: the text encoder visits layer by layer."""

    @property
    def encoder_dtype(self) -> torch.dtype:
        """The dtype the encoders run in now (part of the cache fingerprint)."""

    def encoders_for_training(self, text: bool, vae: bool) -> None:
        """Once everything is encoded: which encoders stay on the accelerator (the rest go to the CPU)."""

    def pipeline(self, transformer: torch.nn.Module | None = None, text_encoder: bool = True, scheduler=None):
        """The stock diffusers pipeline over this model's components (optionally another transformer or scheduler;
        without the text encoder it takes text encodings only)."""

    def cast(self, dtype: torch.dtype) -> None:
        """The transformer's frozen weights go to `dtype`, its trainable ones to fp32, where they are."""

    def to(self, device: torch.device, keep_on_host=()) -> None:
        """Move the transformer to `device`, except the parameters in `keep_on_host`."""
