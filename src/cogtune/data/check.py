"""`cogtune data check`: look at every clip of a dataset and report what would go wrong. Knows no model.

A still image listed as a sample is decoded whole (one whose header does not open, not an image or too many pixels,
is `unreadable`; one whose pixels do not decode, truncated or damaged, `corrupt`) and needs no frame count: it
trains as one frame.

Each problem is "keyword: message" with a stable keyword. Clips with an UNUSABLE keyword are skipped by training;
the others load but deserve a look (duplicates, variable frame rate, rotation, unusual pixel format, odd sizes,
upscaling). `span` is the share of the clip (or its start/end segment) the chosen frames cover: a caption that
describes the whole clip while span is 0.3 describes more than the model is shown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cogtune.data.frames import FramePlan, plan_bucketed, plan_frames, segment_frames
from cogtune.data.sources import Sample, read_dataset
from cogtune.errors import CogtuneError, display_path

UNUSABLE = {"missing", "missing-image", "bad-image", "no-caption", "empty-caption", "caption-encoding", "bad-time",
            "bad-row", "list-mismatch", "empty", "unreadable", "audio-only", "no-video", "zero-frames", "truncated",
            "corrupt", "too-short", "too-slow", "unknown-fps", "thumbnail", "no-stills"}
NORMAL_PIX_FMTS = ("yuv420p", "yuvj420p")
_VFR_TOLERANCE = 0.1  # packet spacing may vary this much (relative) before a stream counts as variable rate


@dataclass
class ClipReport:
    path: str  # as listed in the dataset (for dataset-level problems: the list or table file)
    ok: bool
    problems: list[str] = field(default_factory=list)
    span: float | None = None  # share of the clip's duration the chosen frames cover
    usable: bool = True  # False when training would skip it
    video: str = ""  # absolute path
    frames: int | None = None
    fps: float | None = None
    duration: float | None = None
    width: int | None = None
    height: int | None = None
    pix_fmt: str | None = None
    used_frames: int | None = None
    kind: str = "video"  # or "image": a still image listed as a sample (one frame)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def keyword(problem: str) -> str:
    return problem.split(":", 1)[0]


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [e.__class__.__name__])[0]


def _vfr(pts: list[int], time_base: float) -> str | None:
    """A variable-frame-rate problem when the spacing of presentation timestamps varies."""
    deltas = np.diff(np.unique(np.asarray(pts, dtype=np.int64)))
    if len(deltas) < 2:
        return None
    median = float(np.median(deltas))
    spread = float(deltas.max() - deltas.min())
    if spread <= max(1.0, _VFR_TOLERANCE * median):  # one tick of jitter is rounding, not a variable rate
        return None
    lo, hi = 1 / (deltas.max() * time_base), 1 / (deltas.min() * time_base)
    return (f"vfr: variable frame rate (frame spacing gives {lo:.3g}-{hi:.3g} fps); frames are taken by count, "
            "so motion speed varies: re-encode at a constant rate (ffmpeg -fps_mode cfr -r FPS)")


def inspect_video(path: Path, decode: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Probe (or with decode=True fully decode) one file -> (facts, problems). Never raises for a bad file."""
    import av  # imported here, not at the top: `data check --help` and refusals need no FFmpeg or torch

    from cogtune.data.video import av_error_text
    facts: dict[str, Any] = {}
    try:
        if path.stat().st_size == 0:
            return facts, ["unreadable: the file is empty (0 bytes); re-copy or remove it"]
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        return facts, [f"unreadable: not a video container cogtune can open ({av_error_text(e)}); "
                       "re-encode it (ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4) or remove it"]
    problems: list[str] = []
    with container:
        if not container.streams.video:
            if container.streams.audio:
                return facts, ["audio-only: the file has audio but no video stream; list only video files"]
            return facts, ["no-video: the file has no video stream; list only video files"]
        stream = container.streams.video[0]
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate
        facts.update(width=ctx.width, height=ctx.height, pix_fmt=ctx.pix_fmt or "", fps=float(rate) if rate else 0.0)
        pts: list[int] = []
        count = 0
        try:
            for packet in container.demux(stream):
                if packet.size:
                    count += 1
                    if packet.pts is not None:
                        pts.append(packet.pts)
        except av.error.FFmpegError as e:
            problems.append(f"corrupt: reading packets failed after {count} frames ({av_error_text(e)}); "
                            "re-encode it")
        header = stream.frames
        facts["frames"] = count
        tb = float(stream.time_base) if stream.time_base else 0.0
        if stream.duration is not None and tb:
            facts["duration"] = float(stream.duration * tb)
        elif facts["fps"]:
            facts["duration"] = count / facts["fps"]
        if count == 0:
            problems.append("zero-frames: the video stream holds no frames; re-encode or remove it")
        elif header and count < header:
            problems.append(f"truncated: the header says {header} frames but only {count} are in the file "
                            "(an interrupted copy or download?); re-copy or re-encode it")
        if tb and (vfr := _vfr(pts, tb)):
            problems.append(vfr)
        rotate = stream.metadata.get("rotate")
    decode_problems, rotation = _decode_problems(path, count, decode, rotate)
    problems += decode_problems
    if round(rotation / 90) % 2:  # report (and compare with the training size) the size players show
        facts["width"], facts["height"] = facts["height"], facts["width"]
    pix = facts["pix_fmt"] or "unknown"
    if pix not in NORMAL_PIX_FMTS:
        kind = "high bit depth" if any(b in pix for b in ("p10", "p12", "p16")) else \
            "4:4:4 chroma" if "444" in pix else "uncommon"
        problems.append(f"pixel-format: {pix} ({kind}) is converted to 8-bit RGB on every load and some tools "
                        "reject it; re-encode with -pix_fmt yuv420p")
    if facts["width"] % 2 or facts["height"] % 2:
        problems.append(f"odd-size: {facts['width']}x{facts['height']} has an odd side, which yuv420p and many tools "
                        "reject; re-encode with even sizes (-vf scale=trunc(iw/2)*2:trunc(ih/2)*2)")
    return facts, problems


