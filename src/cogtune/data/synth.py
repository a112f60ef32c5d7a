"""A tiny synthetic dataset: coloured shapes moving on a plain background, as real H.264 mp4 files.

Written in the official CogVideoX layout (prompts.txt, videos.txt, videos/*.mp4) so every loader and the whole
training path can be exercised without downloading anything.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

from cogtune.data.video import write_mp4
from cogtune.errors import CogtuneError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (240, 210, 30),
    "purple": (140, 50, 180), "pink": (240, 110, 180),  # consonant-initial, so "a <colour>" stays grammatical
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "diamond")
# direction -> unit motion (dy, dx) in image coordinates (y grows downwards)
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
CAPTION = "a {colour} {shape} moving {direction} on a {background} background"

SYNTH_WORDS: list[str] = sorted(
    set(CAPTION.format(colour="", shape="", direction="", background="").split())
    | set(COLOURS) | set(BACKGROUNDS) | set(SHAPES) | set(DIRECTIONS)
)

MIN_FRAMES, MAX_FRAMES = 24, 40
MIN_FPS, MAX_FPS = 8, 16


def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    if shape == "triangle":  # apex up, base at cy + r
        return (dy <= r) & (np.abs(dx) * 2 <= dy + r)
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(shape: str, colour: str, background: str, direction: str, frames: int, height: int, width: int,
                offset: float = 0.5) -> np.ndarray:
    """uint8 [frames, height, width, 3]: the shape crosses the frame in `direction`.

    `offset` in [0, 1] places the path across the other axis (0.5 = through the middle).
    """
    r = 0.18 * min(height, width)
    dy, dx = DIRECTIONS[direction]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    out[:] = BACKGROUNDS[background]
    for t in range(frames):
        s = t / max(frames - 1, 1)  # 0 -> 1 along the path, shape stays fully inside the frame
        along_y = r + (height - 1 - 2 * r) * (s if dy > 0 else 1 - s)
        along_x = r + (width - 1 - 2 * r) * (s if dx > 0 else 1 - s)
        cy = along_y if dy else r + (height - 1 - 2 * r) * offset
        cx = along_x if dx else r + (width - 1 - 2 * r) * offset
        out[t][_mask(shape, yy, xx, cy, cx, r)] = COLOURS[colour]
    return out


def _write_text(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_synth_dataset(root: str | os.PathLike, clips: int = 8, seed: int = 0, height: int = 64, width: int = 96,
                        overwrite: bool = False) -> list[tuple[str, str]]:
    """Write `clips` captioned clips under `root`; return [(video path relative to root, caption), ...].

    Deterministic for a seed. Clips have 24-40 frames at 8-16 fps. Each file is written under a temporary name and
    renamed; prompts.txt and videos.txt are written last, so an interrupted run leaves no complete-looking dataset.
    With overwrite=True the files this writes replace those of the same name; other files in `root` are left alone.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CogtuneError(f"synthetic dataset root {root} is a file; give a folder path")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise CogtuneError(f"synthetic dataset root {root} is not empty; give a new folder or pass --overwrite "
                           "(overwrite=True)")
    if clips < 1:
        raise CogtuneError(f"clips must be at least 1 (got {clips})")
    rng = np.random.default_rng(seed)
    try:
        (root / "videos").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CogtuneError(f"cannot create {root / 'videos'}: {e.strerror or e}; give a folder you can write to") from e
    written: list[tuple[str, str]] = []
    for i in range(clips):
        shape = SHAPES[rng.integers(len(SHAPES))]
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        frames = int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1))
        fps = int(rng.integers(MIN_FPS, MAX_FPS + 1))
        offset = float(rng.uniform(0.2, 0.8))
        rel = f"videos/clip_{i:03d}.mp4"
        write_mp4(render_clip(shape, colour, background, direction, frames, height, width, offset), root / rel, fps)
        written.append((rel, CAPTION.format(colour=colour, shape=shape, direction=direction, background=background)))
    _write_text(root / "prompts.txt", [caption for _, caption in written])
    _write_text(root / "videos.txt", [rel for rel, _ in written])
    return written
