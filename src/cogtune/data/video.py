"""Video decode, frame sampling, resize/crop and H.264 writing (PyAV). Knows no model."""

from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter

from cogtune.data.frames import FramePlan, plan_frames
from cogtune.errors import CogtuneError, bounded, display_path

PathLike = Union[str, os.PathLike]
FRAME_MODES = ("uniform", "head", "random")  # what frame_indices takes; plan_frames also has "fps"
SEEK_MIN_FRAMES = 64  # decode from the start when the first needed frame is closer than this
CROP_MODES = ("center", "random", "stretch")


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    duration: float  # seconds
    width: int  # as displayed: stored width and height swapped for a clip rotated by 90 or 270 degrees
    height: int
    pix_fmt: str
    codec: str
    rotation: int = 0  # display rotation in degrees (counter-clockwise), a multiple of 90


def av_error_text(e: BaseException) -> str:
    """An FFmpeg or OS error as a short phrase ("Invalid data found when processing input"): no errno, no path."""
    return getattr(e, "strerror", None) or (str(e).splitlines() or [e.__class__.__name__])[0]


def _open(path: PathLike) -> av.container.InputContainer:
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        why = "the file is empty (0 bytes)" if os.path.isfile(path) and not os.path.getsize(path) else av_error_text(e)
        raise CogtuneError(f"cannot read video {path}: {why}; check the file exists and is a video") from e
    if not container.streams.video:
        container.close()
        raise CogtuneError(f"{path} has no video stream; list only video files in the dataset")
    return container


def probe(path: PathLike) -> VideoInfo:
    """Read a video's header. The frame count comes from the stream, or from counting packets if it is missing.
    A still image (`sources.is_image`) is a one-frame clip of its displayed size."""
    from cogtune.data.image import is_image, probe_image

    if is_image(path):
        img = probe_image(path)
        return VideoInfo(frames=1, fps=0.0, duration=0.0, width=img.width, height=img.height, pix_fmt=img.mode,
                         codec=img.format.lower())
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            frames = stream.frames
            if frames <= 0:  # e.g. webm/mkv store no count: demux (no decode) and count packets
                frames = sum(1 for p in container.demux(stream) if p.size > 0)
        except av.error.FFmpegError as e:
            raise CogtuneError(f"cannot read video {path}: {av_error_text(e)}; the file may be truncated, "
                              "re-encode it") from e
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = frames / fps if fps else 0.0
        ctx = stream.codec_context
        width, height, codec, pix_fmt = ctx.width, ctx.height, ctx.name, ctx.pix_fmt or ""
    rotation = display_rotation(path)
    if rotation % 180:
        width, height = height, width
    return VideoInfo(frames=int(frames), fps=fps, duration=duration, width=width, height=height,
                     pix_fmt=pix_fmt, codec=codec, rotation=rotation)


def display_rotation(path: PathLike) -> int:
    """The display rotation (degrees counter-clockwise, 0/90/180/270) of a clip, as players apply it.

    FFmpeg exposes the display matrix on decoded frames, so the first frame is decoded; an undecodable file counts
    as unrotated (decoding it fails later with its own message)."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                return (round((getattr(frame, "rotation", 0) or 0) / 90) % 4) * 90
    except (av.error.FFmpegError, OSError, IndexError):
        pass
    return 0


def frame_indices(total: int, want: int, mode: str = "uniform", rng: np.random.Generator | None = None) -> list[int]:
    """Which frames of a `total`-frame clip to use (uniform, head or random; see `cogtune.data.frames`).

    Kept for callers of the first release; `plan_frames` adds fps resampling, segments and short-clip policies.
    """
    if mode == "fps":
        raise CogtuneError("frame_indices has no target fps; use cogtune.data.frames.plan_frames for mode 'fps'")
    plan = plan_frames(total, 0.0, want, mode, rng=rng)
    if not plan.ok:
        raise CogtuneError(_reason_text(plan.reason or ""))
    return list(plan.indices)


def _reason_text(reason: str) -> str:
    """'too-short: clip has ...' -> 'clip has ...' (the keyword is for reports, the text for error lines)."""
    head, sep, rest = reason.partition(": ")
    return rest if sep and " " not in head else reason


def _rotate(img: np.ndarray, rotation: float) -> np.ndarray:
    # PyAV's frame.rotation is the display matrix angle, counter-clockwise; np.rot90 turns counter-clockwise too
    k = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


def _seek_start(container: av.container.InputContainer, stream: av.video.stream.VideoStream, first: int) -> int:
    """Seek to a keyframe at or before frame `first` of a long clip; return the frame index decoding resumes at.

    Indices come from timestamps (index = (pts - start) * fps), which equals the decode count for constant frame
    rate files. Returns 0 (no seek) for short offsets or when the rate or timestamps are unknown.
    """
    rate = stream.average_rate or stream.guessed_rate
    if first < SEEK_MIN_FRAMES or not rate or stream.time_base is None:
        return 0
    start = stream.start_time or 0
    target = start + int((first - 0.5) / float(rate) / float(stream.time_base))
    container.seek(max(start, target), stream=stream, backward=True, any_frame=False)
    return -1  # the index of the next frame is read from its timestamp


def _to_rgb(frame: av.VideoFrame, autorotate: bool, scale: Callable[[int, int], tuple[int, int]] | None,
            reformatter: VideoReformatter) -> np.ndarray:
    """uint8 [H, W, 3], upright if autorotate; `scale(h, w)` (of the upright frame) gives the size to resize to,
    done by swscale while converting (bilinear, several times faster than resizing float tensors). One reformatter
    per clip keeps swscale's context (its filters) from frame to frame."""
    k = round((getattr(frame, "rotation", 0) or 0) / 90) % 4 if autorotate else 0
    h, w = (frame.height, frame.width) if k % 2 == 0 else (frame.width, frame.height)
    th, tw = scale(h, w) if scale else (h, w)
    if (th, tw) == (h, w):
        img = frame.to_ndarray(format="rgb24")
    else:
        sh, sw = (th, tw) if k % 2 == 0 else (tw, th)  # the stored frame is resized before it is turned
        img = reformatter.reformat(frame, width=sw, height=sh, format="rgb24", interpolation="BILINEAR").to_ndarray()
    return _rotate(img, 90 * k)


