"""Dataset formats on disk -> a list of `Sample`s. Knows no model.

Official CogVideoX layout (the one the upstream finetune scripts read):
    root/prompts.txt   one caption per line
    root/videos.txt    one video path per line, relative to root (absolute paths are kept)
    root/images.txt    optional, one image per line (I2V first frames), relative to root
Line i of each file belongs to the same sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cogtune.errors import CogtuneError


@dataclass(frozen=True)
class Sample:
    video: Path  # absolute
    caption: str
    listed: str = ""  # the video path as written in the dataset, for messages and reports
    image: Path | None = None


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, stripped; trailing blank lines dropped, a blank line in between is an error."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CogtuneError(f"cannot read {path}: {e.strerror}; check the path and permissions") from e
    if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM, as some editors write
        raw = raw[3:]
    lines: list[str] = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(line.decode("utf-8").strip())
        except UnicodeDecodeError as e:
            raise CogtuneError(f"{path} line {n} is not valid UTF-8 (byte {e.start + 1}); "
                               "save the file as UTF-8") from None
    while lines and not lines[-1]:
        lines.pop()
    for n, line in enumerate(lines, start=1):
        if not line:
            raise CogtuneError(f"{path} line {n} is blank; line i of each list belongs to the same sample, "
                               "so fill it in or remove that line from every list")
    return lines


def load_official(root: str | os.PathLike, prompts: str = "prompts.txt", videos: str = "videos.txt",
                  images: str = "images.txt", check_exists: bool = True) -> list[Sample]:
    """Read the official layout. `images` is used only if that file exists."""
    root = Path(root).resolve()
    prompt_file, video_file, image_file = root / prompts, root / videos, root / images
    for f in (prompt_file, video_file):
        if not f.is_file():
            raise CogtuneError(f"{f} not found; the official layout needs {prompts} and {videos} in {root}")
    captions, paths = read_lines(prompt_file), read_lines(video_file)
    if len(captions) != len(paths):
        raise CogtuneError(f"{prompt_file} has {len(captions)} lines but {video_file} has {len(paths)}; "
                           "each video needs exactly one caption on the same line")
    image_paths: list[str | None] = [None] * len(paths)
    if image_file.is_file():
        image_paths = list(read_lines(image_file))
        if len(image_paths) != len(paths):
            raise CogtuneError(f"{image_file} has {len(image_paths)} lines but {video_file} has {len(paths)}; "
                               "each video needs exactly one image on the same line")
    samples = [Sample(video=(video_file.parent / p).resolve(), caption=c, listed=p,
                      image=(image_file.parent / i).resolve() if i else None)
               for c, p, i in zip(captions, paths, image_paths)]
    if not samples:
        raise CogtuneError(f"{video_file} lists no videos; add one video path per line")
    if check_exists:
        _check_exists(samples, video_file, image_file)
    return samples


def _check_exists(samples: list[Sample], video_file: Path, image_file: Path) -> None:
    for kind, listing, files in (("video", video_file, [s.video for s in samples]),
                                 ("image", image_file, [s.image for s in samples if s.image is not None])):
        missing = [(n, f) for n, f in enumerate(files, start=1) if not f.is_file()]
        if missing:
            n, f = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CogtuneError(f"{kind} {f} listed on line {n} of {listing} does not exist{more}; "
                               "fix the path (relative to the list's folder) or remove the line")


# Layouts load_dataset knows: (name, files that identify it, loader). New formats add a row.
LAYOUTS: list[tuple[str, tuple[str, ...], Callable[[Path], list[Sample]]]] = [
    ("official CogVideoX (prompts.txt + videos.txt)", ("prompts.txt", "videos.txt"), load_official),
]


def load_dataset(root: str | os.PathLike) -> list[Sample]:
    """Recognise the layout of the dataset folder `root` and load it."""
    root = Path(root)
    if not root.is_dir():
        raise CogtuneError(f"dataset folder {root} does not exist; give the folder that holds the dataset")
    for _name, marks, loader in LAYOUTS:
        if all((root / m).is_file() for m in marks):
            return loader(root)
    expected = "; or ".join(name for name, _, _ in LAYOUTS)
    raise CogtuneError(f"{root} is not a dataset folder cogtune recognises; expected {expected}")
