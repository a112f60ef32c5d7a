"""A model folder before the slow load: every file the load needs is there and whole, and which variant it is.

Configs must parse as JSON objects; weights must be safetensors (a `.bin` is a pickle, which can run code when
loaded: it is refused, never read) whose headers describe exactly the bytes the file holds — a truncated, zero-byte
or padded file shows up here in milliseconds instead of as a raw error minutes into the load. Sharded weights are
checked shard by shard against their index. This module imports no diffusers, so a refusal costs no import time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import CogtuneError, bounded, display_path, os_error_text

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
CONFIG_FILES = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "scheduler": "scheduler_config.json"}
WEIGHT_STEMS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
TOKENIZER_MODELS = ("tokenizer.json", "spiece.model")  # the fast tokenizer or the sentencepiece model
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
             "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100_000_000  # what the safetensors library itself accepts
REFETCH = "the download or copy did not finish: fetch or copy it again"


def _where(path: Path) -> str:
    return display_path(path)


def read_json(path: str | Path, what: str = "a JSON file") -> dict:
    """A JSON object from `path`, or one line saying which file is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise CogtuneError(f"{_where(path)} is missing: {what} is needed here; {REFETCH}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CogtuneError(os_error_text(e, f"reading {what}")) from None
    except UnicodeDecodeError:
        raise CogtuneError(f"{_where(path)} is not text (expected {what}): {REFETCH}") from None
    except json.JSONDecodeError as e:
        raise CogtuneError(f"{_where(path)} is not valid JSON ({e.msg} at line {e.lineno}): {REFETCH}") from None
    if not isinstance(data, dict):
        raise CogtuneError(f"{_where(path)} holds a JSON {type(data).__name__}, not an object (expected {what}): "
                           f"{REFETCH}")
    return data


def safetensors_header(path: str | Path) -> dict:
    """The header of a safetensors file, after checking that its tensors cover the file's bytes exactly."""
    path = Path(path)
    damaged = f"{_where(path)} is damaged or not a safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                raise CogtuneError(f"{_where(path)} is {'empty' if size == 0 else f'{size} bytes'}, "
                                   f"not safetensors weights: {REFETCH}")
            n = int.from_bytes(f.read(8), "little")
            if n > min(MAX_HEADER, size - 8):
                raise CogtuneError(f"{damaged} (header of {n} bytes in a file of {size}): {REFETCH}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CogtuneError(os_error_text(e, "reading weights")) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CogtuneError(f"{damaged} (its header is not JSON): {REFETCH}") from None
    if not isinstance(header, dict):
        raise CogtuneError(f"{damaged} (its header is not a JSON object): {REFETCH}")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in entry["data_offsets"])
            count = math.prod(int(s) for s in entry["shape"])
            item = ITEM_SIZE.get(entry["dtype"])
        except (TypeError, KeyError, ValueError):
            raise CogtuneError(f"{damaged} (tensor {bounded(key)} has no valid dtype/shape/offsets): {REFETCH}") from None
        if begin < 0 or stop < begin or (item is not None and stop - begin != count * item):
            raise CogtuneError(f"{damaged} (tensor {bounded(key)}: offsets {begin}..{stop} do not fit its shape): "
                               f"{REFETCH}")
        end = max(end, stop)
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "longer than its tensors"
        raise CogtuneError(f"{_where(path)} is {what}: it holds {size:,} bytes, its header describes {8 + n + end:,}; "
                           f"{REFETCH}")
    return header


def _pickle_refusal(folder: Path, found: Path, stem: str) -> CogtuneError:
    return CogtuneError(
        f"{_where(found)}: weights in PyTorch pickle format only ({found.suffix}); cogtune reads safetensors only, "
        f"since loading a pickle can run code. Convert it where you trust the file, e.g. "
        f"`from_pretrained(...).save_pretrained(DIR, safe_serialization=True)`, to get {stem}.safetensors "
        f"in {_where(folder)}")


def check_weights(folder: str | Path, stem: str = "diffusion_pytorch_model") -> list[Path]:
    """The safetensors files of a model folder (single file or shards of an index), each checked; else one line."""
    folder = Path(folder)
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    files = [single] if single.is_file() else []
    if index.is_file():
        weight_map = read_json(index, "the index of sharded weights").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(v, str) and v and "/" not in v for v in weight_map.values()):
            raise CogtuneError(f"{_where(index)} has no valid weight_map (tensor name -> shard file): {REFETCH}")
        shards = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        for shard, keys in sorted(shards.items()):
            if not (folder / shard).is_file():
                raise CogtuneError(f"{_where(folder / shard)} is missing ({len(keys)} tensors of {index.name} are "
                                   f"in it): {REFETCH}")
            header = safetensors_header(folder / shard)
            lost = next((k for k in keys if k not in header), None)
            if lost is not None:
                raise CogtuneError(f"{_where(folder / shard)} lacks tensor {bounded(lost)} that {index.name} puts "
                                   f"there: the shards and the index come from different saves; {REFETCH}")
            files.append(folder / shard)
        if single.is_file():
            safetensors_header(single)
        return files
    if files:
        safetensors_header(single)
        return files
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise _pickle_refusal(folder, pickles[0], stem)
    raise CogtuneError(f"{_where(folder)} has no weights ({stem}.safetensors or {stem}.safetensors.index.json): "
                       f"{REFETCH}")


def _check_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_MODELS):
        raise CogtuneError(f"{_where(folder)} has neither {' nor '.join(TOKENIZER_MODELS)}: the tokenizer is "
                           f"incomplete; {REFETCH}")
    for name in TOKENIZER_JSON:
        if (folder / name).is_file():
            read_json(folder / name, f"the tokenizer's {name}")


def check_pipeline_folder(path: str | Path, weights: bool = True) -> Path:
    """`path` if it is a whole diffusers pipeline folder (every component, config and, with `weights`, weight file);
    else one line naming the first missing or broken file and what to do."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise CogtuneError(f"model folder {_where(path)} {what}: give a diffusers pipeline folder "
                           "(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)")
    index = read_json(path / "model_index.json", "a diffusers pipeline's model_index.json")
    for part in COMPONENTS:
        entry = index.get(part)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise CogtuneError(f"{_where(path / 'model_index.json')} names no {part} (a [library, class] pair): "
                               "not a diffusers video pipeline folder, or the file is damaged; fetch it again")
        folder = path / part
        if not folder.is_dir():
            raise CogtuneError(f"model folder {_where(path)} has no {part}/ folder: {REFETCH}")
        if part in CONFIG_FILES:
            read_json(folder / CONFIG_FILES[part], f"the {part}'s {CONFIG_FILES[part]}")
        if part == "tokenizer":
            _check_tokenizer(folder)
        elif weights and part in WEIGHT_STEMS:
            check_weights(folder, WEIGHT_STEMS[part])
    return path


def _read_json(path: Path) -> dict:
    return read_json(path, "a diffusers config.json")


def check_model_dir(path: str | Path, weights: bool = True) -> Path:
    """`path` if it is a whole pipeline folder (see models/folder.py); else one line naming the file at fault."""
    return check_pipeline_folder(path, weights)


def pick_variant(*args, **kwargs):
    from . import pick_variant as pick

    return pick(*args, **kwargs)


def resolve_variant(path, given: str | None = None, key: str = "model.variant", weights: bool = True):
    """The variant (ModelFacts) of a model folder: see cogtune.models.resolve_variant."""
    from . import resolve_variant as resolve

    return resolve(path, given, weights=weights, key=key)
