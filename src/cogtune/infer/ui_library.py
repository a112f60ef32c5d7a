"""What `cogtune ui` may open: model folders and LoRA files under the roots named on its command line, nothing else.

A page (or an API client) only ever names an entry of these lists; `model()` and `lora()` check that a value is one,
so no path typed into a request reaches the loaders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import CogtuneError, bounded

MAX_DEPTH = 4  # runs/<name>/checkpoint-N/pytorch_lora_weights.safetensors is three below a --loras-dir
LORA_FILE = "pytorch_lora_weights.safetensors"
NOT_LORAS = ("diffusion_pytorch_model", "model", "ema", "optimizer", "scheduler")  # file stems in run/model folders


def _walk(root: Path) -> Iterable[tuple[Path, list[str], list[str]]]:
    base = len(root.parts)
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if len(here.parts) - base < MAX_DEPTH else []
        yield here, dirs, sorted(files)


def _is_model(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


class Library:
    """Model folders under `models_dirs` (plus `models` themselves) and LoRA files under `loras_dirs` (plus `loras`)."""

    def __init__(self, models_dirs: Iterable[str | Path] = (), loras_dirs: Iterable[str | Path] = (),
                 models: Iterable[str | Path] = (), loras: Iterable[str | Path] = ()):
        self.model_roots = [self._root(d, "--models-dir") for d in models_dirs]
        self.lora_roots = [self._root(d, "--loras-dir") for d in loras_dirs]
        self.extra_models = [Path(m).resolve() for m in models]
        self.extra_loras = [Path(l).resolve() for l in loras]

    @staticmethod
    def _root(path: str | Path, flag: str) -> Path:
        path = Path(path)
        if not path.is_dir():
            raise CogtuneError(f"{flag} {path}: no such folder")
        return path.resolve()

    def models(self) -> list[Path]:
        found = list(self.extra_models)
        for root in self.model_roots:
            for folder, dirs, _ in _walk(root):
                if _is_model(folder):
                    found.append(folder)
                    dirs[:] = []  # a pipeline's own subfolders hold no other pipeline
        return sorted(dict.fromkeys(found))

    def loras(self) -> list[Path]:
        found = list(self.extra_loras)
        for root in self.lora_roots:
            for folder, dirs, files in _walk(root):
                if _is_model(folder):
                    dirs[:] = []
                    continue
                if LORA_FILE in files:  # a run's lora/ or checkpoint-N/: its ComfyUI copy is the same adapter
                    found.append(folder / LORA_FILE)
                elif not (folder / "trainer_state.json").is_file():
                    found += [folder / f for f in files if f.endswith(".safetensors") and
                              not f.split(".")[0].split("-")[0] in NOT_LORAS]
        return sorted(dict.fromkeys(found))

    def label(self, path: Path) -> str:
        """`path` relative to the root it was found under (what the page shows); a run's LoRA by its folder."""
        if path.name == LORA_FILE:
            return self.label(path.parent)
        for root in [*self.model_roots, *self.lora_roots]:
            if path.is_relative_to(root):
                rel = path.relative_to(root)
                return f"{root.name}/{rel}" if str(rel) != "." else root.name
        return str(path)

    def model(self, value: str | None) -> Path:
        return self._pick(value, self.models(), "model", "--models-dir")

    def lora(self, value: str | None) -> Path:
        return self._pick(value, self.loras(), "adapter", "--loras-dir")

    def _pick(self, value: str | None, known: list[Path], what: str, flag: str) -> Path:
        if not value:
            raise CogtuneError(f"choose a {what}")
        for path in known:
            if value in (str(path), self.label(path)):
                return path
        raise CogtuneError(f"{what} {bounded(value, 200)!r} is not one this UI serves: only those found under the "
                           f"folders given with {flag} (restart `cogtune ui` with the folder holding it)")
