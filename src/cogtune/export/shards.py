"""Write diffusers model folders: `config.json` + safetensors weights, one file or shards with an index.

File names, shard split and index format are those of diffusers' `ModelMixin.save_pretrained`:
`diffusion_pytorch_model.safetensors`, or `diffusion_pytorch_model-0000K-of-0000N.safetensors` plus
`diffusion_pytorch_model.safetensors.index.json` = {"metadata": {"total_size": bytes}, "weight_map": {key: file}}
(json, indent 2, sorted keys, trailing newline), split by huggingface_hub's `split_torch_state_dict_into_shards`
in state-dict order. Every weights file carries the metadata {"format": "pt"}.

`ShardWriter` lays out every file before any data arrives (it is told all names, shapes and dtypes up front), writes
each safetensors header first, then puts tensors, or pieces of tensors, straight at their place in the file. It
never holds a shard in memory: the ZeRO converter feeds it one rank's slices at a time.
A folder is always built in a temp folder beside its destination and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cogtune.dtypes import DTYPES  # noqa: F401 (the --dtype names, used here and re-exported)
from cogtune.errors import CogtuneError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
DEFAULT_CLASS = "CogVideoXTransformer3DModel"

_SAFETENSORS_DTYPE: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_WRITE_CHUNK = 1 << 24  # elements converted and written per call: bounds the temporary copies


@contextlib.contextmanager
def _naming(path: Path):
    """os.write/pwrite/ftruncate raise without a file name; the user's one line should name the file."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None,
                     mode: int | None = None) -> None:
    """safetensors' save_file, but a failed write is an OSError naming the file (safetensors raises its own error
    with the errno in its text) and leaves no partial file."""
    from safetensors.torch import save_file

    try:
        save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
        if mode is not None:
            os.chmod(path, mode)
    except BaseException as e:
        Path(path).unlink(missing_ok=True)
        code = re.search(r"(?:os error|code:) (\d+)", str(e)) if not isinstance(e, OSError) else None
        if code:  # e.g. "I/O error: No space left on device (os error 28)"
            errno_ = int(code.group(1))
            raise OSError(errno_, os.strerror(errno_), str(path)) from None
        raise


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'fp32' | 'bf16' | 'fp16' | a torch floating dtype | None (keep) -> torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(dtype).lower(), str(dtype).lower())
    if key not in DTYPES:
        raise CogtuneError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def target_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: `dtype` for floating tensors, integer/bool ones are never converted."""
    return dtype if dtype is not None and stored.is_floating_point else stored


def plan_shards(specs: Mapping[str, TensorSpec], max_shard_size: int | str) -> dict[str, list[str]]:
    """{file name: [keys]} exactly as diffusers' save_pretrained would split a state dict of these tensors."""
    from huggingface_hub import split_torch_state_dict_into_shards

    meta = {k: torch.empty(s.shape, dtype=s.dtype, device="meta") for k, s in specs.items()}
    try:
        split = split_torch_state_dict_into_shards(meta, filename_pattern=WEIGHTS_PATTERN,
                                                   max_shard_size=max_shard_size)
    except ValueError as e:
        raise CogtuneError(f"max shard size {max_shard_size!r}: {e}; use e.g. 5GB or 500MB") from None
    return split.filename_to_tensors


