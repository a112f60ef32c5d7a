"""Reading pickled checkpoints without running their code, and without trusting damaged bytes.

Every `torch.load` of a file a user hands us goes through `load_checkpoint_file`: the zip archive's CRC-32s are
checked (streamed, member by member), then the pickle is loaded with `weights_only=True` and an allow-list of exactly
the harmless objects that real DeepSpeed ZeRO, accelerate `save_state` and SAT saves contain (found by disassembling
real saves: DeepSpeed's stage enum, loss scaler and fragment addresses in the optimizer states; numpy's RNG state in
random_states_*.pkl and SAT's np_rng_state). Anything else is refused in one line, unless the user passes
`--unsafe-pickle` (`allow_unsafe(True)`), the same flag on every command that reads pickles.

torch.distributed.checkpoint folders (FSDP2) are pickles too: `.metadata` is read by a restricted unpickler, each item
of the `.distcp` files is an embedded torch.save zip whose CRCs are checked, and the non-tensor items are loaded
weights-only before DCP (which unpickles them with weights_only=False) ever sees them.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import os
import pickle
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any


from .errors import CogtuneError, bounded, display_path, os_error_text

log = logging.getLogger(__name__)

FLAG = "--unsafe-pickle"
FLAG_HELP = ("load checkpoint pickles in full, even objects other than tensors and known-harmless training state: "
             "unpickling can run any code, so only for files you trust")
CONSENT = f"pass {FLAG} if you trust this file"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_CHUNK = 1 << 24
_unsafe = False  # set once by the CLI from --unsafe-pickle; `unsafe=None` arguments follow it


def allow_unsafe(flag: bool) -> None:
    """What `--unsafe-pickle` sets for this process (e.g. `cogtune train`'s resume, deep inside the training loop)."""
    global _unsafe
    _unsafe = bool(flag)


def unsafe_allowed() -> bool:
    return _unsafe


@contextlib.contextmanager
def trusting(flag: bool | None):
    """`allow_unsafe(flag)` for a block (None: leave it as it is), then as before."""
    before = _unsafe
    if flag is not None:
        allow_unsafe(flag)
    try:
        yield
    finally:
        allow_unsafe(before)


# --- the allow-list ---------------------------------------------------------------------------------------------

class _Record:
    """Stand-in for DeepSpeed objects pickled as plain attribute bags (loss scalers, fragment addresses)."""


_ZeroStage = enum.IntEnum("_ZeroStage", {"disabled": 0, "optimizer_states": 1, "gradients": 2, "weights": 3})


def _numpy_globals() -> list:
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    found = [(core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
             (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),  # saved under numpy 1.x
             np.ndarray, np.dtype]
    if hasattr(np, "dtypes"):
        found.append(np.dtypes.UInt32DType)  # MT19937 keys (numpy >= 1.25 may pickle the dtype class)
    return found


def safe_globals() -> list:
    """The non-tensor objects real training saves pickle, all plain data (DeepSpeed need not be installed)."""
    return [
        (_ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
        (_Record, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
        (_Record, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
        (_Record, "deepspeed.utils.tensor_fragment.fragment_address"),
        *_numpy_globals(),
    ]


# --- integrity --------------------------------------------------------------------------------------------------

def _damaged(path, why: str) -> CogtuneError:
    return CogtuneError(f"{display_path(path)} is damaged or incomplete ({why}): copy it again from where it was "
                        "saved")


class _Slice(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + length) of an open file (a DCP item's embedded zip)."""

    def __init__(self, f, start: int, length: int):
        super().__init__()
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._length - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got


def _check_zip(source, where) -> None:
    """Every member of the zip archive `source` (a path or seekable file) read through, its CRC-32 compared."""
    try:
        with zipfile.ZipFile(source) as z:
            for info in z.infolist():
                with z.open(info) as member:
                    while member.read(_CHUNK):
                        pass
    except zipfile.BadZipFile as e:
        raise _damaged(where, bounded(str(e) or "not a zip archive", 200)) from None
    except (EOFError, ValueError, NotImplementedError, zipfile.LargeZipFile, zlib.error) as e:
        raise _damaged(where, bounded(f"{type(e).__name__}: {e}", 200)) from None
    except OSError as e:
        raise CogtuneError(os_error_text(e, "reading the checkpoint")) from None


_verified: set[tuple] = set()


def verify_file(path: Path) -> str:
    """'zip' (a torch.save archive whose CRCs all match) or 'legacy' (a pre-1.6 torch file: no checksums to check)."""
    path = Path(path)
    try:
        st = path.stat()
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if key in _verified:
            return "zip"
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CogtuneError(os_error_text(e, "reading the checkpoint")) from None
    if not head:
        raise _damaged(path, "the file is empty")
    if head.startswith(b"PK\x03\x04"):
        _check_zip(path, path)
        _verified.add(key)
        return "zip"
    if head[:1] == b"\x80":  # a pickle stream: torch's legacy format starts with one
        return "legacy"
    raise _damaged(path, f"not a PyTorch checkpoint: it starts with {bounded(head)}")


# --- loading ----------------------------------------------------------------------------------------------------

def _refuse_globals(path, names, item: str = "") -> CogtuneError:
    listed = ", ".join(sorted(names)[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return CogtuneError(f"{display_path(path)}{item} pickles {bounded(listed, 300)}, which is neither a tensor nor "
                        f"known-harmless training state: unpickling it could run code; {CONSENT}")


def _unsafe_warning(path, names) -> None:
    if names:
        log.warning("%s: loading it in full (%s): it pickles %s, code that runs as it loads",
                    display_path(path), FLAG, ", ".join(sorted(names)[:5]))


def load_checkpoint_file(path: str | Path, *, unsafe: bool | None = None, mmap: bool = True) -> Any:
    """torch.load `path` on the CPU after checking its CRCs, weights-only with the allow-list, memory-mapped (zip
    files). `unsafe`: load anything (trusted files only); None follows `allow_unsafe`. Any problem is one line."""
    import torch  # not at module import: `cogtune --help` needs none of it
    path = Path(path)
    unsafe = _unsafe if unsafe is None else unsafe
    kind = verify_file(path)
    with torch.serialization.safe_globals(safe_globals()):
        if kind == "zip":
            try:
                bad = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception as e:  # noqa: BLE001 - a damaged data.pkl: whatever the disassembler raises
                raise _damaged(path, bounded(f"{type(e).__name__}: {e}", 200)) from None
            if bad and not unsafe:
                raise _refuse_globals(path, bad)
            if unsafe:
                _unsafe_warning(path, bad)
        try:
            return torch.load(path, map_location="cpu", weights_only=not unsafe, mmap=mmap and kind == "zip")
        except pickle.UnpicklingError as e:
            raise _refusal(e, path) from None
        except OSError as e:
            raise CogtuneError(os_error_text(e, "reading the checkpoint")) from None
        except ModuleNotFoundError as e:  # unsafe loads only: the pickle names a package that is not installed
            raise CogtuneError(f"{display_path(path)} pickles objects of the module {e.name}, which is not installed: "
                               f"pip install {(e.name or '?').split('.')[0]}") from None
        except Exception as e:  # noqa: BLE001 - torch's reader on bytes it cannot parse, or an unsafe pickle's raise
            raise _damaged(path, bounded(_first_line(e), 200)) from None


def _refusal(e: Exception, path, item: str = "") -> CogtuneError:
    """A weights-only unpickler's refusal of a global, or else the bytes were not a readable pickle."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
    if found:
        return _refuse_globals(path, [found.group(1)], item)
    return _damaged(f"{display_path(path)}{item}", bounded(_first_line(e), 200))


def _first_line(e: BaseException) -> str:
    """The telling line of an exception's text (torch's weights-only errors wrap it in paragraphs of advice)."""
    paragraphs = [p.strip() for p in str(e).split("\n\n") if p.strip()]
    telling = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation",
                                                          "("))] or paragraphs
    return f"{type(e).__name__}: {telling[0].splitlines()[0]}" if telling else type(e).__name__


def check_folder(folder: str | Path, *, unsafe: bool | None = None) -> None:
    """Every pickle a resume will load from `folder` (accelerate's and DeepSpeed's files, a DCP `sharded/`): intact,
    and holding nothing but tensors and the allow-list. accelerate loads weights-only with its own list, but skips
    RNG states it cannot load in silence, and DeepSpeed loads its files with weights_only=False."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            load_checkpoint_file(path, unsafe=unsafe)
        elif path.name == ".metadata" and path.is_file():
            check_dcp(path.parent, unsafe=unsafe)


# --- torch.distributed.checkpoint ---------------------------------------------------------------------------------

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` (a plain pickle) holding only its own dataclasses, sizes, dtypes and paths."""

    def find_class(self, module: str, name: str):
        import torch  # not at module import: `cogtune --help` needs none of it
        import importlib

        allowed = name in _DCP_CLASSES.get(module, ())
        if module == "torch" and name.isidentifier() and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")
        return getattr(importlib.import_module(module), name)


def read_dcp_metadata(folder: str | Path, *, unsafe: bool | None = None):
    path = Path(folder) / ".metadata"
    unsafe = _unsafe if unsafe is None else unsafe
    try:
        with open(path, "rb") as f:
            if unsafe:
                return pickle.load(f)
            return _MetadataUnpickler(f).load()
    except OSError as e:
        raise CogtuneError(os_error_text(e, "reading the checkpoint")) from None
    except pickle.UnpicklingError as e:
        raise _refusal(e, path) from None
    except Exception as e:  # noqa: BLE001 - truncated or garbled pickles raise anything (EOFError, KeyError, ...)
        raise _damaged(path, bounded(_first_line(e), 200)) from None


def check_dcp(folder: str | Path, *, unsafe: bool | None = None, only: str | None = None) -> Any:
    """Verify a DCP folder (every item's CRCs; non-tensor items weights-only with the allow-list) and return its
    metadata. `only`: check just the items whose key starts with it (what a converter reads)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = Path(folder)
    unsafe = _unsafe if unsafe is None else unsafe
    meta = read_dcp_metadata(folder, unsafe=unsafe)
    storage, tensors = getattr(meta, "storage_data", None), getattr(meta, "state_dict_metadata", None)
    if not isinstance(storage, dict) or not isinstance(tensors, dict):
        raise _damaged(folder / ".metadata", "it lists no storage")
    by_file: dict[str, list] = {}  # every item's place is checked (cheap); the CRCs of those `only` selects
    for index, info in storage.items():
        fqn = str(getattr(index, "fqn", ""))
        by_file.setdefault(str(getattr(info, "relative_path", "")), []).append((fqn, info))
    for name, items in sorted(by_file.items()):
        path = folder / name
        if not name or os.sep in name or name.startswith(".."):
            raise _damaged(folder / ".metadata", f"it names a file outside the folder: {bounded(name)}")
        try:
            size = path.stat().st_size
            f = open(path, "rb")
        except OSError as e:
            raise CogtuneError(os_error_text(e, "reading the checkpoint")) from None
        with f:
            for fqn, info in items:
                where = f"{display_path(path)} (item {bounded(fqn)})"
                start, length = getattr(info, "offset", None), getattr(info, "length", None)
                if not (isinstance(start, int) and isinstance(length, int)) or start < 0 or length < 0:
                    raise _damaged(where, "its place in the file is not recorded")
                if start + length > size:
                    raise _damaged(where, f"the file holds {size} bytes, the item ends at {start + length}")
                if only is not None and not fqn.startswith(only):
                    continue
                _check_zip(_Slice(f, start, length), where)
                if isinstance(tensors.get(fqn), BytesStorageMetadata):
                    _check_bytes_item(_Slice(f, start, length), path, fqn, unsafe)
    return meta


def _check_bytes_item(view, path: Path, fqn: str, unsafe: bool) -> None:
    import torch  # not at module import: `cogtune --help` needs none of it
    data = io.BytesIO(view.read())  # non-tensor state (optimizer param groups): small
    with torch.serialization.safe_globals(safe_globals()):
        bad = torch.serialization.get_unsafe_globals_in_checkpoint(data)
        if bad and not unsafe:
            raise _refuse_globals(path, bad, f" (item {bounded(fqn)})")
        if not unsafe:
            data.seek(0)
            try:
                torch.load(data, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - refused globals, or bytes torch cannot parse
                raise _refusal(e, path, f" (item {bounded(fqn)})") from None


def dcp_reader(folder: str | Path, *, unsafe: bool | None = None):
    """A DCP FileSystemReader whose metadata comes through the restricted unpickler (DCP's own uses pickle.load)."""
    from torch.distributed.checkpoint import FileSystemReader

    unsafe = _unsafe if unsafe is None else unsafe

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            meta = read_dcp_metadata(folder, unsafe=unsafe)
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return SafeReader(str(folder))
