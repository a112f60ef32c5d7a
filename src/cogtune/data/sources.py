"""Dataset formats on disk -> a list of `Sample`s. Knows no model.

Three layouts; `load_dataset(path)` recognises them:

1. Official CogVideoX layout (what the upstream finetune scripts read), a folder with
       prompts.txt   one caption per line
       videos.txt    one video path per line, relative to the folder (absolute paths are kept)
       images.txt    optional, one image per line (I2V first frames)
   Line i of each file belongs to the same sample. `path` may also be the videos.txt file itself.
2. A table: a .csv (header row) or .jsonl (one object per line) with columns
       video (or file_name)   path relative to the table's folder
       caption (or text, prompt)
       image                  optional, I2V first frame
       start, end             optional, seconds: only the frames with start <= t < end are used
   `path` is the table file, or a folder holding `metadata.csv` or `metadata.jsonl` (exactly one of them).
3. A folder of videos (searched recursively; .mp4 .mov .mkv .webm .avi .m4v) with a caption beside each:
   clip.mp4 + clip.txt (UTF-8, whole file = caption, lines joined with spaces).

In every layout an entry may be a still image (.jpg .jpeg .png .webp) instead of a video: a one-frame sample
(`Sample.is_image`). A folder of captioned images is a dataset of the third layout. An image takes no start/end.

Loading never stops at a problem with one clip: each `Sample` carries its `problems` ("keyword: what, where, fix").
`load_dataset(path, strict=True)` raises the first one as a CogtuneError; `strict=False` returns every sample
(callers skip those with problems) and logs dataset-level problems (lists of different length).
`read_dataset(path)` gives samples and dataset-level problems for reports (`cogtune data check`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from cogtune.errors import CogtuneError

log = logging.getLogger("cogtune")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # still images, trained as one-frame samples
TABLE_NAMES = ("metadata.csv", "metadata.jsonl")
VIDEO_COLUMNS, CAPTION_COLUMNS = ("video", "file_name"), ("caption", "text", "prompt")


@dataclass(frozen=True)
class Sample:
    video: Path  # absolute
    caption: str
    listed: str = ""  # the video path as written in the dataset, for messages and reports
    image: Path | None = None
    start: float | None = None  # seconds; only frames with start <= t < end are used
    end: float | None = None
    problems: tuple[str, ...] = ()  # "keyword: message"; a sample with problems is not trained on
    where: str = ""  # where it is listed, e.g. "videos.txt line 3", for messages

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def is_image(self) -> bool:
        """A still image listed as a sample (not an I2V conditioning image): one frame."""
        return is_image(self.video)


def is_image(path: str | os.PathLike) -> bool:
    """Whether a sample file is a still image (by its extension, as the folder layout finds samples)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _still_problems(sample: Sample) -> Sample:
    """A still image has no time: start/end on one is a problem of its row."""
    if not sample.is_image or (sample.start is None and sample.end is None):
        return sample
    bad = (f"bad-time: {sample.where or sample.video}: {sample.listed or sample.video} is a still image, which "
           "has no start/end; clear them or list a video")
    return replace(sample, problems=sample.problems + (bad,))


@dataclass
class DatasetListing:
    samples: list[Sample]
    problems: list[str] = field(default_factory=list)  # about the dataset as a whole, "keyword: message"
    layout: str = ""
    source: Path = Path()  # the list, table or folder that was read


def problem_text(problem: str) -> str:
    """'missing: video x ...' -> 'video x ...' (the keyword is for reports, the text for error lines)."""
    head, sep, rest = problem.partition(": ")
    return rest if sep and " " not in head else problem


def _decode(raw: bytes, what: str) -> tuple[str, str | None]:
    """UTF-8 text (BOM dropped) and None, or "" and a caption-encoding problem."""
    if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM, as some editors write
        raw = raw[3:]
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return "", f"caption-encoding: {what} is not valid UTF-8 (byte {e.start + 1}); save the file as UTF-8"


def _read_list(path: Path) -> list[tuple[str, str | None]]:
    """Lines of a list file as (stripped text, encoding problem or None); trailing blank lines dropped."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CogtuneError(f"cannot read {path}: {e.strerror}; check the path and permissions") from e
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")  # Windows and old-Mac line ends too
    lines = [_decode(line, f"{path} line {n}") for n, line in enumerate(raw.split(b"\n"), start=1)]
    lines = [(text.strip(), bad) for text, bad in lines]
    while lines and not lines[-1][0] and not lines[-1][1]:
        lines.pop()
    return lines


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, stripped; trailing blank lines dropped, a blank line in between is an error."""
    lines = []
    for n, (text, bad) in enumerate(_read_list(path), start=1):
        if bad:
            raise CogtuneError(problem_text(bad))
        if not text:
            raise CogtuneError(f"{path} line {n} is blank; line i of each list belongs to the same sample, "
                               "so fill it in or remove that line from every list")
        lines.append(text)
    return lines