class ShardWriter:
    """Writes a diffusers weights layout into `folder`, tensor by tensor or piece by piece, in any order.

    `write(key, values, start)` puts `values` (any dtype, converted to the planned one) at flat element `start` of
    tensor `key`; `add(key, tensor)` writes a whole tensor. `close()` checks that every tensor was written completely,
    writes the index when sharded and returns the files written. Use it as a context manager.
    """

    def __init__(self, folder: str | Path, specs: Mapping[str, TensorSpec], max_shard_size: int | str = "5GB",
                 metadata: Mapping[str, str] | None = None):
        self.folder = Path(folder)
        self.specs = dict(specs)
        self.plan = plan_shards(self.specs, max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._remaining = {k: s.numel for k, s in self.specs.items()}
        self._where: dict[str, tuple[int, int]] = {}  # key -> (fd, byte offset of its data in the file)
        self._fds: list[int] = []
        self._paths: dict[int, Path] = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            for filename, keys in self.plan.items():
                self._open_file(filename, keys)
        except BaseException:
            self._close_fds()
            raise

    def _open_file(self, filename: str, keys: list[str]) -> None:
        # As safetensors does: larger items first (keeps every tensor aligned), then by name.
        order = sorted(keys, key=lambda k: (-self.specs[k].dtype.itemsize, k))
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for k in order:
            spec = self.specs[k]
            if spec.dtype not in _SAFETENSORS_DTYPE:
                raise CogtuneError(f"tensor {k}: dtype {spec.dtype} cannot be stored in safetensors by cogtune")
            header[k] = {"dtype": _SAFETENSORS_DTYPE[spec.dtype], "shape": list(spec.shape),
                         "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        path = self.folder / filename
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fds.append(fd)
        self._paths[fd] = path
        with _naming(path):
            os.write(fd, len(head).to_bytes(8, "little") + head)
            os.ftruncate(fd, 8 + len(head) + offset)
        base = 8 + len(head)
        for k in order:
            self._where[k] = (fd, base + header[k]["data_offsets"][0])  # type: ignore[index]

    def write(self, key: str, values: torch.Tensor, start: int = 0) -> None:
        if key not in self.specs:
            raise KeyError(f"{key} is not in this writer's plan")
        spec, n = self.specs[key], values.numel()
        if start < 0 or start + n > spec.numel:
            raise ValueError(f"{key}: elements [{start}, {start + n}) fall outside its {spec.numel}")
        fd, base = self._where[key]
        flat = values.detach().reshape(-1)
        for i in range(0, n, _WRITE_CHUNK):
            part = flat[i:i + _WRITE_CHUNK].to(device="cpu", dtype=spec.dtype).contiguous()
            data = part.view(torch.uint8).numpy() if part.numel() else b""
            position = base + (start + i) * spec.dtype.itemsize
            written = 0
            with _naming(self._paths[fd]):
                while written < len(data):
                    written += os.pwrite(fd, data[written:], position + written)
        self._remaining[key] -= n

    def add(self, key: str, tensor: torch.Tensor) -> None:
        expected = self.specs[key].shape
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} differs from the planned {expected}")
        self.write(key, tensor, 0)

    def close(self) -> list[Path]:
        try:
            unfinished = [k for k, left in self._remaining.items() if left != 0]
            if unfinished:
                raise RuntimeError(f"{len(unfinished)} tensors were not written exactly once, e.g. {unfinished[0]}")
            for fd in self._fds:
                with _naming(self._paths[fd]):
                    os.fsync(fd)
        finally:
            self._close_fds()
        files = [self.folder / f for f in self.plan]
        if len(self.plan) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs.values())},
                     "weight_map": {k: f for f, keys in self.plan.items() for k in keys}}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            files.append(self.folder / INDEX_NAME)
        return files

    def _close_fds(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_fds()


def check_can_create(path: str | Path, what: str = "output") -> None:
    """One line now, not after the slow part, if `path` cannot be created: an ancestor of it is a file, or the
    nearest folder that exists is not writable."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CogtuneError(f"{what} {path}: {parent} is a file, not a folder; choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise CogtuneError(f"{what} {path}: folder {parent} is not writable; choose another path")
            return


def refuse_overlap(out: str | Path, inside_ok: bool = False, **inputs: str | Path) -> None:
    """One line if output `out` is or contains one of `inputs` (flag name -> path), or lies inside one unless
    `inside_ok`: replacing it (--overwrite) would delete what is being read."""
    o = Path(out).resolve()
    for flag, path in inputs.items():
        i = Path(path).resolve()
        if o == i or o in i.parents or (i in o.parents and not inside_ok):
            raise CogtuneError(f"output {out} overlaps {flag} {path}: write to a new folder")


def new_file_mode(mode: int = 0o666) -> int:
    """`mode` less the umask: what a plain open() would give (temp files are made 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def check_output_folder(out_dir: str | Path, overwrite: bool = False) -> Path:
    """`out_dir` if a folder can be written there: not a file, empty unless `overwrite`, creatable."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CogtuneError(f"output {out} is a file, not a folder: choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CogtuneError(f"output folder {out} is not empty: choose a new path or pass --overwrite to replace it")
    check_can_create(out)
    return out


@contextlib.contextmanager
def staged_folder(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out_dir`; on success it replaces `out_dir`, on failure it is removed.

    A non-empty `out_dir` is refused unless `overwrite`; then the old folder is moved aside, the new one renamed in
    and the old one deleted, so `out_dir` is never half-written.
    """
    out = check_output_folder(out_dir, overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, new_file_mode(0o777))  # mkdtemp makes it 0700; the result should look like any new folder
    try:
        yield tmp
        if out.is_dir() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)  # onto the empty placeholder folder: atomic
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # an empty or missing out_dir is replaced in one step
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def config_json(config: Mapping) -> str:
    """A diffusers config.json text (as `ConfigMixin.to_json_string` writes it) for a transformer config dict."""
    import diffusers

    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    cfg = {"_class_name": dict(config).get("_class_name", DEFAULT_CLASS),
           "_diffusers_version": dict(config).get("_diffusers_version", diffusers.__version__), **cfg}
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def save_transformer_folder(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], config: Mapping | None,
                            out_dir: str | Path, dtype: str | torch.dtype | None = None,
                            max_shard_size: int | str = "5GB", overwrite: bool = False) -> Path:
    """Write a diffusers model folder (config.json + safetensors weights, sharded past `max_shard_size`).

    `config` may be None for a diffusers model (its own `.config` is used). `dtype` None keeps each tensor's dtype;
    otherwise floating tensors are converted. Returns the folder.
    """
    is_module = isinstance(model_or_state_dict, torch.nn.Module)
    state = model_or_state_dict.state_dict() if is_module else dict(model_or_state_dict)
    if config is None:
        config = getattr(model_or_state_dict, "config", None)
        if config is None:
            raise CogtuneError("save_transformer_folder needs a config dict for a plain state dict")
    to = resolve_dtype(dtype)
    specs = {k: TensorSpec(tuple(t.shape), target_dtype(t.dtype, to)) for k, t in state.items()}
    with staged_folder(out_dir, overwrite) as tmp:
        if config is getattr(model_or_state_dict, "config", None) and hasattr(model_or_state_dict, "save_config"):
            model_or_state_dict.save_config(tmp)  # a diffusers model writes its own config, exactly as it would
        else:
            (tmp / CONFIG_NAME).write_text(config_json(config))
        with ShardWriter(tmp, specs, max_shard_size) as writer:
            for key, tensor in state.items():
                writer.add(key, tensor)
    return Path(out_dir)


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file (tensor entries and `__metadata__`), without reading the data."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size <= 0 or size > 100_000_000:
            raise CogtuneError(f"{path} is not a safetensors file (header size {size}): re-export it")
        return json.loads(f.read(size))


