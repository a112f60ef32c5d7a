"""Gather a SwissArmyTransformer ZeRO-3 save into one full state dict.

Under ZeRO stage 3 SAT (sat/training/model_io.py, `save_ds_checkpoint_no_optim`) does not call DeepSpeed's
`_save_checkpoint`: every saving rank writes `<save>/<iteration>/z3_rank_RR_model_states.pt` (RR: its global rank,
two digits) holding `{'module': zero3_state_dict(engine)}` - the engine's state-dict names (`module.` + the model's
names), each parameter as its own ZeRO-3 partition (`param.ds_tensor`: flat, ceil(numel / world) elements, the last
rank's zero-padded) with the full shape attached as the tensor attribute `ds_shape`, and each persistent buffer whole.
No optimizer state is written, so the weights are those partitions, in the training dtype.

The partition arithmetic is DeepSpeed's ZeRO-3 one, shared with `cogtune convert zero` (`zero._zero3_slices`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .. import pickles
from ..errors import CogtuneError
from .zero import _zero3_slices

Z3_FILE = re.compile(r"^z3_rank_(\d+)_model_states\.pt$")
ENGINE_PREFIX = "module."  # zero3_state_dict is called on the DeepSpeed engine, which holds the model as `module`


def z3_files(folder: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in folder.iterdir() if (m := Z3_FILE.match(p.name))} if folder.is_dir() else {}


def _module(path: Path, unsafe: bool | None) -> dict[str, torch.Tensor]:
    saved = pickles.load_checkpoint_file(path, unsafe=unsafe)
    module = saved.get("module") if isinstance(saved, dict) else None
    if not isinstance(module, dict):
        raise CogtuneError(f"{path} has no `module` dict: not a SAT ZeRO-3 save")
    return {k.removeprefix(ENGINE_PREFIX): v for k, v in module.items() if isinstance(v, torch.Tensor)}


def _share(part: int, numel: int) -> str:
    """Which world sizes give a partition of `part` of `numel` elements (for the refusal)."""
    if part <= 0 or part > numel:
        return "no"
    lo = math.ceil(numel / part)  # ceil(numel / w) == part  <=>  numel / part <= w < numel / (part - 1)
    if part == 1:
        return f"{lo} or more"
    hi = math.ceil(numel / (part - 1)) - 1
    return f"{lo}" if lo >= hi else f"{lo}-{hi}"


def gather_z3(folder: Path, unsafe: bool | None = None) -> dict[str, torch.Tensor]:
    """The full tensors of the `z3_rank_*` files in `folder` (one rank's file loaded at a time)."""
    files = z3_files(folder)
    world = len(files)
    if sorted(files) != list(range(world)):
        missing = sorted(set(range(max(files) + 1)) - set(files))
        raise CogtuneError(f"{folder}: z3_rank files for ranks {', '.join(map(str, missing))} are missing (found "
                           f"{', '.join(map(str, sorted(files)))}): copy every z3_rank_*_model_states.pt of the save")
    shapes: dict[str, tuple[int, ...]] = {}
    full: dict[str, torch.Tensor] = {}
    for rank in range(world):
        path = files[rank]
        module = _module(path, unsafe)
        if rank == 0:
            shapes = {k: tuple(v.ds_shape) if hasattr(v, "ds_shape") else None for k, v in module.items()}
        elif set(module) != set(shapes):
            odd = sorted(set(module) ^ set(shapes))[0]
            raise CogtuneError(f"{path} and {files[0].name} hold different tensors ({odd}): files of different "
                               "saves are mixed")
        for name, tensor in module.items():
            shape = shapes[name]
            if shape is None:  # a buffer: whole on every rank
                full.setdefault(name, tensor.clone())
                continue
            if tuple(getattr(tensor, "ds_shape", ())) != shape:
                raise CogtuneError(f"{path}: {name} has the full shape {tuple(getattr(tensor, 'ds_shape', ()))}, "
                                   f"{files[0].name} says {shape}: files of different saves are mixed")
            numel, part = math.prod(shape), tensor.numel()
            if part != math.ceil(numel / world):
                raise CogtuneError(
                    f"{path}: {name} holds {part} of its {numel} elements, a share for {_share(part, numel)} ranks, "
                    f"but {folder} has {world} z3_rank file(s): ranks are missing or extra (SAT writes only "
                    "data-parallel rank 0's file; a complete save has one file per rank)")
            if rank == 0:
                full[name] = torch.empty(numel, dtype=tensor.dtype)
            for _, start, values in _zero3_slices([tensor.reshape(-1)], {name: shape}, rank, world, path):
                full[name][start:start + values.numel()] = values
        del module
    return {k: (v.view(shapes[k]) if shapes[k] is not None else v) for k, v in full.items()}
