"""The work behind `cogtune ui`, free of any web framework.

One pipeline stays in memory; each adapter file is loaded into it once (named by its content hash, so a renamed or
re-picked adapter is not loaded twice) and jobs only switch which adapters are active at which weight. One job runs
at a time and can be cancelled between denoising steps. Every output gets a name no other output has, and a JSON
record beside it (prompt, seed, settings, model, adapters with their file hashes, the `cogtune generate` command
that reproduces it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..errors import CogtuneError
from .generate import (LoraSpec, Settings, activate_adapters, build_pipeline, load_adapters, model_facts,
                       resolve_settings, sample)
from .ui_library import LORA_FILE, Library

RECORD_KEY = "cogtune_ui"  # marks a JSON file in the output folder as one of our records
Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what is happening)


class Cancelled(CogtuneError):
    """The user cancelled the job."""


@dataclass
class Pick:
    """An adapter as chosen on the page: a file from the library, a weight, a name for the labels."""
    path: Path
    weight: float = 1.0
    name: str = ""


@dataclass
class Request:
    model: Path
    prompt: str
    adapters: list[Pick] = field(default_factory=list)
    negative_prompt: str = ""
    image: Path | None = None
    seed: int | None = None  # None: a random one, recorded
    steps: int = 50
    guidance_scale: float | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    compare: bool = False


def adapter_name(path: Path) -> str:
    """A label for an adapter file: its run's name for `<run>/lora/` and `<run>/checkpoint-N/`, else the file's."""
    if path.name == LORA_FILE:
        folder = path.parent
        name = folder.parent.name if folder.name == "lora" else folder.name
        if folder.name.startswith("checkpoint-"):
            name = f"{folder.parent.name}-{folder.name.removeprefix('checkpoint-')}"
    else:
        name = path.stem
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:40] or "lora"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40] or "run"


class Studio:
    def __init__(self, library: Library, out_dir: str | Path, options: dict[str, Any] | None = None):
        from ..export.shards import check_can_create

        self.library = library
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise CogtuneError(f"--out-dir {out_dir} is a file: give a folder for the videos")
        if not self.out_dir.is_dir():
            check_can_create(self.out_dir, "--out-dir")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.options = options or {}
        self._busy = threading.Lock()
        self._cancel = threading.Event()
        self._model: tuple | None = None
        self._pipe = None
        self._loaded: dict[str, Path] = {}  # adapter name in the pipeline -> file
        self._hashes: dict[tuple, str] = {}
        self.loads = 0  # how many times a base model was loaded (the UI keeps one)

    # --- what the page asks before a job ----------------------------------------------------------------------
    def defaults(self, model: Path) -> dict[str, Any]:
        from ..models import resolve_variant

        v = resolve_variant(model)
        return {"variant": v.name, "i2v": v.i2v, "frames": v.native_frames, "height": v.native_height,
                "width": v.native_width, "fps": v.fps, "guidance_scale": v.guidance, "steps": 50,
                "size_multiple": v.size_multiple, "fixed_resolution": v.fixed_resolution}

    def busy(self) -> bool:
        return self._busy.locked()

    def cancel(self) -> bool:
        """Ask the running job to stop at its next step; False when none runs."""
        if not self.busy():
            return False
        self._cancel.set()
        return True

    def history(self, limit: int = 60) -> list[dict[str, Any]]:
        """Records of earlier outputs in the output folder, newest first (unreadable files are skipped)."""
        records = []
        for path in self.out_dir.glob("*.json"):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get(RECORD_KEY) and (self.out_dir / str(record.get("video"))).is_file():
                records.append(record)
        return sorted(records, key=lambda r: str(r.get("created")), reverse=True)[:limit]

    # --- a job ------------------------------------------------------------------------------------------------
    def run(self, req: Request, on_progress: Progress | None = None) -> dict[str, Any]:
        """Check `req`, sample, write the video(s) and the record; returns the record. One line on bad input."""
        if not self._busy.acquire(blocking=False):
            raise CogtuneError("a job is running: wait for it, or cancel it")
        try:
            self._cancel.clear()
            return self._run(req, on_progress or (lambda done, total, text: None))
        finally:
            self._busy.release()

    def _check(self, req: Request) -> tuple[Path, Settings, list[LoraSpec]]:
        model = self.library.model(str(req.model))
        picks = [Pick(self.library.lora(str(p.path)), p.weight, p.name or adapter_name(Path(p.path)))
                 for p in req.adapters]
        seen: set[Path] = set()
        for p in picks:
            if p.path in seen:
                raise CogtuneError(f"adapter {self.library.label(p.path)} is chosen twice: pick it once")
            seen.add(p.path)
        specs = [LoraSpec.parse(f"{p.path}:{float(p.weight)!r}@{p.name}", i)  # the CLI's checks of name and weight
                 for i, p in enumerate(picks)]
        names = [s.name for s in specs]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise CogtuneError(f"two adapters are named {dup!r}: give them different names")
        if req.compare and not specs:
            raise CogtuneError("compare needs at least one adapter")
        seed = secrets.randbelow(2**32) if req.seed is None else int(req.seed)
        settings = resolve_settings(model, Settings(req.prompt, req.negative_prompt, req.image, req.frames, req.height,
                                                    req.width, None, req.steps, seed, req.guidance_scale), specs)
        return model, settings, specs

    def _run(self, req: Request, on_progress: Progress) -> dict[str, Any]:
        model, settings, specs = self._check(req)
        stem = self._new_stem()
        runs = len(specs) + 1 + (len(specs) > 1) if req.compare else 1
        total = runs * settings.steps
        # what the kept pipeline must be: the model, built with or without its learned positional table (as the
        # adapters were trained)
        facts = model_facts(model, specs)
        key = (model, facts.positions_dropped)
        on_progress(0, total, "loading the model" if self._model != key else "loading adapters")
        pipe, loaded = self._pipeline(model, specs, facts, key)
        if self._cancel.is_set():
            raise Cancelled("cancelled before sampling: nothing was written")
        written: list[Path] = []
        try:
            if settings.image is not None:  # the first frame beside the output, so the record reproduces it
                image = self.out_dir / f"{stem}-image{Path(settings.image).suffix.lower() or '.png'}"
                shutil.copyfile(settings.image, image)
                written.append(image)
                settings.image = image
            record = self._sample(pipe, settings, specs, loaded, req.compare, stem, total, on_progress, written)
            record.update(self._describe(model, settings, specs, req.compare, stem))
            written.append(self._write_record(stem, record))
            return record
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise

    def _sample(self, pipe, settings: Settings, specs: list[LoraSpec], loaded: list[LoraSpec], compare: bool, stem: str,
                total: int, on_progress: Progress, written: list[Path]) -> dict[str, Any]:
        from ..data.video import write_mp4
        from .compare import comparison_runs, compare_videos, write_comparison

        started, base = time.monotonic(), [0, "sampling"]  # steps of earlier runs, label of this one

        def on_step(step: int, steps: int) -> None:
            done = base[0] + step
            if self._cancel.is_set():
                raise Cancelled(f"cancelled at step {done} of {total}: nothing was written")
            left = (time.monotonic() - started) / done * (total - done)
            on_progress(done, total, f"{base[1]}: step {step}/{steps}, about {left:.0f} s left")

        def on_run(run: int, runs: int, label: str) -> None:
            base[:] = [(run - 1) * settings.steps, f"{label} (video {run} of {runs})"]

        out = self.out_dir / f"{stem}.mp4"
        if not compare:
            video = sample(pipe, settings, on_step, progress=False)
            written.append(write_mp4(video, out, settings.fps, value_range=(0.0, 1.0)))
            return {"kind": "generate", "video": out.name, "videos": [{"label": "video", "file": out.name}]}
        by_name = dict(zip([s.name for s in specs], loaded))
        runs = [(label, [by_name[s.name] for s in active]) for label, active in comparison_runs(specs)]
        videos, labels = compare_videos(pipe, settings, loaded, on_run, on_step, progress=False, runs=runs)
        singles = []
        for i, (clip, label) in enumerate(zip(videos, labels)):
            path = write_mp4(clip, self.out_dir / f"{stem}-{i + 1}-{_slug(label)}.mp4", settings.fps)
            written.append(path)
            singles.append({"label": label, "file": path.name})
        grid, sheet = write_comparison(videos, labels, out, settings.fps)
        written += [grid, sheet]
        return {"kind": "compare", "video": grid.name, "sheet": sheet.name, "videos": singles}

    def _pipeline(self, model: Path, specs: list[LoraSpec], facts, key: tuple):
        """The kept pipeline (`key`: model and how it is built) with `specs` active; only adapters not loaded before
        are read."""
        from ..export.lora_compat import check_lora_compat

        if self._model != key:
            self._pipe = self._model = None  # free the old weights before loading new ones
            self._loaded = {}
            self._pipe = build_pipeline(model, [], facts=facts, **self.options)
            self._model = key
            self.loads += 1
        loaded = []
        for spec in specs:
            name = f"a{self.file_hash(spec.path)[:16]}"
            if name not in self._loaded:
                check_lora_compat(spec.path, model)
                load_adapters(self._pipe, [LoraSpec(spec.path, spec.weight, name)])
                self._loaded[name] = spec.path
            loaded.append(LoraSpec(spec.path, spec.weight, name))
        activate_adapters(self._pipe, loaded)
        return self._pipe, loaded

    # --- records ----------------------------------------------------------------------------------------------
    def file_hash(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._hashes[key] = h.hexdigest()
        return self._hashes[key]

    def _new_stem(self) -> str:
        while True:  # a time to sort by and a random part: two servers on one folder never collide
            stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            if not any(self.out_dir.glob(f"{stem}*")):
                return stem

    def _describe(self, model: Path, s: Settings, specs: list[LoraSpec], compare: bool, stem: str) -> dict[str, Any]:
        from ..models import resolve_variant

        return {
            RECORD_KEY: 1, "cogtune_version": __version__,
            "created": datetime.now().astimezone().isoformat(timespec="microseconds"),  # sorts jobs of one second
            "model": str(model), "variant": resolve_variant(model).name, "prompt": s.prompt,
            "negative_prompt": s.negative_prompt, "image": s.image.name if s.image else None, "seed": s.seed,
            "steps": s.steps, "guidance_scale": s.guidance_scale, "frames": s.frames, "height": s.height,
            "width": s.width, "fps": s.fps, "dtype": self.options.get("dtype"),
            "adapters": [{"name": l.name, "weight": l.weight, "file": str(l.path), "sha256": self.file_hash(l.path)}
                         for l in specs],
            "command": self.command(model, s, specs, compare, stem),
        }

    def command(self, model: Path, s: Settings, specs: list[LoraSpec], compare: bool, stem: str) -> str:
        """The `cogtune generate` line that writes this output again (run from the output folder)."""
        args = ["cogtune", "generate", "--model", str(model), "--prompt", s.prompt, "--out", f"{stem}.mp4"]
        if s.negative_prompt:
            args += ["--negative-prompt", s.negative_prompt]
        if s.image is not None:
            args += ["--image", s.image.name]
        for l in specs:
            args += ["--lora", f"{l.path}:{l.weight:g}@{l.name}"]
        args += ["--seed", str(s.seed), "--steps", str(s.steps), "--guidance-scale", f"{s.guidance_scale:g}",
                 "--frames", str(s.frames), "--height", str(s.height), "--width", str(s.width), "--fps", str(s.fps)]
        if self.options.get("dtype"):
            args += ["--dtype", self.options["dtype"]]
        if compare:
            args.append("--compare")
        return shlex.join(args)

    def _write_record(self, stem: str, record: dict[str, Any]) -> Path:
        path = self.out_dir / f"{stem}.json"
        tmp = path.with_name(f".{stem}.{os.getpid()}.tmp.json")
        try:
            tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