def _decode_problems(path: Path, count: int, decode: bool, rotate: str | None) -> tuple[list[str], float]:
    """Rotation (from the first decoded frame's display matrix or a 'rotate' tag) and, with decode, a full decode
    -> (problems, display rotation in degrees)."""
    import av

    from cogtune.data.video import av_error_text
    problems: list[str] = []
    rotation, decoded = 0.0, 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if decoded == 0:
                    rotation = float(getattr(frame, "rotation", 0) or 0)
                decoded += 1
                if not decode:
                    break
    except av.error.FFmpegError as e:
        if decode or decoded == 0:
            problems.append(f"corrupt: decoding failed after {decoded} of {count} frames ({av_error_text(e)}); "
                            "re-encode it or remove it")
    else:
        if decode and 0 < count and decoded < count:
            problems.append(f"corrupt: only {decoded} of {count} frames decode; re-encode it or remove it")
    if not rotation and rotate:
        rotation = float(rotate) if rotate.lstrip("-").replace(".", "", 1).isdigit() else 0.0
    if rotation % 360:
        problems.append(f"rotated: display rotation {rotation:g} degrees; cogtune turns frames upright as players "
                        "do, but other tools may not: re-encode upright to be safe")
    return problems, rotation


def _file_hash(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_one(sample: Sample, settings: dict[str, Any], decode: bool, seed: int,
               stills_refused: str | None = None) -> ClipReport:
    report = ClipReport(sample.listed or sample.where or str(sample.video), ok=False, problems=list(sample.problems),
                        video=str(sample.video), kind="image" if sample.is_image else "video")
    if sample.is_image:  # one frame: no frame plan, no frame rule (training gives it a bucket of 1 frame)
        if sample.listed and sample.video.is_file():
            from cogtune.data.image import inspect_image

            facts, problems = inspect_image(sample.video)
            report.problems += problems + ([f"no-stills: {stills_refused}; train it on videos or remove the image"]
                                           if stills_refused else [])
            for key, value in facts.items():
                setattr(report, key, value)
            if facts:
                report.span, report.used_frames = 1.0, 1
        return report
    if sample.listed and sample.video.is_file():
        try:
            facts, problems = inspect_video(sample.video, decode)
        except Exception as e:  # one odd file must not end the scan of thousands
            facts, problems = {}, [f"unreadable: {e.__class__.__name__}: {_first_line(e)}; re-encode or remove it"]
        report.problems += problems + _image_problems(sample)
        for key, value in facts.items():
            setattr(report, key, value)
        if report.frames:
            plan = _plan(report.frames, report.fps or 0.0, sample, settings, np.random.default_rng(seed))
            if sample.start is not None or sample.end is not None:  # the segment's frames, not the file's
                report.frames = segment_frames(report.frames, report.fps or 0.0, sample.start, sample.end)
            if plan.ok:
                report.span, report.used_frames = plan.span, plan.frames
            else:
                report.problems.append(plan.reason or "")
    return report


def _image_problems(sample: Sample) -> list[str]:
    """An I2V conditioning image that is there but does not load (training would skip its clip)."""
    if sample.image is None or not sample.image.is_file():
        return []  # a missing image is already a sample problem
    from cogtune.data.video import load_image
    try:
        load_image(sample.image, 16, 16)
    except CogtuneError as e:
        return [f"bad-image: {e}; re-save it as PNG or JPEG"]
    return []


def _plan(total: int, fps: float, sample: Sample, settings: dict[str, Any], rng: np.random.Generator) -> FramePlan:
    """As training plans (`plan_bucketed`)."""
    kwargs = {k: v for k, v in settings.items() if k not in ("want", "buckets", "short", "allowed", "mode")}
    return plan_bucketed(total, fps, [*(settings["buckets"] or ()), settings["want"]], settings["mode"],
                         short=settings["short"], allowed=settings["allowed"], start=sample.start, end=sample.end,
                         rng=rng, **kwargs)


def check_dataset(root: str | os.PathLike, frames: int = 49, height: int = 480, width: int = 720,
                  mode: str = "uniform", target_fps: float | None = None, short_policy: str = "skip",
                  decode: bool = False, workers: int = 4, *, allowed: Sequence[int] | None = None,
                  window: str = "center", seed: int = 0,
                  frame_buckets: Sequence[int] | None = None, stills_refused: str | None = None) -> list[ClipReport]:
    """Check every clip of the dataset at `root` in parallel (threads); one report per listed clip, in order,
    plus one per dataset-level problem (path = the list or table file).

    Frames are planned as training plans them (`cogtune.data.frames.plan_bucketed`); with `frame_buckets` a clip
    takes the largest bucket count it fills, and only the smallest one falls back to `short_policy`.
    `stills_refused`: why the model takes no still images (each listed image then has a `no-stills` problem).
    """
    settings = dict(want=frames, mode=mode, target_fps=target_fps, short=short_policy, allowed=allowed,
                    window=window, buckets=list(frame_buckets or ()))
    plan_frames(frames, target_fps or 1.0, frames, mode, target_fps=target_fps, short=short_policy, allowed=allowed,
                window=window)  # bad settings fail before the scan
    listing = read_dataset(root)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reports = list(pool.map(lambda s: _check_one(s, settings, decode, seed, stills_refused), listing.samples))
        _mark_duplicates(listing.samples, reports, pool)
    for r in reports:
        if r.width and r.height and (r.width < width or r.height < height):
            r.problems.append(f"upscaled: {r.width}x{r.height} is smaller than the training size {width}x{height}, "
                              "so frames are enlarged (blurry); use larger clips or a smaller size")
    dataset_rows = [ClipReport(str(listing.source), ok=False, problems=[p]) for p in listing.problems]
    for r in reports + dataset_rows:
        # names that are not UTF-8 (str with surrogate escapes) as \xNN text: printable and valid JSON
        r.path, r.video = display_path(r.path), display_path(r.video) if r.video else ""
        r.problems = [p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for p in r.problems]
        r.ok = not r.problems
        r.usable = not any(keyword(p) in UNUSABLE for p in r.problems)
    return dataset_rows + reports


def _mark_duplicates(samples: list[Sample], reports: list[ClipReport], pool: ThreadPoolExecutor) -> None:
    """Later listings of the same file and segment, or of a file with identical bytes, get a duplicate problem
    (other time segments of one file are samples of their own)."""
    first_of: dict[tuple, int] = {}
    hashed: set[Path] = set()
    by_size: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        if not s.listed or not s.video.is_file():
            continue
        key = (s.video, s.start, s.end)
        if key in first_of:
            j = first_of[key]
            reports[i].problems.append(f"duplicate: the same file{' and segment' if s.start or s.end else ''} as "
                                       f"{samples[j].listed} ({samples[j].where}); remove one listing unless the "
                                       "repeat is on purpose")
            continue
        first_of[key] = i
        if s.video not in hashed:  # files are compared, not segments of one file
            hashed.add(s.video)
            by_size.setdefault(s.video.stat().st_size, []).append(i)
    candidates = [i for group in by_size.values() if len(group) > 1 for i in group]  # only same-size files hashed
    hashes = dict(zip(candidates, pool.map(lambda i: _file_hash(samples[i].video), candidates)))
    seen: dict[str, int] = {}
    for i in sorted(hashes):
        j = seen.setdefault(hashes[i], i)
        if j != i:
            reports[i].problems.append(f"duplicate: identical content to {samples[j].listed}; "
                                       "remove one copy unless the repeat is on purpose")


def format_table(reports: list[ClipReport]) -> str:
    """Plain aligned text: one row per clip, its problems indented under it, and the summary line."""
    head = ("status", "frames", "fps", "size", "span", "path")
    rows = [head]
    for r in reports:
        status = "ok" if r.ok else ("WARN" if r.usable else "BAD")
        size = f"{r.width}x{r.height}" if r.width else "-"
        rows.append((status, str(r.frames) if r.frames is not None else "-", f"{r.fps:.4g}" if r.fps else "-",
                     size, f"{r.span:.2f}" if r.span is not None else "-", r.path))
    widths = [max(len(row[c]) for row in rows) for c in range(len(head) - 1)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + row[-1])
        if n:
            lines += [f"    - {p}" for p in reports[n - 1].problems]
    return "\n".join(lines + [summary(reports)])


def summary(reports: list[ClipReport]) -> str:
    clips = [r for r in reports if r.video]
    bad = sum(not r.ok for r in clips)
    unusable = sum(not r.usable for r in clips)
    images = sum(r.kind == "image" for r in clips)
    line = (f"{len(clips)} clips{f' ({images} of them images)' if images else ''}: {len(clips) - bad} ok, {bad} "
            f"with problems ({unusable} unusable)")
    dataset = sum(not r.video for r in reports)
    return line + (f"; {dataset} dataset-level problems" if dataset else "")


def write_json(reports: list[ClipReport], path: str | os.PathLike) -> Path:
    """Write the reports as a JSON list, atomically (a temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps([r.to_dict() for r in reports], indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _settings_from_args(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Defaults < the config's data section (and what its model implies: `args.model_facts(cfg.model)` gives the
    model's (fps, allowed frame counts, native (frames, height, width), why it takes no still images or None) or
    None; data/ knows no model) < flags given on the command line."""
    s: dict[str, Any] = dict(frames=49, height=480, width=720, mode="uniform", target_fps=None,
                             short_policy="skip", window="center", allowed=None, frame_buckets=None,
                             stills_refused=None)
    root, variant = args.root, None
    if args.config:
        from cogtune.config import load_config

        cfg = load_config(args.config)
        model_facts = getattr(args, "model_facts", None)
        data = getattr(args, "dataset", None) or cfg.data  # one of data.datasets, when the command loops over them
        variant = model_facts(cfg.model) if model_facts else None
        root = root or data.root
        for key, names in (("frames", ("frames",)), ("height", ("height",)), ("width", ("width",)),
                           ("mode", ("sampling",)), ("target_fps", ("fps", "target_fps")),
                           ("short_policy", ("short_clips", "short", "short_policy")), ("window", ("window",))):
            value = next((getattr(data, n) for n in names if getattr(data, n, None) is not None), None)
            s[key] = s[key] if value is None else value
        if variant is not None:  # frames/height/width the config leaves unset: the model's native, as in training
            for key, native in zip(("frames", "height", "width"), variant[2]):
                s[key] = native if getattr(data, key) is None else s[key]
        bucket_frames = getattr(getattr(data, "buckets", None), "frames", None)
        if bucket_frames:
            s["frame_buckets"] = s["allowed"] = sorted(set(bucket_frames) | {s["frames"]}, reverse=True)
    for key, flag in (("frames", "frames"), ("height", "height"), ("width", "width"), ("mode", "sampling"),
                      ("target_fps", "fps"), ("short_policy", "short"), ("window", "window"), ("allowed", "allowed")):
        if getattr(args, flag) is not None:
            s[key] = getattr(args, flag)
    if variant is not None:  # as training does: the model's fps, and its frame counts for the smaller policy
        fps, allowed = variant[:2]
        s["stills_refused"] = variant[3] if len(variant) > 3 else None
        s["target_fps"] = s["target_fps"] or fps
        s["allowed"] = s["allowed"] or [f for f in allowed if f <= s["frames"]]
    if root is None:
        raise CogtuneError("data check needs a dataset: give ROOT or --config with data.root")
    if s["height"] < 1 or s["width"] < 1:
        raise CogtuneError(f"--height and --width must be positive (got {s['height']}x{s['width']})")
    if s["mode"] == "fps" and not s["target_fps"]:
        raise CogtuneError("--sampling fps needs --fps (the model's native fps, e.g. 8 or 16)")
    if s["short_policy"] == "smaller" and not s["allowed"]:
        raise CogtuneError("--short smaller needs --allowed (the frame counts to fall back to, e.g. 49,33,17)")
    return Path(root), s


def run_check(args: argparse.Namespace) -> int:
    """The `data check` command; returns the exit code (1 only with --strict and problems)."""
    root, s = _settings_from_args(args)
    json_path = Path(args.json) if args.json else None
    if json_path and json_path.is_dir():  # found before the scan, not after it
        raise CogtuneError(f"--json {json_path} is a folder; give a file name such as {json_path / 'report.json'}")
    reports = check_dataset(root, decode=args.decode, workers=args.workers, seed=args.seed, **s)
    print(format_table(reports))
    if json_path:
        try:
            print(f"wrote {write_json(reports, json_path)}")
        except OSError as e:
            raise CogtuneError(f"cannot write --json {json_path}: {e.strerror or e}; give another path") from e
    return 1 if args.strict and any(not r.ok for r in reports) else 0


