"""Convert a DeepSpeed ZeRO-1/2/3 checkpoint into a diffusers transformer folder, streaming.

The fp32 master weights live in the optimizer-state files, one per data-parallel rank:
- ZeRO-1/2 (`single_partition_of_fp32_groups`): per param group, one flat fp32 vector split evenly across ranks;
  the group's params lie in it in `param_shapes` order (plus `param_alignment_paddings`), spanning rank boundaries.
- ZeRO-3 (`fp32_flat_groups`): every param is split into ceil(numel / world) elements per rank (the last one
  padded); each rank's groups, concatenated, hold its piece of every param in `param_shapes` order.
Frozen params (`frozen_param_shapes` / `frozen_param_fragments`) and buffers (`buffer_names`, values in `module`) are
in the model-state files: whole in ZeRO-1/2's single `mp_rank_00_model_states.pt`, split like ZeRO-3 params in its
per-rank `zero_pp_rank_R_mp_rank_00_model_states.pt`.

One rank's files are loaded at a time (memory-mapped: Adam moments are never read) and each piece is written
straight to its place in the output files (`ShardWriter`): peak memory is about one rank's fp32 partition.
DeepSpeed need not be installed: its few pickled classes load through weights-only unpickling with stand-ins
(`cogtune.pickles`, which also checks every file's CRCs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cogtune import pickles
from cogtune.errors import CogtuneError
from cogtune.export.shards import refuse_overlap
from cogtune.export.to_diffusers import base_transformer, fit_base, name_prefix, refuse_lora, write_transformer

_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
TRUST_NOTE = (f"DeepSpeed checkpoints are Python pickles: they load weights-only (tensors and DeepSpeed's own plain "
              f"state); {pickles.FLAG} loads anything else, for files you trust.")


# --- reading DeepSpeed's pickles without DeepSpeed ------------------------------------------------------------------

def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """A DeepSpeed file, CRC-checked, memory-mapped, weights-only (DeepSpeed's few classes load as stand-ins)."""
    state = pickles.load_checkpoint_file(path)
    if not isinstance(state, dict):
        raise CogtuneError(f"{path} holds a {type(state).__name__}, not a DeepSpeed state dict: not a ZeRO checkpoint")
    return state


# --- finding the checkpoint ---------------------------------------------------------------------------------------

def _optim_files(folder: Path) -> dict[int, Path]:
    found = {p: m for p in folder.iterdir() if (m := _OPTIM_FILE.match(p.name))}
    for p, m in found.items():
        if int(m.group(2)) != 0:
            raise CogtuneError(f"{p} comes from a tensor/pipeline-parallel run (mp_rank {m.group(2)}): "
                               "cogtune converts data-parallel ZeRO checkpoints only")
    return {int(m.group(1)): p for p, m in found.items()}


def locate_tag_folder(checkpoint_dir: str | Path) -> Path:
    """The folder holding the rank files: `checkpoint_dir` itself, or the tag its `latest` file names.

    Accepts DeepSpeed's `save_checkpoint` folder (`latest` + `global_stepN/`), accelerate's `save_state` folder
    (`checkpoint-N/` with `latest` + `pytorch_model/`, as the official CogVideoX trainer writes) or the tag folder.
    """
    root = Path(checkpoint_dir)
    if root.is_file():
        raise CogtuneError(f"{root} is a file: pass the checkpoint folder (the one holding 'latest' or the "
                           "*_optim_states.pt files)")
    if not root.is_dir():
        raise CogtuneError(f"checkpoint folder {root} does not exist: pass the folder that holds 'latest'")
    if _optim_files(root):
        return root
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not tag or not (root / tag).is_dir():
            raise CogtuneError(f"{latest} names the tag folder {tag!r}, but {root / tag} does not exist: "
                               "the checkpoint is incomplete; copy the whole folder")
        return root / tag
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and _optim_files(p))
    if tags:
        raise CogtuneError(f"no 'latest' file in {root} to say which tag folder to convert (found: {', '.join(tags)}): "
                           f"pass {root / tags[-1]} itself, or restore {latest}")
    runs = sorted((p for p in root.glob("checkpoint-*") if p.is_dir()),
                  key=lambda p: int("0" + re.sub(r"\D", "", p.name)))
    if runs:
        raise CogtuneError(f"{root} is a training output folder: pass one of its checkpoints, e.g. {runs[-1]}")
    raise CogtuneError(f"{root} is not a DeepSpeed checkpoint: no 'latest' file and no *_optim_states.pt files")