def folder_shapes(folder: str | Path) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """{key: (shape, safetensors dtype, file name)} of a diffusers weights folder, read from headers only."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS_NAME).is_file():
        weight_map, files = None, [WEIGHTS_NAME]
    else:
        raise CogtuneError(f"{folder} holds no {WEIGHTS_NAME} and no {INDEX_NAME}: it is not a diffusers model folder")
    out: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for name in files:
        if not (folder / name).is_file():
            raise CogtuneError(f"{folder / name} is missing (listed in {INDEX_NAME}): copy the whole folder")
        for key, entry in read_safetensors_header(folder / name).items():
            if key == "__metadata__":
                continue
            if weight_map is not None and weight_map.get(key) != name:
                raise CogtuneError(f"{folder / name}: tensor {key} is not mapped to this file in {INDEX_NAME}")
            out[key] = (tuple(entry["shape"]), entry["dtype"], name)
    if weight_map is not None and set(weight_map) != set(out):
        missing = sorted(set(weight_map) - set(out))
        raise CogtuneError(f"{folder}: {len(missing)} tensors in {INDEX_NAME} are in no file, e.g. {missing[0]}")
    return out


def shape_problems(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                   found_name: str = "found", expected_name: str = "expected") -> list[str]:
    """What differs between two {key: shape} maps, as short phrases naming the first key of each kind."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected keys (e.g. {extra[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} shapes differ (e.g. {k}: {found_name} {list(found[k])}, "
                        f"{expected_name} {list(expected[k])})")
    return problems


def model_specs(config: Mapping) -> dict[str, TensorSpec]:
    """{key: shape/dtype} of the diffusers model a config.json dict builds (on the meta device: nothing allocated),
    in state-dict order."""
    import diffusers

    name = config.get("_class_name", DEFAULT_CLASS)
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise CogtuneError(f"config _class_name {name!r} is not a diffusers model class")
    try:
        with torch.device("meta"):
            model = cls.from_config(dict(config))
    except Exception as e:  # noqa: BLE001 - a bad config becomes one line
        raise CogtuneError(f"cannot build {name} from its config: {str(e).strip().splitlines()[0]}") from None
    return {k: TensorSpec(tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}


def verify_transformer_folder(out_dir: str | Path, expected_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise CogtuneError unless the folder's weights have exactly the keys of `expected_shapes`, with those shapes."""
    folder = Path(out_dir)
    if not (folder / CONFIG_NAME).is_file():
        raise CogtuneError(f"{folder} has no {CONFIG_NAME}: it is not a diffusers model folder")
    found = {k: shape for k, (shape, _, _) in folder_shapes(folder).items()}
    problems = shape_problems(found, expected_shapes)
    if problems:
        raise CogtuneError(f"{folder} does not match the model: {'; '.join(problems)}")
