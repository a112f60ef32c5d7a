"""Video decode, frame sampling, resize/crop and H.264 writing (PyAV). Knows no model."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Union

import av
import numpy as np
import torch
import torch.nn.functional as F

from cogtune.errors import CogtuneError

PathLike = Union[str, os.PathLike]
FRAME_MODES = ("uniform", "head", "random")
CROP_MODES = ("center", "random", "stretch")


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    duration: float  # seconds
    width: int
    height: int
    pix_fmt: str
    codec: str


def _open(path: PathLike) -> av.container.InputContainer:
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise CogtuneError(f"cannot read video {path}: {e}; check the file exists and is a video") from e
    if not container.streams.video:
        container.close()
        raise CogtuneError(f"{path} has no video stream; list only video files in the dataset")
    return container


def probe(path: PathLike) -> VideoInfo:
    """Read a video's header. The frame count comes from the stream, or from counting packets if it is missing."""
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            frames = stream.frames
            if frames <= 0:  # e.g. webm/mkv store no count: demux (no decode) and count packets
                frames = sum(1 for p in container.demux(stream) if p.size > 0)
        except av.error.FFmpegError as e:
            raise CogtuneError(f"cannot read video {path}: {e}; the file may be truncated, re-encode it") from e
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = frames / fps if fps else 0.0
        ctx = stream.codec_context
        return VideoInfo(frames=int(frames), fps=fps, duration=duration, width=ctx.width, height=ctx.height,
                         pix_fmt=ctx.pix_fmt or "", codec=ctx.name)


def frame_indices(total: int, want: int, mode: str = "uniform", rng: np.random.Generator | None = None) -> list[int]:
    """Which frames of a `total`-frame clip to use.

    uniform: `want` frames spread evenly over the whole clip (first and last included).
    head:    the first `want` frames.
    random:  `want` consecutive frames starting at a random frame (uses `rng`).
    """
    if want < 1:
        raise CogtuneError(f"frames must be at least 1 (got {want}); set a positive frame count")
    if total < want:
        raise CogtuneError(f"clip has {total} frames but {want} are needed; use longer clips or fewer frames")
    if mode == "uniform":
        if want == 1:
            return [0]
        return [round(i * (total - 1) / (want - 1)) for i in range(want)]
    if mode == "head":
        return list(range(want))
    if mode == "random":
        start = int((rng or np.random.default_rng()).integers(0, total - want + 1))
        return list(range(start, start + want))
    raise CogtuneError(f"unknown frame sampling mode {mode!r}; use one of {', '.join(FRAME_MODES)}")


def read_frames(path: PathLike, indices: list[int]) -> np.ndarray:
    """Decode frames `indices` (any order, repeats allowed) as uint8 RGB [F, H, W, 3].

    Decodes sequentially from the start and stops after the last wanted frame.
    """
    wanted = set(indices)
    if any(i < 0 for i in wanted):
        raise ValueError(f"frame indices must be >= 0, got {sorted(wanted)[:3]}")
    got: dict[int, np.ndarray] = {}
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if not wanted:
            return np.zeros((0, stream.codec_context.height, stream.codec_context.width, 3), np.uint8)
        last, decoded = max(wanted), 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        except av.error.FFmpegError as e:
            raise CogtuneError(f"cannot decode video {path}: {e}; the file may be corrupt, re-encode it") from e
    if len(got) < len(wanted):
        raise CogtuneError(f"{path} decodes to {decoded} frames but frame {last} is needed; "
                           "the file may be truncated, re-encode it or use fewer frames")
    return np.stack([got[i] for i in indices])


def _resize_crop_tensor(x: torch.Tensor, height: int, width: int, crop: str,
                        rng: np.random.Generator | None) -> torch.Tensor:
    """x float [F, C, H, W] -> [F, C, height, width]."""
    h, w = x.shape[-2:]
    if crop == "stretch":
        size = (height, width)
    elif crop in ("center", "random"):
        scale = max(height / h, width / w)  # cover: both sides >= target, aspect kept
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
    else:
        raise CogtuneError(f"unknown crop mode {crop!r}; use one of {', '.join(CROP_MODES)}")
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    dh, dw = size[0] - height, size[1] - width
    if crop == "random":
        rng = rng or np.random.default_rng()
        top, left = int(rng.integers(0, dh + 1)), int(rng.integers(0, dw + 1))
    else:
        top, left = dh // 2, dw // 2
    return x[..., top:top + height, left:left + width]


def resize_crop(frames: np.ndarray, height: int, width: int, crop: str = "center",
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Scale uint8 [F, H, W, 3] to cover height x width keeping aspect, then crop (one window for the whole clip).

    crop: "center", "random" (window drawn from `rng`) or "stretch" (resize to exactly height x width, distorting).
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = _resize_crop_tensor(x, height, width, crop, rng)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def load_clip(path: PathLike, frames: int, height: int, width: int, mode: str = "uniform", crop: str = "center",
              seed: int | None = None) -> torch.Tensor:
    """Decode, sample, resize and crop one clip: float32 [F, 3, H, W] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    info = probe(path)
    try:
        idx = frame_indices(info.frames, frames, mode, rng)
    except CogtuneError as e:
        raise CogtuneError(f"{path}: {e}") from None
    x = torch.from_numpy(read_frames(path, idx)).permute(0, 3, 1, 2).float()
    x = _resize_crop_tensor(x, height, width, crop, rng)
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0).contiguous()


def to_uint8_frames(frames: np.ndarray | torch.Tensor, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Any clip to uint8 [F, H, W, 3].

    Accepts [F, H, W, 3] or [F, 3, H, W] (numpy or torch). uint8 is taken as is; floats are mapped from
    `value_range`, which by default is (-1, 1) if any value is negative, else (0, 1).
    """
    x = frames.detach().cpu() if isinstance(frames, torch.Tensor) else torch.from_numpy(np.asarray(frames))
    if x.ndim != 4:
        raise ValueError(f"expected a clip [F, H, W, 3] or [F, 3, H, W], got shape {tuple(x.shape)}")
    if x.shape[-1] != 3 and x.shape[1] == 3:
        x = x.permute(0, 2, 3, 1)
    if x.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = x.float()
        lo, hi = value_range or ((-1.0, 1.0) if x.numel() and x.min() < 0 else (0.0, 1.0))
        x = ((x - lo) * (255.0 / (hi - lo))).round_().clamp_(0, 255).to(torch.uint8)
    return np.ascontiguousarray(x.numpy())


def write_mp4(frames: np.ndarray | torch.Tensor, path: PathLike, fps: float, crf: int = 18,
              value_range: tuple[float, float] | None = None) -> Path:
    """Write an H.264 (libx264, yuv420p) mp4. Frames as in `to_uint8_frames`.

    Odd sizes are padded to even by repeating the last row/column (yuv420p needs even sizes). The file is written
    under a temporary name in the same folder and renamed, so the final name never holds a half-written file.
    """
    clip = to_uint8_frames(frames, value_range)
    if len(clip) == 0:
        raise ValueError("write_mp4 needs at least one frame")
    h, w = clip.shape[1:3]
    if h % 2 or w % 2:
        clip = np.pad(clip, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.mp4")
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = clip.shape[2], clip.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for img in clip:
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