def _missing(kind: str, file: Path, where: str, relative_to: Path) -> str:
    fix = f"fix the path (relative to {relative_to}) or remove the line"
    if file.is_dir():
        return f"missing: {kind} {file} listed on {where} is a folder, not a file; {fix}"
    if "\\" in str(file) and Path(str(file).replace("\\", "/")).is_file():
        fix = "write / instead of \\ between folders (here \\ is part of the file name)"
    return f"missing: {kind} {file} listed on {where} does not exist; {fix}"


def read_official(root: str | os.PathLike, prompts: str = "prompts.txt", videos: str = "videos.txt",
                  images: str = "images.txt", check_exists: bool = True) -> DatasetListing:
    """Read the official layout without stopping at problems. `images` is used only if that file exists."""
    root = Path(root).resolve()
    prompt_file, video_file, image_file = root / prompts, root / videos, root / images
    for f in (prompt_file, video_file):
        if not f.is_file():
            raise CogtuneError(f"{f} not found; the official layout needs {prompts} and {videos} in {root}")
    captions, paths = _read_list(prompt_file), _read_list(video_file)
    image_lines = _read_list(image_file) if image_file.is_file() else None
    listing = DatasetListing([], layout="official", source=video_file)
    if len(captions) != len(paths):
        listing.problems.append(f"list-mismatch: {prompt_file} has {len(captions)} lines but {video_file} has "
                                f"{len(paths)}; each video needs exactly one caption on the same line")
    if image_lines is not None and len(image_lines) != len(paths):
        listing.problems.append(f"list-mismatch: {image_file} has {len(image_lines)} lines but {video_file} has "
                                f"{len(paths)}; each video needs exactly one image on the same line")
    if not paths:
        listing.problems.append(f"empty: {video_file} lists no videos; add one video path per line")
    for n, (rel, bad_path) in enumerate(paths, start=1):
        problems: list[str] = []
        where = f"line {n} of {video_file}"
        if bad_path:
            problems.append(bad_path.replace("caption-encoding", "missing", 1))
        elif not rel:
            problems.append(f"missing: {video_file} line {n} is blank; fill it in or remove that line from "
                            "every list")
        caption = ""
        if n > len(captions):
            problems.append(f"no-caption: {where} has no caption ({prompt_file} has only {len(captions)} lines); "
                            "add its caption on the same line")
        else:
            caption, bad = captions[n - 1]
            if bad:
                problems.append(bad)
            elif not caption:
                problems.append(f"empty-caption: {prompt_file} line {n} is blank; line i of each list belongs to "
                                "the same sample, so fill it in or remove that line from every list")
        video = _resolve(video_file.parent, rel)
        if rel and not bad_path and check_exists and not video.is_file():
            problems.append(_missing("video", video, where, video_file.parent))
        image = None
        if image_lines is not None and n <= len(image_lines):
            img, bad_img = image_lines[n - 1]
            image = _resolve(image_file.parent, img) if img and not bad_img else None
            if bad_img or not img:
                problems.append(f"missing-image: {image_file} line {n} is blank or not UTF-8; fix that line")
            elif check_exists and not image.is_file():
                problems.append(_missing("image", image, f"line {n} of {image_file}", image_file.parent)
                                .replace("missing:", "missing-image:", 1))
        listing.samples.append(Sample(video, caption, rel, image, problems=tuple(problems), where=where))
    return listing


def _number(value: Any, name: str, where: str) -> tuple[float | None, str | None]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None, f"bad-time: {where}: {name} {value!r} is not a number of seconds; write e.g. 2.5"
    if not x >= 0 or x == float("inf"):
        return None, f"bad-time: {where}: {name} {value!r} must be a finite number of seconds >= 0"
    return x, None


