"""On-disk cache of encoded clips and prompt embeddings, as safetensors files. Knows no model: encoders are callables.

Layout under `root`:
    videos/<k[:2]>/<k>.safetensors      one clip: the tensors encode_video returned, batch dim dropped
    prompts/<k[:2]>/<k>.safetensors     one caption: its text encodings, e.g. {"prompt_embeds": [L, D]}
    failed/<k>.json                     a clip its loader could not read: {"source", "reason"}
Every entry's safetensors metadata holds the cache format, its key, kind, source and the fingerprint JSON it was
made from.

A video key hashes (video_fingerprint, item settings, source path/size/mtime_ns/start/end, image file); a prompt key
hashes (text_fingerprint, caption). A changed input gives new keys to exactly the entries it affects; old entries
stay on disk, unused. Files are written under a temporary name and renamed, so an entry exists whole or not at all
and an interrupted build resumes where it stopped. Ranks split the work by key and never write the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from cogtune.errors import CogtuneError, display_path

log = logging.getLogger("cogtune")
FORMAT = 1
PROMPT_TENSOR = "prompt_embeds"
_SAMPLES, _CHUNK = 16, 64 * 1024  # fingerprint_files reads at most 16 x 64 KiB of each file's data


class CacheError(CogtuneError):
    """A cache entry is missing, failed or corrupt at load time."""


@dataclass(frozen=True)
class CacheItem:
    """One clip to cache. `settings`: per-item values that change its latents beyond the build-wide fingerprint
    (e.g. its bucket {"frames": 49, "height": 480, "width": 720}); JSON-serialisable. Not hashable (dict field)."""

    video: str | os.PathLike
    caption: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    start: float | None = None  # seconds, for a clip cut from a longer file
    end: float | None = None
    image: str | os.PathLike | None = None  # I2V conditioning image file, when separate from the video

    def describe(self) -> str:
        return f"{self.video}" + (f" [{self.start}-{self.end}s]" if (self.start, self.end) != (None, None) else "")


@dataclass
class CacheReport:
    """What one rank's build did. Counts cover this rank's share of unique entries only."""

    rank: int = 0
    world_size: int = 1
    videos_total: int = 0
    videos_encoded: int = 0
    videos_cached: int = 0
    prompts_total: int = 0
    prompts_encoded: int = 0
    prompts_cached: int = 0
    repaired: list[str] = field(default_factory=list)  # corrupt entry files found and re-encoded
    failed: list[tuple[str, str]] = field(default_factory=list)  # (item or caption, reason), skipped
    seconds: float = 0.0

    def merge(self, other: CacheReport) -> CacheReport:
        """The sum of two reports of the same rank (e.g. build_prompts + build_videos)."""
        merged = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)
                  if f.name not in ("rank", "world_size")}
        return CacheReport(self.rank, self.world_size, **merged)

    def summary(self) -> str:
        return (f"videos {self.videos_encoded} encoded, {self.videos_cached} cached; prompts {self.prompts_encoded} "
                f"encoded, {self.prompts_cached} cached; {len(self.repaired)} repaired, {len(self.failed)} failed")


@dataclass
class CacheCheck:
    ready: list[int]  # indices of items whose video and prompt entries are both valid
    problems: dict[int, str]  # index -> why it is not ready (failed clip, missing or corrupt entry)


def _canonical(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    # file names that are not UTF-8 (surrogate escapes) as \xNN: hashable and storable; UTF-8 text is unchanged
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _hash(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj).encode("utf-8")).hexdigest()[:32]


def _file_identity(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path).resolve()
    st = p.stat()  # FileNotFoundError for a missing source: the caller reports it
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint_files(paths: Iterable[str | os.PathLike]) -> str:
    """A content fingerprint of model files (files or folders, hidden files skipped), reading <= ~1 MiB per file:
    relative path, size, the .safetensors header, and 16 evenly spaced 64 KiB samples (small files: all bytes).
    Location and mtime are left out on purpose: a copied model keeps its cache; a same-shape fine-tune does not."""
    h = hashlib.sha256()
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise FileNotFoundError(f"cannot fingerprint {root}: no such file or folder")
        files = sorted(p for p in root.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(root).parts)) if root.is_dir() else [root]
        for f in files:
            size = f.stat().st_size
            name = f.relative_to(root).as_posix() if root.is_dir() else f.name
            h.update(f"{name}\0{size}\0".encode("utf-8", "surrogateescape"))
            with open(f, "rb") as fh:
                if size <= _SAMPLES * _CHUNK:
                    h.update(fh.read())
                    continue
                if f.suffix == ".safetensors":
                    n = int.from_bytes(fh.read(8), "little")
                    h.update(fh.read(min(n, size - 8)))
                for i in range(_SAMPLES):
                    fh.seek((size - _CHUNK) * i // (_SAMPLES - 1))
                    h.update(fh.read(_CHUNK))
    return h.hexdigest()[:32]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via `write(tmp)` then rename over `path`; a killed writer leaves at most a hidden *.tmp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # from a killed run; only this rank owns this key
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _first_line(e: BaseException) -> str:
    """The first line of an error; the class name too, unless it is a CogtuneError (written for users as it is)."""
    text = str(e).strip()
    if text and isinstance(e, CogtuneError):
        return text.splitlines()[0]
    return f"{e.__class__.__name__}: {text.splitlines()[0]}" if text else e.__class__.__name__


class LatentCache:
    """The cache at `root` for one (video_fingerprint, text_fingerprint) pair, both JSON-serialisable mappings:
    everything build-wide that changes a clip's latents (variant, VAE fingerprint, frame sampling, crop, fps,
    dtype, ...), and everything that changes a caption's embedding (text encoder fingerprint, max length, ...)."""

    def __init__(self, root: str | os.PathLike, video_fingerprint: Mapping[str, Any],
                 text_fingerprint: Mapping[str, Any]) -> None:
        self.root = Path(root)
        self.video_fingerprint, self.text_fingerprint = dict(video_fingerprint), dict(text_fingerprint)

    def _video_recipe(self, item: CacheItem) -> dict[str, Any]:
        source = _file_identity(item.video) | {"start": item.start, "end": item.end}
        source["image"] = _file_identity(item.image) if item.image is not None else None
        return {"video": self.video_fingerprint, "settings": dict(item.settings), "source": source}

    def video_key(self, item: CacheItem) -> str:
        """Stats the source file(s); raises FileNotFoundError if one is missing."""
        return _hash(self._video_recipe(item))

    def prompt_key(self, caption: str) -> str:
        return _hash({"text": self.text_fingerprint, "caption": caption})

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def video_path(self, item: CacheItem) -> Path:
        return self._path("videos", self.video_key(item))

    def prompt_path(self, caption: str) -> Path:
        return self._path("prompts", self.prompt_key(caption))

    def _failure_path(self, key: str) -> Path:
        return self.root / "failed" / f"{key}.json"

    def _failure_reason(self, key: str) -> str | None:
        """Why the loader failed on this key in an earlier build, if it did."""
        try:
            return json.loads(self._failure_path(key).read_text(encoding="utf-8"))["reason"]
        except (OSError, ValueError, KeyError):
            return None

    @staticmethod
    def _problem(path: Path, key: str) -> str | None:
        """None if the entry at `path` is whole and belongs to `key`; otherwise why not (header check only)."""
        if not path.is_file():
            return "missing"
        try:
            with safe_open(str(path), "pt") as f:  # checks the header covers the file exactly: catches truncation
                meta, names = f.metadata() or {}, list(f.keys())
        except Exception as e:  # safetensors raises its own error type for every kind of damage
            return f"corrupt ({_first_line(e)})"
        if meta.get("cogtune.key") != key:
            return "corrupt (written for another key)"
        return None if names else "corrupt (no tensors)"

    def _read(self, path: Path, key: str, what: str) -> dict[str, torch.Tensor]:
        if not path.is_file():
            if (reason := self._failure_reason(key)) is not None:
                raise CacheError(f"{what} could not be cached: {reason}")
            raise CacheError(f"{what} is not in the cache at {self.root}; run the cache step for these settings")
        # into memory, not safe_open: its tensors map the file, and a file changed under a mapping means SIGBUS
        try:
            data = path.read_bytes()
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
            if header.get("__metadata__", {}).get("cogtune.key") == key:
                return safetensors.torch.load(data)
            problem = "corrupt (written for another key)"
        except Exception as e:
            problem = f"corrupt ({_first_line(e)})"
        raise CacheError(f"cache entry {path} for {what} is {problem}; run the cache step again to re-encode it")

    def load(self, item: CacheItem) -> dict[str, torch.Tensor]:
        """The tensors encode_video returned for this item, without the batch dim. Raises CacheError."""
        try:
            key = self.video_key(item)
        except OSError as e:
            raise CacheError(f"{item.describe()}: cannot read the source ({_first_line(e)})") from None
        return self.load_video_key(key, item.describe())

    def load_video_key(self, key: str, what: str = "clip") -> dict[str, torch.Tensor]:
        """`load` for a key resolved earlier with `video_key` (saves a stat of the source per read)."""
        return self._read(self._path("videos", key), key, what)

    def prompt(self, caption: str) -> dict[str, torch.Tensor]:
        """The text encodings of one caption (e.g. {"prompt_embeds": [L, D]}). Raises CacheError."""
        key = self.prompt_key(caption)
        return self._read(self._path("prompts", key), key, f"prompt {caption!r}")

    def has_prompt(self, caption: str) -> bool:
        """Whether a caption's entry is whole (header check only)."""
        key = self.prompt_key(caption)
        return self._problem(self._path("prompts", key), key) is None

    def check(self, items: Sequence[CacheItem]) -> CacheCheck:
        """Which items are ready to train on (header checks only; run after every rank's build has finished)."""
        ready, problems = [], {}
        for i, item in enumerate(items):
            try:
                key, pkey = self.video_key(item), self.prompt_key(item.caption)
            except OSError as e:
                problems[i] = f"cannot read the source ({_first_line(e)})"
                continue
            video = self._problem(self._path("videos", key), key)
            prompt = self._problem(self._path("prompts", pkey), pkey)
            if video == "missing" and (reason := self._failure_reason(key)) is not None:
                problems[i] = f"failed: {reason}"
            elif video or prompt:
                problems[i] = f"video entry {video}" if video else f"prompt entry {prompt}"
            else:
                ready.append(i)
        return CacheCheck(ready, problems)

    def _write(self, path: Path, key: str, kind: str, source: str, recipe: Any,
               tensors: dict[str, torch.Tensor]) -> None:
        meta = {"cogtune.cache": str(FORMAT), "cogtune.key": key, "cogtune.kind": kind,
                "cogtune.source": display_path(source),
                "cogtune.fingerprint": _canonical(recipe)}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        try:
            _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        except OSError as e:  # a full disk or a read-only folder: every later entry would fail the same way
            raise CacheError(f"cannot write cache entry {path}: {e.strerror or e}; free disk space or point "
                             "the cache (data.cache_dir) at a writable folder") from e

    def build(self, items: Sequence[CacheItem], load_video: Callable[[CacheItem], torch.Tensor],
              encode_video: Callable[[torch.Tensor], dict[str, torch.Tensor]],
              encode_prompt: Callable[[list[str]], torch.Tensor], rank: int = 0, world_size: int = 1,
              progress: bool = True, prompt_batch_size: int = 8, retry_failed: bool = False) -> CacheReport:
        """build_prompts then build_videos; see those. Raises CacheError if the cache folder can't be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            writable = os.access(self.root, os.W_OK)
        except OSError as e:
            raise CacheError(f"cannot create the cache folder {self.root}: {e.strerror or e}; point the cache "
                             "(data.cache_dir) at a folder you can write to") from e
        if not writable:
            raise CacheError(f"cannot write to the cache folder {self.root}; point the cache (data.cache_dir) "
                             "at a folder you can write to")
        captions = [it.caption for it in items]
        return self.build_prompts(captions, encode_prompt, rank, world_size, progress, prompt_batch_size).merge(
            self.build_videos(items, load_video, encode_video, rank, world_size, progress, retry_failed))

    def build_prompts(self, captions: Sequence[str], encode_prompt: Callable[[list[str]], dict[str, torch.Tensor]],
                      rank: int = 0, world_size: int = 1, progress: bool = True,
                      batch_size: int = 8) -> CacheReport:
        """Encode this rank's share (split by key: pass the same captions on every rank) of the unique captions
        not yet cached. encode_prompt(n captions) -> {name: Tensor [n, ...]} (a bare tensor is taken as
        {"prompt_embeds": it}); a failed batch is reported and skipped."""
        t0, report = time.perf_counter(), CacheReport(rank, world_size)
        mine = sorted((self.prompt_key(c), c) for c in dict.fromkeys(captions))[rank::world_size]
        report.prompts_total = len(mine)
        report.prompts_cached, todo = self._triage("prompts", mine, report, skip_failed=False)
        with self._bar(len(todo), "prompts", report, progress) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                try:
                    with torch.no_grad():
                        embeds = encode_prompt([c for _, c in chunk])
                    if isinstance(embeds, torch.Tensor):
                        embeds = {PROMPT_TENSOR: embeds}
                    if not isinstance(embeds, dict) or not embeds or not all(
                            isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[0] == len(chunk)
                            for t in embeds.values()):
                        shapes = {k: tuple(getattr(t, "shape", ())) for k, t in dict(embeds).items()} if isinstance(
                            embeds, dict) else type(embeds)
                        raise ValueError(f"encode_prompt returned {shapes} for {len(chunk)} captions; expected "
                                         "tensors [n, L, D]")
                except Exception as e:
                    report.failed += [(f"prompt {c!r}", _first_line(e)) for _, c in chunk]
                    log.warning("cannot encode %d prompt(s): %s", len(chunk), _first_line(e))
                else:
                    for i, (key, caption) in enumerate(chunk):
                        recipe = {"text": self.text_fingerprint, "caption": caption}
                        rows = {name: t[i] for name, t in embeds.items()}
                        self._write(self._path("prompts", key), key, "prompt", caption, recipe, rows)
                        report.prompts_encoded += 1
                bar.update(len(chunk))
        report.seconds = time.perf_counter() - t0
        return report

    def build_videos(self, items: Sequence[CacheItem], load_video: Callable[[CacheItem], torch.Tensor],
                     encode_video: Callable[[torch.Tensor], dict[str, torch.Tensor]], rank: int = 0,
                     world_size: int = 1, progress: bool = True, retry_failed: bool = False) -> CacheReport:
        """Encode this rank's share of the unique clips not yet cached (split by key: same items on every rank).

        load_video(item) -> [F, 3, H, W] in [-1, 1], or a dict of it as "video" and more inputs of encode_video
        (each gets a batch dim); encode_video([1, F, 3, H, W], **more) -> {name: [1, ...]}. A loader
        failure is recorded in failed/ and not retried for the same key unless retry_failed; an encoder failure
        is reported and retried by the next build."""
        t0, report = time.perf_counter(), CacheReport(rank, world_size)
        unique: dict[str, CacheItem] = {}
        for i, item in enumerate(items):
            try:
                unique.setdefault(self.video_key(item), item)
            except OSError as e:
                if i % world_size == rank:
                    report.failed.append((item.describe(), f"cannot read the source ({_first_line(e)})"))
        mine = list(unique.items())[rank::world_size]
        report.videos_total = len(mine)
        report.videos_cached, todo = self._triage("videos", mine, report, skip_failed=not retry_failed)
        with self._bar(len(todo), "clips", report, progress) as bar:
            for key, item in todo:
                self._encode_one(key, item, load_video, encode_video, report)
                bar.update(1)
        report.seconds = time.perf_counter() - t0
        return report

    def _triage(self, kind: str, entries: list[tuple[str, Any]], report: CacheReport,
                skip_failed: bool) -> tuple[int, list[tuple[str, Any]]]:
        """-> (how many are cached, the (key, x) pairs to encode); notes corrupt entries and known failures."""
        cached, todo = 0, []
        for key, x in entries:
            problem = self._problem(path := self._path(kind, key), key)
            reason = self._failure_reason(key) if skip_failed and problem == "missing" else None
            if problem is None:
                cached += 1
            elif reason is not None:
                report.failed.append((x.describe(), reason))
            else:
                report.repaired += [str(path)] if problem != "missing" else []
                todo.append((key, x))
        return cached, todo

    @staticmethod
    def _bar(total: int, what: str, report: CacheReport, progress: bool) -> tqdm:
        tag = f" [rank {report.rank}/{report.world_size}]" if report.world_size > 1 else ""
        return tqdm(total=total, desc=f"caching {what}{tag}", unit=what[:-1], disable=not progress or not total,
                    dynamic_ncols=True)

    def _encode_one(self, key: str, item: CacheItem, load_video: Callable[[CacheItem], torch.Tensor],
                    encode_video: Callable[[torch.Tensor], dict[str, torch.Tensor]], report: CacheReport) -> None:
        failure, loaded = self._failure_path(key), False
        try:
            video, extra = load_video(item), {}
            if isinstance(video, dict):  # {"video": [F, 3, H, W], other inputs of encode_video (e.g. "images")}
                extra = {k: v.unsqueeze(0) for k, v in video.items() if k != "video"}
                video = video["video"]
            if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[1] != 3:
                raise ValueError(f"load_video returned {getattr(video, 'shape', type(video))}; expected [F, 3, H, W]")
            loaded = True
            with torch.no_grad():
                out = encode_video(video.unsqueeze(0), **extra)
            bad = [k for k, v in out.items() if not isinstance(v, torch.Tensor) or v.ndim < 1 or v.shape[0] != 1]
            if not out or bad:
                raise ValueError(f"encode_video must return tensors with batch dim 1; bad: {bad or 'empty dict'}")
        except Exception as e:
            reason = f"encoding failed: {_first_line(e)}" if loaded else _first_line(e)
            report.failed.append((item.describe(), reason))
            log.info("skipping %s: %s", item.describe(), reason)  # callers report `failed` to the user
            if not loaded:  # a bad clip stays bad: remember it (an encoder failure may be transient: retry)
                record = json.dumps({"source": item.describe(), "reason": reason}) + "\n"
                _atomic_write(failure, lambda tmp: tmp.write_text(record, encoding="utf-8"))
                self._path("videos", key).unlink(missing_ok=True)  # a corrupt entry would hide the reason
            return
        self._write(self._path("videos", key), key, "video", item.describe(), self._video_recipe(item),
                    {k: v[0] for k, v in out.items()})
        failure.unlink(missing_ok=True)
        report.videos_encoded += 1


class CachedClips(Dataset):
    """Item i: the cached tensors of items[i] (no batch dim) + its text encodings (e.g. "prompt_embeds" [L, D]) +
    "caption" + "index".
    Pass only ready items (LatentCache.check); use with DataLoader(batch_sampler=BucketBatchSampler(...))."""

    def __init__(self, cache: LatentCache, items: Sequence[CacheItem]) -> None:
        self.cache, self.items = cache, list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        return {**self.cache.load(item), **self.cache.prompt(item.caption), "caption": item.caption,
                "index": index}
