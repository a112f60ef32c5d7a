"""Still images as training samples: read, check, and resize/crop them exactly as video frames are. Knows no model.

An image listed where a video could be (any layout) is a one-frame clip. Its pixels go through the same geometry
(`video._geometry`: scale to cover the bucket, keep the aspect, crop) and the same resampler (swscale bilinear, one
frame at a time) as a decoded video frame, so an image and a video frame of the same pixels give the same tensor.
EXIF orientation is applied first, as viewers show the image.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from cogtune.data.sources import IMAGE_SUFFIXES, is_image  # noqa: F401 (re-exported: the image module's names)
from cogtune.errors import CogtuneError, bounded, display_path

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ImageInfo:
    width: int  # as displayed (EXIF orientation applied)
    height: int
    mode: str  # Pillow's pixel mode, e.g. "RGB", "RGBA", "L"
    format: str  # "PNG", "JPEG", "WEBP"


def _pil():
    from PIL import Image, ImageOps, UnidentifiedImageError

    return Image, ImageOps, UnidentifiedImageError


def _refusal(path: PathLike, e: BaseException) -> CogtuneError:
    Image, _, Unidentified = _pil()
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return CogtuneError(f"{display_path(path)}: too many pixels to decode safely; scale the image down")
    if os.path.isfile(path) and not os.path.getsize(path):
        return CogtuneError(f"{display_path(path)}: not a readable image (the file is empty, 0 bytes); re-copy it")
    why = "no image format cogtune reads (PNG, JPEG, WebP)" if isinstance(e, Unidentified) else bounded(str(e), 200)
    return CogtuneError(f"{display_path(path)}: not a readable image ({why}); re-save it as PNG or JPEG or remove it")


def probe_image(path: PathLike) -> ImageInfo:
    """The header of an image (no pixel decode): its displayed size, mode and format. CogtuneError if unreadable."""
    Image, _, _ = _pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if _orientation(img) in (5, 6, 7, 8):  # EXIF orientations that turn by 90 degrees
                    w, h = h, w
                return ImageInfo(w, h, img.mode, img.format or "")
    except Exception as e:  # Pillow's plugins raise many kinds (SyntaxError, struct.error...) for bad files
        raise _refusal(path, e) from None


def _orientation(img) -> int:
    """The EXIF orientation (1: upright); a file whose metadata does not read counts as upright here (decoding its
    pixels reports it)."""
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 (any failure to read metadata)
        return 1


def read_rgb(path: PathLike) -> np.ndarray:
    """The whole image decoded, upright, as uint8 RGB [H, W, 3] (the first frame of an animated file)."""
    Image, ImageOps, _ = _pil()
    try:
        with warnings.catch_warnings():  # Pillow only warns below twice its pixel limit; refuse there too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return np.ascontiguousarray(np.array(ImageOps.exif_transpose(img).convert("RGB")))
    except Exception as e:  # Pillow's plugins raise many kinds (SyntaxError, struct.error...) for bad files
        raise _refusal(path, e) from None


def image_as_frames(path: PathLike, height: int, width: int, crop: str = "center",
                    rng: np.random.Generator | None = None) -> torch.Tensor:
    """An image as a one-frame clip: float32 [1, 3, height, width] in [-1, 1], resized and cropped by the same
    geometry, resampler and arithmetic as `video.decode_plan` uses for a video frame."""
    import av
    from av.video.reformatter import VideoReformatter

    from cogtune.data.video import _geometry

    rgb = read_rgb(path)
    (sh, sw), top, left = _geometry(rgb.shape[0], rgb.shape[1], height, width, crop, rng)
    if (sh, sw) != rgb.shape[:2]:
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        rgb = VideoReformatter().reformat(frame, width=sw, height=sh, format="rgb24",
                                          interpolation="BILINEAR").to_ndarray()
    out = torch.empty((1, 3, height, width), dtype=torch.float32)
    out[0].copy_(torch.from_numpy(rgb).permute(2, 0, 1)[:, top:top + height, left:left + width])
    out.mul_(1 / 127.5).sub_(1.0)
    return out.clamp_(-1.0, 1.0)


def inspect_image(path: PathLike) -> tuple[dict[str, Any], list[str]]:
    """`data check` for an image sample -> (facts, problems); never raises for a bad file. The pixels are decoded
    whole, so a truncated or corrupt file is found here, not hours into training."""
    facts: dict[str, Any] = {}
    try:  # a header that does not open (no image, too many pixels) is unreadable; pixels that do not decode, corrupt
        info = probe_image(path)
    except CogtuneError as e:
        return facts, [f"unreadable: {str(e).split(': ', 1)[-1]}"]
    try:
        rgb = read_rgb(path)
    except CogtuneError as e:
        return facts, [f"corrupt: {str(e).split(': ', 1)[-1]}"]
    facts.update(width=rgb.shape[1], height=rgb.shape[0], pix_fmt=info.mode, frames=1)
    problems = []
    if info.mode not in ("RGB", "L", "P", "RGBA", "LA", "PA"):
        problems.append(f"pixel-format: {info.mode} is converted to 8-bit RGB on every load; re-save it as 8-bit RGB")
    if info.mode in ("RGBA", "LA", "PA"):
        problems.append(f"alpha: {info.mode} has transparency, which is dropped (transparent pixels keep their "
                        "hidden colour); flatten it onto a background if that matters")
    return facts, problems