def _pick(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((row[n] for n in names if n in row), None)


def _resolve(folder: Path, rel: str) -> Path:
    """`folder / rel` made absolute; a path that cannot be resolved (a symlink loop, a NUL byte) stays as written,
    and the is_file() check that follows reports it as missing instead of raising."""
    try:
        return (folder / rel).resolve()
    except (RuntimeError, OSError, ValueError):
        return Path(os.path.abspath(folder / rel))


def _table_sample(row: dict[Any, Any], where: str, folder: Path, check_exists: bool) -> Sample:
    problems: list[str] = []
    rel = _pick(row, VIDEO_COLUMNS)
    rel = "" if rel is None else str(rel).strip()
    caption = _pick(row, CAPTION_COLUMNS)
    if not rel:
        problems.append(f"missing: {where} has no video path; fill in its 'video' column or remove the row")
    video = _resolve(folder, rel)
    if rel and check_exists and not video.is_file():
        problems.append(_missing("video", video, where, folder))
    if caption is None:
        problems.append(f"no-caption: {where} has no caption; fill in its 'caption' column")
        caption = ""
    if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        caption = ", ".join(c.strip() for c in caption if c.strip())  # a list of tags or phrases: joined
    elif isinstance(caption, (list, dict)):
        problems.append(f"bad-row: {where} has a caption that is a {type(caption).__name__} of "
                        f"{'non-text values' if isinstance(caption, list) else 'fields'}; give a text or a list of "
                        "texts (joined with ', ')")
        caption = ""
    caption = str(caption).strip()
    if any("\udc80" <= ch <= "\udcff" for ch in caption):  # bytes that were not UTF-8 (surrogateescape)
        problems.append(f"caption-encoding: {where}: the caption is not valid UTF-8; save the table as UTF-8")
        caption = caption.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    elif not caption and not any(p.startswith(("no-caption", "bad-row")) for p in problems):
        problems.append(f"empty-caption: {where} has an empty caption; write one or remove the row")
    image_rel = str(row.get("image") or "").strip()
    image = _resolve(folder, image_rel) if image_rel else None
    if image is not None and check_exists and not image.is_file():
        problems.append(_missing("image", image, where, folder).replace("missing:", "missing-image:", 1))
    if row.get(None):
        problems.append(f"bad-row: {where} has more values than the header has columns (left over: "
                        f"{','.join(row[None])!r}); an unquoted comma? put the caption in double quotes")
    start, bad_start = _number(row.get("start"), "start", where)
    end, bad_end = _number(row.get("end"), "end", where)
    problems += [p for p in (bad_start, bad_end) if p]
    if start is not None and end is not None and end <= start:
        problems.append(f"bad-time: {where}: end {end:g}s is not after start {start:g}s; fix start/end")
    return _still_problems(Sample(video, caption, rel, image, start, end, tuple(problems), where))


def read_table(path: str | os.PathLike, check_exists: bool = True) -> DatasetListing:
    """Read a .csv or .jsonl table (columns in the module doc) without stopping at per-row problems."""
    path = Path(path).resolve()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CogtuneError(f"cannot read {path}: {e.strerror}; check the path and permissions") from e
    # surrogateescape keeps undecodable bytes, so one bad caption marks one row instead of the whole table
    text = raw.decode("utf-8-sig", "surrogateescape")
    listing = DatasetListing([], layout="table", source=path)
    rows: list[tuple[str, dict[Any, Any]]] = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                listing.problems.append(f"bad-row: {path} line {n} is not valid JSON ({e.msg}); fix or remove it")
                continue
            if not isinstance(obj, dict):
                listing.problems.append(f"bad-row: {path} line {n} is not a JSON object; write {{\"video\": ...}}")
                continue
            rows.append((f"line {n} of {path}", obj))
    else:
        first = text.split("\n", 1)[0]  # Excel writes ';' where ',' is the decimal mark; some tools write tabs
        delimiter = next((d for d in (",", ";", "\t") if d in first), ",")
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        if not any(c in header for c in VIDEO_COLUMNS) or not any(c in header for c in CAPTION_COLUMNS):
            raise CogtuneError(f"{path} needs a header row with columns 'video' and 'caption' (got "
                               f"{', '.join(header) or 'none'}); add it as the first line")
        first_line = reader.line_num + 1
        for row in reader:  # a quoted caption may span lines: name the row by its first line
            rows.append((f"line {first_line} of {path}", row))  # values past the header sit under None
            first_line = reader.line_num + 1
    for where, row in rows:
        listing.samples.append(_table_sample(row, where, path.parent, check_exists))
    if not rows:
        listing.problems.append(f"empty: {path} has no rows; add one row per clip")
    return listing


def read_captioned_folder(root: str | os.PathLike) -> DatasetListing:
    """Read a folder of videos and/or images, each with a same-named .txt caption beside it (searched
    recursively)."""
    root = Path(root).resolve()
    listing = DatasetListing([], layout="folder", source=root)
    found = _videos_under(root)
    video_stems = {f.with_suffix("") for f in found if not is_image(f)}
    for video in found:
        rel = video.relative_to(root).as_posix()
        txt = video.with_suffix(".txt")
        problems: list[str] = []
        caption = ""
        if is_image(video) and video.with_suffix("") in video_stems:  # clip.mp4 + clip.jpg share clip.txt
            problems.append(f"thumbnail: {video} shares its caption file {txt.name} with a video of the same name, "
                            "so it is taken for that video's thumbnail and not trained on; rename it and give it "
                            "its own caption to train on it")
        if not video.is_file():
            problems.append(f"missing: {video} is a broken link or not a file; fix the link or remove it")
        if not txt.is_file():
            problems.append(f"no-caption: {video} has no caption file {txt.name} beside it; write one (UTF-8)")
        else:
            caption, bad = _decode(txt.read_bytes(), str(txt))
            caption = " ".join(line.strip() for line in caption.splitlines() if line.strip())
            if bad:
                problems.append(bad)
            elif not caption:
                problems.append(f"empty-caption: {txt} is empty; write the caption into it")
        listing.samples.append(Sample(video, caption, rel, problems=tuple(problems), where=str(video)))
    if not listing.samples:
        listing.problems.append(f"empty: {root} holds no videos or images "
                                f"({', '.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)})")
    return listing


def _videos_under(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and Path(f).suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _layouts_in(root: Path) -> list[tuple[str, Callable[[], DatasetListing]]]:
    found: list[tuple[str, Callable[[], DatasetListing]]] = []
    if (root / "prompts.txt").is_file() and (root / "videos.txt").is_file():
        found.append(("prompts.txt + videos.txt", lambda: read_official(root)))
    for name in TABLE_NAMES:
        if (root / name).is_file():
            found.append((name, lambda name=name: read_table(root / name)))
    return found


def read_dataset(path: str | os.PathLike) -> DatasetListing:
    """Recognise the layout at `path` (see the module doc) and read it, keeping every problem in the listing.

    Raises CogtuneError only when `path` is not a dataset at all, or names two layouts at once.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in (".csv", ".jsonl"):
            return read_table(path)
        if path.name in ("videos.txt", "prompts.txt"):
            return read_official(path.parent)
        raise CogtuneError(f"{path} is not a dataset file cogtune reads; give a .csv or .jsonl table, "
                           "videos.txt, or the dataset folder")
    if not path.is_dir():
        raise CogtuneError(f"dataset folder {path} does not exist; give the folder that holds the dataset")
    found = _layouts_in(path)
    if len(found) > 1:
        raise CogtuneError(f"{path} holds {' and '.join(n for n, _ in found)}; pass the one you mean "
                           f"(e.g. {path / found[-1][0].split(' ')[0]}) or remove the other")
    if found:
        return found[0][1]()
    if _videos_under(path):
        return read_captioned_folder(path)
    raise CogtuneError(f"{path} is not a dataset folder cogtune recognises; expected official CogVideoX "
                       f"(prompts.txt + videos.txt); or a table ({' or '.join(TABLE_NAMES)}); "
                       "or videos or images with a same-named .txt caption beside each")


IMAGE_PROBLEMS = ("missing-image", "bad-image")  # about a sample's conditioning image only


def without_images(sample: Sample) -> Sample:
    """The sample as a model without image conditioning sees it: no image, and no problem with one."""
    kept = tuple(p for p in sample.problems if not p.startswith(IMAGE_PROBLEMS))
    return replace(sample, image=None, problems=kept)


def load_dataset(path: str | os.PathLike, strict: bool = True) -> list[Sample]:
    """Load the dataset at `path` (a folder or a table file; see the module doc).

    strict=True: the first problem (dataset-level first) is raised as a one-line CogtuneError.
    strict=False: every sample is returned, those with problems too (skip them); dataset-level problems are logged.
    """
    listing = read_dataset(path)
    if strict:
        if listing.problems:
            raise CogtuneError(problem_text(listing.problems[0]))
        bad = [s for s in listing.samples if s.problems]
        if bad:
            more = sum(len(s.problems) for s in bad) - 1
            raise CogtuneError(problem_text(bad[0].problems[0]) + (f" (and {more} more problems)" if more else ""))
    else:
        for p in listing.problems:
            log.warning("dataset %s: %s", listing.source, p)
    return listing.samples


def load_official(root: str | os.PathLike, prompts: str = "prompts.txt", videos: str = "videos.txt",
                  images: str = "images.txt", check_exists: bool = True) -> list[Sample]:
    """Read the official layout; the first problem is raised as a CogtuneError."""
    listing = read_official(root, prompts, videos, images, check_exists)
    for p in listing.problems + [p for s in listing.samples for p in s.problems]:
        raise CogtuneError(problem_text(p))
    return listing.samples
