"""What every diffusers-pipeline family spec shares: loading, where the encoders run, casting and moving the
transformer, the stock pipeline over its parts. A family subclasses PipelineSpec and adds its checks, encoders and
loss (see models/spec.py for the whole interface)."""

from __future__ import annotations

from pathlib import Path

import torch

from .facts import ModelFacts


class PipelineSpec:
    def __init__(self, pipe, facts: ModelFacts, model_path: str):
        self.pipe = pipe
        self.facts = self.variant = facts  # `variant`: the old name
        self.variant_name = facts.name
        self.default_lora_targets = list(facts.lora_targets)
        self.model_path = model_path
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.compute_dtype = torch.float32
        self.encode_device = torch.device("cpu")
        self.text_streamed = False  # the text encoder lives on the CPU and streams to encode_device layer by layer
        self.loss_cfg = self.family_cfg = None

    @classmethod
    def load(cls, path: str | Path, variant: ModelFacts | str | None = None, dtypes: dict | None = None):
        if not isinstance(variant, ModelFacts):
            from . import resolve_variant

            variant = resolve_variant(path, variant)
        from diffusers import DiffusionPipeline

        from .. import quiet_libraries
        from . import config_changes, load_transformer

        quiet_libraries()
        dtype = {"default": torch.float32, **dtypes} if dtypes else torch.float32
        parts = {}
        if config_changes(Path(path) / "transformer", variant):  # e.g. built without the learned positional table
            own = dtype.get("transformer", dtype["default"]) if isinstance(dtype, dict) else dtype
            parts["transformer"] = load_transformer(Path(path) / "transformer", own, variant)
        pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True, use_safetensors=True,
                                                 **parts)
        for part in (pipe.transformer, pipe.vae, pipe.text_encoder):
            part.requires_grad_(False)
        return cls(pipe, variant, str(path))

    def check_size(self, frames: int, height: int, width: int) -> None:
        from ..errors import CogtuneError

        problem = self.facts.check_size(frames, height, width)
        if problem:
            raise CogtuneError(problem)

    def configure(self, loss_cfg=None, family_cfg=None) -> None:
        """The run's `loss:` section and this family's own options (CogVideoX: the `i2v:` section)."""
        self.loss_cfg, self.family_cfg = loss_cfg, family_cfg

    @property
    def vae_in_training(self) -> bool:
        return False

    def text_fingerprint(self) -> dict:
        return {"max_length": self.facts.text_tokens}

    def blocks(self) -> list[torch.nn.Module]:
        from . import repeated_blocks

        return repeated_blocks(self.transformer)

    @staticmethod
    def _sample(mean: torch.Tensor, logvar: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """A draw from the VAE's latent distribution, sample i's noise from gens[i]."""
        from ..objectives import randn

        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * randn(gens, mean.shape).to(mean)

    # --- devices and inference ----------------------------------------------------------------------------
    def set_vae_memory(self, slicing: bool, tiling: bool) -> None:
        (self.vae.enable_slicing if slicing else self.vae.disable_slicing)()
        (self.vae.enable_tiling if tiling else self.vae.disable_tiling)()

    def encoders_to(self, device, dtype: torch.dtype | None = None, stream_text: bool = False) -> None:
        """Where (and in which dtype) the text encoder and the VAE encode. Each moves to `device` when it is used and
        sends the other one back to the CPU, so the accelerator holds one of them at a time (T5-XXL alone is 9.5 GB
        in bf16). `stream_text`: the text encoder stays on the CPU and each layer visits `device` for its forward,
        the next one prefetched (diffusers' leaf-level group offloading): ~0.5 GB on the accelerator for T5-XXL."""
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
        """`part` to the encode device, `away` to the CPU (a streamed text encoder is never moved as a whole)."""
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

    def pipeline(self, transformer=None, text_encoder: bool = True, scheduler=None):
        """The stock pipeline over these components; without the text encoder it takes prompt embeddings only."""
        if (transformer is None or transformer is self.transformer) and text_encoder and scheduler is None:
            return self.pipe
        parts = {**self.pipe.components, "transformer": transformer or self.transformer}
        if not text_encoder:
            parts |= {"tokenizer": None, "text_encoder": None}
        if scheduler is not None:
            parts["scheduler"] = scheduler
        return type(self.pipe)(**parts)
