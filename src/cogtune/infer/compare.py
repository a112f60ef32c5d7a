"""`cogtune generate --compare`: one seed and prompt through the base model, each adapter alone and all together.

The adapters are loaded once and switched with `set_adapters` / `disable_lora`; the prompt is encoded once. Output:
one side-by-side mp4 (a labelled column per run) and `<out>.png`, a contact sheet with a row per run and a column per
sampled frame.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.video import to_uint8_frames, write_mp4
from ..errors import CogtuneError
from .generate import (LoraSpec, Settings, StepCallback, activate_adapters, build_pipeline, check_video_out,
                       encode_prompt, parse_loras, resolve_settings, sample)

RunCallback = Callable[[int, int, str], None]  # (run index from 1, runs in all, label)


def comparison_runs(loras: Sequence[LoraSpec]) -> list[tuple[str, list[LoraSpec]]]:
    """(label, active adapters) per column: base, each adapter alone at its weight, then all together (if > 1)."""
    runs: list[tuple[str, list[LoraSpec]]] = [("base", [])]
    runs += [(f"{l.name} x{l.weight:g}", [l]) for l in loras]
    if len(loras) > 1:  # with one adapter the combination is that adapter's column again
        runs.append(("+".join(l.name for l in loras) if len(loras) <= 3 else f"all {len(loras)}", list(loras)))
    return runs


def strip_height(frame_height: int) -> int:
    """Label strip above each column: readable on tiny test frames, about 1/16 of the frame on real ones; even."""
    return max(16, frame_height // 16 + 1) // 2 * 2


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: a fixed-size bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


def label_strip(labels: Sequence[str], column_width: int, height: int) -> np.ndarray:
    """A white strip [height, len(labels) * column_width, 3] with each label centred over its column."""
    strip = Image.new("RGB", (column_width * len(labels), height), "white")
    draw = ImageDraw.Draw(strip)
    font = _font(max(8, height * 3 // 4 - 1))
    for i, label in enumerate(labels):
        text = _fit(draw, label, font, column_width - 4)
        x = i * column_width + (column_width - draw.textlength(text, font=font)) / 2
        draw.text((x, height / 2), text, fill="black", font=font, anchor="lm")
        if i:
            draw.line([(i * column_width, 0), (i * column_width, height)], fill="gray")
    return np.asarray(strip)


def side_by_side(videos: Sequence[np.ndarray], labels: Sequence[str]) -> np.ndarray:
    """Clips [F, H, W, 3] uint8 of one shape, side by side under a label strip: [F, strip + H, N * W, 3]."""
    frames, h, w = videos[0].shape[:3]
    if any(v.shape != videos[0].shape for v in videos):
        raise ValueError(f"side_by_side needs clips of one shape, got {[v.shape for v in videos]}")
    strip = label_strip(labels, w, strip_height(h))
    body = np.concatenate(list(videos), axis=2)
    return np.concatenate([np.broadcast_to(strip, (frames, *strip.shape)), body], axis=1)


def comparison_sheet(videos: Sequence[np.ndarray], labels: Sequence[str], path: str | Path,
                     columns: int = 8) -> np.ndarray:
    """PNG with a row per clip (labelled on the left) and a column per sampled frame (labelled on top); atomic."""
    frames, h, w = videos[0].shape[:3]
    picks = np.linspace(0, frames - 1, min(columns, frames)).round().astype(int)
    top = strip_height(h)
    font = _font(max(8, top * 3 // 4 - 1))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(min(320, max(probe.textlength(l, font=font) for l in labels))) + 12
    sheet = Image.new("RGB", (left + len(picks) * w, top + len(videos) * h), "white")
    sheet.paste(Image.fromarray(label_strip([f"frame {i}" for i in picks], w, top)), (left, 0))
    draw = ImageDraw.Draw(sheet)
    for row, (video, label) in enumerate(zip(videos, labels)):
        for col, i in enumerate(picks):
            sheet.paste(Image.fromarray(video[i]), (left + col * w, top + row * h))
        draw.text((6, top + row * h + h / 2), _fit(draw, label, font, left - 8), fill="black", font=font, anchor="lm")
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        sheet.save(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.asarray(sheet)


def compare_videos(pipe, settings: Settings, loras: Sequence[LoraSpec], on_run: RunCallback | None = None,
                   on_step: StepCallback | None = None, progress: bool = True,
                   runs: Sequence[tuple[str, list[LoraSpec]]] | None = None) -> tuple[list[np.ndarray], list[str]]:
    """uint8 clips and labels of `runs` (default `comparison_runs(loras)`) from a pipeline that has `loras` loaded
    (unfused)."""
    if not loras:
        raise CogtuneError("--compare needs at least one --lora to compare with the base model")
    embeds = encode_prompt(pipe, settings)
    runs = comparison_runs(loras) if runs is None else runs
    videos, labels = [], []
    try:
        for i, (label, active) in enumerate(runs):
            if on_run is not None:
                on_run(i + 1, len(runs), label)
            activate_adapters(pipe, active)
            video = sample(pipe, settings, on_step, embeds=embeds, progress=progress)
            videos.append(to_uint8_frames(video, value_range=(0.0, 1.0)))
            labels.append(label)
    finally:
        activate_adapters(pipe, loras)  # leave the pipeline as it came: all adapters at their weights
    return videos, labels


def write_comparison(videos: Sequence[np.ndarray], labels: Sequence[str], out: str | Path,
                     fps: float) -> tuple[Path, Path]:
    out = Path(out)
    video = write_mp4(side_by_side(videos, labels), out, fps)
    sheet = out.with_suffix(".png")
    comparison_sheet(videos, labels, sheet)
    return video, sheet


def compare(model: str | Path, prompt: str, out: str | Path, loras: Sequence[str], image: str | Path | None = None,
            negative_prompt: str = "", frames: int | None = None, height: int | None = None, width: int | None = None,
            steps: int = 50, seed: int = 0, guidance_scale: float | None = None, fps: int | None = None,
            dtype: str | None = None, device: str | None = None, cpu_offload: bool = False, vae_tiling: bool = False,
            vae_slicing: bool = False, on_run: RunCallback | None = None, on_step: StepCallback | None = None,
            progress: bool = True) -> tuple[Path, Path]:
    """Write `out` (side-by-side mp4) and `out` with .png (contact sheet); returns both paths."""
    image = Path(image) if image else None
    specs = parse_loras(loras)
    settings = resolve_settings(model, Settings(prompt, negative_prompt, image, frames, height, width, fps, steps, seed,
                                                guidance_scale), specs)
    if not specs:
        raise CogtuneError("--compare needs at least one --lora to compare with the base model")
    out = check_video_out(out)
    pipe = build_pipeline(model, specs, dtype, device, cpu_offload, vae_tiling, vae_slicing)
    videos, labels = compare_videos(pipe, settings, specs, on_run, on_step, progress)
    return write_comparison(videos, labels, out, settings.fps)
