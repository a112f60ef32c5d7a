"""What the training loop may know about a model: this interface and nothing else.

A new model family is one new file implementing it. Tensors cross the boundary as plain dicts so that caches and
collation stay model-agnostic.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ModelSpec(Protocol):
    variant_name: str
    model_path: str
    transformer: torch.nn.Module
    default_lora_targets: list[str]

    def check_size(self, frames: int, height: int, width: int) -> None:
        """Raise CogtuneError (one line) when the model cannot train at this size."""

    def encode_prompts(self, captions: list[str]) -> torch.Tensor:
        """Text embeddings exactly as the inference pipeline computes them."""

    def encode_videos(self, videos: torch.Tensor, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Videos [B, F, 3, H, W] in [-1, 1] (and I2V conditioning images [B, 3, H, W], when listed) → cacheable
        tensors (latent distribution parameters, image latents)."""

    def training_loss(
        self,
        transformer: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        gens: list[torch.Generator],
        timesteps: torch.Tensor | None = None,
        loss_cfg=None,
        i2v_cfg=None,
    ) -> torch.Tensor:
        """Scalar loss for one batch of cached tensors; sample i draws all its randomness from gens[i]."""

    def set_vae_memory(self, slicing: bool, tiling: bool) -> None: ...

    def encoders_to(self, device: torch.device, dtype: torch.dtype | None = None, stream_text: bool = False) -> None:
        """Where and in which dtype the encoders run; stream_text: the text encoder visits layer by layer."""

    @property
    def encoder_dtype(self) -> torch.dtype:
        """The dtype the encoders run in now (part of the cache fingerprint)."""

    def encoders_for_training(self, text: bool, vae: bool) -> None:
        """Once everything is encoded: which encoders stay on the accelerator (the rest go to the CPU)."""

    def pipeline(self, transformer: torch.nn.Module | None = None):
        """The stock diffusers pipeline over this model's components (optionally with another transformer)."""

    def cast(self, dtype: torch.dtype) -> None:
        """The transformer's frozen weights go to `dtype`, its trainable ones to fp32, where they are."""

    def to(self, device: torch.device, keep_on_host=()) -> None:
        """Move the transformer to `device`, except the parameters in `keep_on_host`."""
