"""Generate videos with the stock diffusers pipeline, optionally with LoRA adapters loaded by name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from ..data.video import write_mp4
from ..errors import CogtuneError
from ..models.cogvideox import resolve_variant
from ..train.lora import WEIGHT_NAME


@dataclass
class LoraSpec:
    path: Path
    weight: float = 1.0
    name: str | None = None

    @classmethod
    def parse(cls, text: str, index: int = 0) -> "LoraSpec":
        """`PATH[:WEIGHT][@NAME]`; PATH is a LoRA file or a folder holding pytorch_lora_weights.safetensors."""
        name = None
        if "@" in text:
            text, name = text.rsplit("@", 1)
        weight = 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                weight, text = float(tail), head
            except ValueError:
                pass
        path = Path(text)
        if path.is_dir():
            path = path / WEIGHT_NAME
        if not path.is_file():
            raise CogtuneError(f"--lora {text}: no such file (give a .safetensors file or a folder holding {WEIGHT_NAME})")
        return cls(path, weight, name or f"lora{index}")


def default_size(model_dir: Path) -> tuple[int, int, int, int]:
    """(frames, height, width, fps): the variant's native ones, or the tiny model's own."""
    variant = resolve_variant(model_dir)
    tiny = model_dir / "cogtune_tiny.json"
    if tiny.is_file():
        t = json.loads(tiny.read_text())
        return t["frames"], t["height"], t["width"], variant.fps
    return variant.native_frames, variant.native_height, variant.native_width, variant.fps


def load_pipeline(model_dir: str | Path, loras: list[LoraSpec] = (), dtype: torch.dtype = torch.float32):
    resolve_variant(model_dir)  # clear error for a folder that is not a CogVideoX pipeline
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    for lora in loras:
        pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=lora.name)
    if loras:
        pipe.set_adapters([l.name for l in loras], [l.weight for l in loras])
    return pipe


def generate(
    model: str | Path, prompt: str, out: str | Path, loras: list[str] = (), frames: int | None = None,
    height: int | None = None, width: int | None = None, steps: int = 50, seed: int = 0,
    guidance_scale: float = 6.0, fps: int | None = None, device: str | None = None,
) -> Path:
    model = Path(model)
    d_frames, d_height, d_width, d_fps = default_size(model)
    specs = [LoraSpec.parse(text, i) for i, text in enumerate(loras)]
    pipe = load_pipeline(model, specs)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = pipe(
        prompt=prompt, num_frames=frames or d_frames, height=height or d_height, width=width or d_width,
        num_inference_steps=steps, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    video = result.frames[0]  # [F, H, W, 3] float in [0, 1]
    return write_mp4(video, out, fps or d_fps)