def _decode(path: PathLike, wanted: set[int], autorotate: bool, seek: bool = True,
            scale: Callable[[int, int], tuple[int, int]] | None = None) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames `wanted` (RGB uint8); return them and how many frames were seen. Stops after the last one."""
    got: dict[int, np.ndarray] = {}
    reformatter = VideoReformatter()
    last, seen = max(wanted), 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        tb, t0 = float(stream.time_base or 0), stream.start_time or 0
        i = _seek_start(container, stream, min(wanted)) if seek else 0
        try:
            for frame in container.decode(stream):
                if i < 0:  # after a seek: place the first frame by its timestamp
                    if frame.pts is None or round((frame.pts - t0) * tb * rate) > min(wanted):
                        return _decode(path, wanted, autorotate, False, scale)  # seek overshot: the slow way
                    i = round((frame.pts - t0) * tb * rate)
                seen = i + 1
                if i in wanted:
                    got[i] = _to_rgb(frame, autorotate, scale, reformatter)
                if i >= last:
                    break
                i += 1
        except av.error.FFmpegError as e:
            raise CogtuneError(f"cannot decode video {path}: {av_error_text(e)}; the file may be corrupt, "
                              "re-encode it") from e
    return got, seen


def read_frames(path: PathLike, indices: Sequence[int], autorotate: bool = True) -> np.ndarray:
    """Decode frames `indices` (any order, repeats allowed) as uint8 RGB [F, H, W, 3].

    Decodes each needed frame once and stops after the last one; a long clip whose first needed frame is far in
    starts from the nearest keyframe before it. With autorotate, frames of a file with display-rotation
    metadata (phone videos) are turned upright, as players show them.
    """
    wanted = set(indices)
    if any(i < 0 for i in wanted):
        raise ValueError(f"frame indices must be >= 0, got {sorted(wanted)[:3]}")
    if not wanted:
        with _open(path) as container:
            ctx = container.streams.video[0].codec_context
            return np.zeros((0, ctx.height, ctx.width, 3), np.uint8)
    got = _decode_needed(path, wanted, autorotate)
    return np.stack([got[i] for i in indices])


def _decode_needed(path: PathLike, wanted: Iterable[int], autorotate: bool = True,
                   scale: Callable[[int, int], tuple[int, int]] | None = None) -> dict[int, np.ndarray]:
    wanted = set(wanted)
    got, seen = _decode(path, wanted, autorotate, scale=scale)
    if len(got) < len(wanted):
        raise CogtuneError(f"{path} decodes to {seen} frames but frame {max(wanted)} is needed; "
                           "the file may be truncated, re-encode it or use fewer frames")
    return got


def _geometry(h: int, w: int, height: int, width: int, crop: str,
              rng: np.random.Generator | None) -> tuple[tuple[int, int], int, int]:
    """-> (resized size, crop top, crop left) that turn an h x w frame into height x width."""
    if crop == "stretch":
        size = (height, width)
    elif crop in ("center", "random"):
        scale = max(height / h, width / w)  # cover: both sides >= target, aspect kept
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
    else:
        raise CogtuneError(f"unknown crop mode {crop!r}; use one of {', '.join(CROP_MODES)}")
    dh, dw = size[0] - height, size[1] - width
    if crop == "random":
        rng = rng or np.random.default_rng()
        return size, int(rng.integers(0, dh + 1)), int(rng.integers(0, dw + 1))
    return size, dh // 2, dw // 2


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float [F, C, H, W] -> [F, C, *size] (antialiased bilinear); unchanged if already that size."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _resize_crop_tensor(x: torch.Tensor, height: int, width: int, crop: str,
                        rng: np.random.Generator | None) -> torch.Tensor:
    """x float [F, C, H, W] -> [F, C, height, width]."""
    size, top, left = _geometry(x.shape[-2], x.shape[-1], height, width, crop, rng)
    return _resize(x, size)[..., top:top + height, left:left + width]


def resize_crop(frames: np.ndarray, height: int, width: int, crop: str = "center",
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Scale uint8 [F, H, W, 3] to cover height x width keeping aspect, then crop (one window for the whole clip).

    crop: "center", "random" (window drawn from `rng`) or "stretch" (resize to exactly height x width, distorting).
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = _resize_crop_tensor(x, height, width, crop, rng)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def decode_plan(path: PathLike, plan: FramePlan, height: int, width: int, crop: str = "center",
                rng: np.random.Generator | None = None) -> torch.Tensor:
    """Decode the frames of `plan` once, blend where it says so (in float), resize and crop: float32 [F, 3, H, W]
    in [-1, 1]. Frames are resized while they are converted to RGB and written one by one into the output, so a
    long high-resolution clip never sits in memory as floats at its source size. A still image is its one frame
    (`image.image_as_frames`, the same geometry and resampler)."""
    from cogtune.data.image import image_as_frames, is_image

    if not plan.ok:
        raise CogtuneError(f"{path}: {_reason_text(plan.reason or '')}")
    if is_image(path):
        if set(plan.indices) != {0} or plan.weights and any(plan.weights):
            raise CogtuneError(f"{path}: a still image has one frame, but the plan asks for frames {plan.needed}")
        frame = image_as_frames(path, height, width, crop, rng)
        return frame.expand(plan.frames, -1, -1, -1).contiguous() if plan.frames > 1 else frame
    geometry: list[tuple[tuple[int, int], int, int]] = []

    def scale(h: int, w: int) -> tuple[int, int]:
        if not geometry:  # one size and crop window for the whole clip, drawn once
            geometry.append(_geometry(h, w, height, width, crop, rng))
        return geometry[0][0]

    got = _decode_needed(path, plan.needed, scale=scale)
    _, top, left = geometry[0]
    out = torch.empty((plan.frames, 3, height, width), dtype=torch.float32)
    done: dict[int, int] = {}  # source frame -> output slot that already holds it (pad/loop/slow repeat frames)
    for k, i in enumerate(plan.indices):
        weight = plan.weights[k] if plan.weights else 0.0
        if not weight and i in done:
            out[k] = out[done[i]]
            continue
        x = torch.from_numpy(got[i]).permute(2, 0, 1)  # uint8 [3, h, w], a view
        if weight and plan.upper is not None:
            x = x.float() * (1 - weight) + torch.from_numpy(got[plan.upper[k]]).permute(2, 0, 1).float() * weight
        out[k].copy_(x[:, top:top + height, left:left + width])
        if not weight:
            done[i] = k
    out.mul_(1 / 127.5).sub_(1.0)
    return out.clamp_(-1.0, 1.0)


def load_image(path: PathLike, height: int, width: int, crop: str = "center",
               rng: np.random.Generator | None = None) -> torch.Tensor:
    """An image file, scaled to cover height x width and cropped like a clip's frames: float32 [3, H, W] in [-1, 1]."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow only warns below twice its pixel limit; refuse there too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                rgb = np.array(ImageOps.exif_transpose(img).convert("RGB"))  # a writable copy, as torch wants
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CogtuneError(f"{display_path(path)}: too many pixels to decode safely: scale the image down, "
                           f"e.g. to {width}x{height}") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise CogtuneError(f"{display_path(path)}: not a readable image ({bounded(str(e), 200)})") from None
    x = _resize_crop_tensor(torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), height, width, crop, rng)[0]
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0)


def load_clip(path: PathLike, frames: int, height: int, width: int, mode: str = "uniform", crop: str = "center",
              seed: int | None = None, *, start: float | None = None, end: float | None = None,
              target_fps: float | None = None, short: str = "skip", allowed: Sequence[int] | None = None,
              window: str = "center", rng: np.random.Generator | None = None) -> torch.Tensor:
    """Decode, sample, resize and crop one clip: float32 [F, 3, H, W] in [-1, 1] (F = frames, or fewer with the
    `smaller` policy). Sampling arguments as in `cogtune.data.frames.plan_frames`; `rng` (else one from `seed`)
    draws the random window and the random crop."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    info = probe(path)
    plan = plan_frames(info.frames, info.fps, frames, mode, start=start, end=end, target_fps=target_fps,
                       short=short, allowed=allowed, window=window, rng=rng)
    return decode_plan(path, plan, height, width, crop, rng)


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
