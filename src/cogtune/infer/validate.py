"""Validation videos during training: the stock pipeline over the weights being trained.

Peak memory stays flat: prompt embeddings are computed once up front (while the text encoder is loaded anyway), and
the pipeline used here is built without the text encoder, so the text encoder never comes back to the accelerator. Only the VAE
(small) visits the device for the call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.video import to_uint8_frames, write_mp4


def contact_sheet(videos: list[np.ndarray], labels: list[str], path: str | Path, columns: int = 8) -> np.ndarray:
    """One row per video ([F, H, W, 3] uint8), `columns` evenly spaced frames each, a label strip on the left."""
    h, w = videos[0].shape[1:3]
    label_w = 160
    sheet = Image.new("RGB", (label_w + columns * w, len(videos) * h), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (video, label) in enumerate(zip(videos, labels)):
        picks = np.linspace(0, len(video) - 1, min(columns, len(video))).round().astype(int)
        for col, i in enumerate(picks):
            sheet.paste(Image.fromarray(video[i]), (label_w + col * w, row * h))
        draw.text((4, row * h + 4), label[:24], fill="black")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
    return np.asarray(sheet)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in tensors.items()}


class Validator:
    def __init__(self, spec, cfg, frames: int, height: int, width: int, fps: int):
        self.spec, self.cfg, self.fps = spec, cfg, fps
        self.size = dict(num_frames=frames, height=height, width=width)
        self.prompts = list(cfg.prompts)
        self.guidance = cfg.guidance_scale if cfg.guidance_scale is not None else spec.facts.guidance
        self.images = [Image.open(p).convert("RGB").resize((width, height)) for p in cfg.images]
        # computed now, while the text encoder is still loaded
        self.embeds = [_cpu(spec.encode_prompts([p])) for p in self.prompts]
        self.negative = _cpu(spec.encode_prompts([""]))

    def __call__(self, transformer, out_dir: Path, device, autocast, media=None, step: int = 0,
                 write: bool = True) -> list[Path]:
        """Generate every prompt; `write=False` on ranks that only take part (sharded weights) and save nothing.
        `media(step, sheet, videos)`: where the contact sheet and the videos are reported (TensorBoard, W&B)."""
        spec = self.spec
        scheduler = type(spec.scheduler).from_config(spec.scheduler.config)  # the training scheduler keeps its state
        pipe = spec.pipeline(transformer, text_encoder=False, scheduler=scheduler)
        vae_device = spec.vae.device
        spec.vae.to(device)
        pipe.set_progress_bar_config(disable=True)
        was_training = transformer.training
        transformer.eval()
        if write:
            out_dir.mkdir(parents=True, exist_ok=True)
        videos, paths = [], []
        try:
            for i, (prompt, embeds) in enumerate(zip(self.prompts, self.embeds)):
                extra = {"image": self.images[i]} if spec.facts.i2v else {}
                # the pipelines take each text encoding `name` and its `negative_name` as keyword arguments
                text = {k: v.to(device, spec.compute_dtype) for k, v in embeds.items()} | {
                    f"negative_{k}": v.to(device, spec.compute_dtype) for k, v in self.negative.items()}
                with torch.no_grad(), autocast():
                    result = pipe(
                        **text,
                        num_inference_steps=self.cfg.inference_steps, guidance_scale=self.guidance,
                        generator=torch.Generator().manual_seed(self.cfg.seed + i), output_type="np",
                        **self.size, **extra,
                    )
                video = to_uint8_frames(result.frames[0], value_range=(0.0, 1.0))
                videos.append(video)
                if write:
                    paths.append(write_mp4(video, out_dir / f"{i:02d}.mp4", self.fps))
        finally:
            spec.vae.to(vae_device)
            transformer.train(was_training)
        if not write:
            return []
        sheet = contact_sheet(videos, self.prompts, out_dir / "contact_sheet.png")
        if media is not None:
            media(step, sheet, paths)
        return paths + [out_dir / "contact_sheet.png"]