# --- the checkpoint's layout ----------------------------------------------------------------------------------------

@dataclass
class ZeroLayout:
    folder: Path
    stage: int
    world: int
    optim_files: list[Path]
    model_files: list[Path]  # one for ZeRO-1/2, one per rank for ZeRO-3
    group_shapes: list[dict[str, tuple[int, ...]]]  # trainable params per param group, in flat order
    group_paddings: list[list[int]]  # ZeRO-1/2 alignment padding after each param
    frozen_shapes: dict[str, tuple[int, ...]]
    buffer_shapes: dict[str, tuple[int, ...]]
    shared: dict[str, str] = field(default_factory=dict)  # alias -> the param it shares storage with

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the checkpoint holds (trainable, frozen, buffers, shared aliases) with its shape."""
        out = {k: s for group in self.group_shapes for k, s in group.items()}
        out.update(self.frozen_shapes)
        out.update(self.buffer_shapes)
        out.update({alias: out[src] for alias, src in self.shared.items() if src in out})
        return out


def _shape(s: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in s)


def read_layout(tag_folder: Path) -> ZeroLayout:
    optim = _optim_files(tag_folder)
    if not optim:
        raise CogtuneError(f"{tag_folder} holds no *_optim_states.pt files: the fp32 weights live there; "
                           "was the checkpoint saved without its optimizer states?")
    first = load_checkpoint_file(optim[min(optim)])
    osd = first.get("optimizer_state_dict")
    if not isinstance(osd, dict) or not ({"zero_stage", "single_partition_of_fp32_groups"} & set(osd)):
        raise CogtuneError(f"{optim[min(optim)]} is not a ZeRO optimizer state (no zero_stage): not a ZeRO checkpoint")
    stage = int(osd.get("zero_stage", 1))  # DeepSpeed's bf16 ZeRO-1 optimizer does not record its stage
    counts = osd.get("partition_count")
    counts = counts if isinstance(counts, list) else [counts]
    if len(set(counts)) != 1:
        raise CogtuneError(f"{tag_folder}: param groups have different partition counts {counts} (expert parallel?): "
                           "not supported")
    world = int(counts[0])
    missing = [r for r in range(world) if r not in optim]
    extra = [r for r in optim if r >= world]
    if missing or extra:
        raise CogtuneError(f"{tag_folder}: expected optimizer files for ranks 0..{world - 1} "
                           f"({world} data-parallel ranks), but rank(s) {', '.join(map(str, missing or extra))} "
                           f"{'are missing' if missing else 'are extra'}: copy every *_optim_states.pt of one save")
    if stage not in (1, 2, 3):
        raise CogtuneError(f"{tag_folder}: unknown ZeRO stage {stage}")
    model_files = ([tag_folder / "mp_rank_00_model_states.pt"] if stage < 3 else
                   [tag_folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)])
    absent = [p.name for p in model_files if not p.is_file()]
    if absent:
        raise CogtuneError(f"{tag_folder}: model state file(s) missing: {', '.join(absent)}: copy the whole tag folder")
    paddings = osd.get("param_alignment_paddings") if stage < 3 else None
    model = load_checkpoint_file(model_files[0])
    if "param_shapes" not in model or "buffer_names" not in model:
        raise CogtuneError(f"{model_files[0]} is not a DeepSpeed model state (no param_shapes)")
    groups = model["param_shapes"] if isinstance(model["param_shapes"], list) else [model["param_shapes"]]
    group_shapes = [{k: _shape(s) for k, s in g.items()} for g in groups]
    paddings = paddings if paddings is not None else [[0] * len(g) for g in group_shapes]
    frozen = {k: _shape(s) for k, s in (model.get("frozen_param_shapes") or {}).items()}
    shared = dict(model.get("shared_params") or {})
    module = model.get("module") or {}
    buffers = {k: _shape(module[k].shape) for k in model["buffer_names"] if k in module}
    if stage < 3 and not frozen:
        # ZeRO-1 records no frozen params; its `module` holds every tensor whole (in the training dtype)
        known = {k for g in group_shapes for k in g} | set(buffers) | set(shared)
        frozen = {k: _shape(t.shape) for k, t in module.items() if k not in known}
    return ZeroLayout(
        folder=tag_folder, stage=stage, world=world, optim_files=[optim[r] for r in range(world)],
        model_files=model_files, group_shapes=group_shapes, group_paddings=[list(p) for p in paddings],
        frozen_shapes=frozen, buffer_shapes=buffers, shared=shared)


# --- the streams of pieces: (checkpoint name, flat start, values) ---------------------------------------------------

Piece = tuple[str, int, torch.Tensor]


def _fp32_groups(path: Path, key: str) -> list[torch.Tensor]:
    groups = (load_checkpoint_file(path).get("optimizer_state_dict") or {}).get(key)
    if not isinstance(groups, (list, tuple)):
        raise CogtuneError(f"{path} has no {key}: files of different ZeRO stages or saves are mixed")
    return list(groups)


def _zero12_pieces(layout: ZeroLayout) -> Iterator[Piece]:
    for rank, path in enumerate(layout.optim_files):
        partitions = _fp32_groups(path, "single_partition_of_fp32_groups")
        if len(partitions) != len(layout.group_shapes):
            raise CogtuneError(f"{path}: {len(partitions)} param groups, but the model states list "
                               f"{len(layout.group_shapes)}: files from different saves are mixed")
        for flat, shapes, pads in zip(partitions, layout.group_shapes, layout.group_paddings):
            size = flat.numel()
            lo, hi = rank * size, (rank + 1) * size  # this rank's range of the group's flat vector
            offset = 0
            for (name, shape), pad in zip(shapes.items(), pads):
                numel = math.prod(shape)
                start, end = max(offset, lo), min(offset + numel, hi)
                if start < end:
                    yield name, start - offset, flat[start - lo:end - lo]
                offset += numel + pad
            align = 2 * layout.world  # DeepSpeed pads each group to a multiple of 2 x world (and alignment)
            if offset > size * layout.world or math.ceil(offset / align) != math.ceil(size * layout.world / align):
                raise CogtuneError(f"{path}: params need {offset} elements but the partitions hold "
                                   f"{size * layout.world}: the checkpoint layout is not understood")
        del partitions


def _zero3_slices(flats: list[torch.Tensor], shapes: dict[str, tuple[int, ...]], rank: int, world: int,
                  where: Path) -> Iterator[Piece]:
    """Rank `rank`'s pieces of ZeRO-3 partitioned tensors laid out back to back in `flats` (concatenated)."""
    bounds, total = [], 0
    for f in flats:
        bounds.append((total, f))
        total += f.numel()
    offset, group = 0, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part = math.ceil(numel / world)
        valid = min(part, numel - rank * part)
        if valid > 0:
            chunks, want, pos = [], valid, offset
            while want > 0:
                while bounds[group][0] + bounds[group][1].numel() <= pos:
                    group += 1
                base, flat = bounds[group]
                take = min(want, base + flat.numel() - pos)
                chunks.append(flat[pos - base:pos - base + take])
                pos, want = pos + take, want - take
            yield name, rank * part, chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        offset += part
    if offset != total:  # DeepSpeed pads only inside each param's last partition
        raise CogtuneError(f"{where}: params need {offset} elements per rank but it holds {total}: "
                           "the checkpoint layout is not understood")


def _zero3_pieces(layout: ZeroLayout) -> Iterator[Piece]:
    trainable = {k: s for group in layout.group_shapes for k, s in group.items()}
    for rank in range(layout.world):
        flats = _fp32_groups(layout.optim_files[rank], "fp32_flat_groups")
        yield from _zero3_slices(flats, trainable, rank, layout.world, layout.optim_files[rank])
        del flats
        if layout.frozen_shapes:
            fragments = load_checkpoint_file(layout.model_files[rank]).get("frozen_param_fragments") or {}
            for name, shape in layout.frozen_shapes.items():
                if name not in fragments:
                    raise CogtuneError(f"{layout.model_files[rank]} lacks the frozen param {name}")
                yield from _zero3_slices([fragments[name].reshape(-1)], {name: shape}, rank, layout.world,
                                         layout.model_files[rank])
            del fragments


def _model_state_pieces(layout: ZeroLayout) -> Iterator[Piece]:
    """Buffers (whole, from the first model file) and ZeRO-1/2 frozen params (whole)."""
    state = load_checkpoint_file(layout.model_files[0])
    module = state.get("module") or {}
    for name in layout.buffer_shapes:
        yield name, 0, module[name].reshape(-1)
    if layout.stage < 3:
        fragments = state.get("frozen_param_fragments") or module
        for name in layout.frozen_shapes:
            if name not in fragments:
                raise CogtuneError(f"{layout.model_files[0]} lacks the frozen param {name}")
            yield name, 0, fragments[name].reshape(-1)


# --- the converter --------------------------------------------------------------------------------------------------

def convert_zero(checkpoint_dir: str | Path, out_dir: str | Path, base_model_dir: str | Path,
                 dtype: str | torch.dtype | None = "fp32", max_shard_size: int | str = "5GB",
                 overwrite: bool = False, quiet: bool = False, unsafe_pickle: bool | None = None) -> Path:
    """Write the fp32 master weights of a ZeRO-1/2/3 checkpoint as a diffusers transformer folder at `out_dir`.

    `dtype`: output dtype of floating tensors ('fp32', 'bf16', 'fp16'; None = fp32, the master weights' own dtype;
    frozen params and buffers stored in 16 bits are upcast). The config is `base_model_dir`'s transformer config;
    the result must have exactly the base model's keys and shapes. Returns `out_dir`.
    `unsafe_pickle`: load objects beyond the allow-list (None: as `pickles.allow_unsafe` set it).
    """
    with pickles.trusting(unsafe_pickle):
        return _convert_zero(checkpoint_dir, out_dir, base_model_dir, dtype, max_shard_size, overwrite, quiet)


def _convert_zero(checkpoint_dir, out_dir, base_model_dir, dtype, max_shard_size, overwrite, quiet) -> Path:
    refuse_overlap(out_dir, inside_ok=True, CHECKPOINT=checkpoint_dir, **{"--base": base_model_dir})
    layout = read_layout(locate_tag_folder(checkpoint_dir))
    config_path, expected = base_transformer(base_model_dir)
    shapes = layout.shapes()
    refuse_lora(shapes, layout.folder, "convert zero")
    prefix = name_prefix(list(shapes), expected)
    targets = {n: [n[len(prefix):]] for n in shapes}  # checkpoint name -> output keys it is written to
    for alias, src in layout.shared.items():
        if src in targets:
            targets[src].append(targets.pop(alias)[0])
    config, expected = fit_base({n[len(prefix):]: s for n, s in shapes.items()}, config_path, expected, layout.folder)
    pieces = _zero12_pieces(layout) if layout.stage < 3 else _zero3_pieces(layout)

    def fill(writer) -> None:
        for stream in (_model_state_pieces(layout), pieces):
            for name, start, values in stream:
                for key in targets[name]:
                    writer.write(key, values, start)

    what = None if quiet else f"ZeRO-{layout.stage} checkpoint {layout.folder} ({layout.world} ranks)"
    return write_transformer(out_dir, config_path, expected, dtype, max_shard_size, overwrite, fill, what, config)


# --- the command ----------------------------------------------------------------------------------------------------

