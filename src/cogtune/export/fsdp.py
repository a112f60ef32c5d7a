"""Convert an FSDP2 checkpoint of a full fine-tune (`checkpoint-N/sharded/`, torch.distributed.checkpoint files, one
per rank) into a diffusers transformer folder, without a process group.

Tensors are read one at a time (each gathered from every rank's file by DCP's reader) and written straight to their
place in the output files, so peak memory is about the largest tensor. The optimizer state is never read.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from cogtune.errors import CogtuneError
from cogtune.export.shards import (CONFIG_NAME, ShardWriter, TensorSpec, resolve_dtype, staged_folder, target_dtype,
                                   verify_transformer_folder)
from cogtune.export.zero import _LORA_MARKERS, _check_fits, _name_prefix, base_transformer

MODEL = "model."  # cogtune saves {"model": ..., "optimizer": ...}; DCP flattens the nesting into dotted keys


def locate_sharded(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    for folder in (path / "sharded", path):
        if (folder / ".metadata").is_file():
            return folder
    raise CogtuneError(f"{path} is not an FSDP2 checkpoint: no sharded/.metadata (torch.distributed.checkpoint) in it; "
                       "pass a checkpoint-N folder of a distributed.strategy=fsdp2 run")


def convert_fsdp(checkpoint: str | Path, out_dir: str | Path, base_model_dir: str | Path,
                 dtype: str | torch.dtype | None = "fp32", max_shard_size: int | str = "5GB",
                 overwrite: bool = False, quiet: bool = False) -> Path:
    """Write the weights of an FSDP2 checkpoint as a diffusers transformer folder at `out_dir` (config from
    `base_model_dir`; exactly the base model's keys and shapes). Returns `out_dir`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = locate_sharded(checkpoint)
    reader = FileSystemReader(str(folder))
    meta = reader.read_metadata().state_dict_metadata
    stored = {k[len(MODEL):]: m for k, m in meta.items() if k.startswith(MODEL) and isinstance(m, TensorStorageMetadata)}
    if not stored:
        raise CogtuneError(f"{folder} holds no model weights (no '{MODEL}*' tensors)")
    lora = next((n for n in stored if any(m in n for m in _LORA_MARKERS)), None)
    if lora is not None:
        raise CogtuneError(f"{folder} is a LoRA training checkpoint ({lora}): convert fsdp exports full fine-tunes; "
                           "export the LoRA adapter instead")
    config_path, expected = base_transformer(base_model_dir)
    prefix = _name_prefix(list(stored), expected)
    _check_fits({n[len(prefix):]: tuple(m.size) for n, m in stored.items()}, expected, folder, config_path.parent)
    to = resolve_dtype(dtype) or torch.float32
    specs = {k: TensorSpec(spec.shape, target_dtype(spec.dtype, to)) for k, spec in expected.items()}
    with staged_folder(out_dir, overwrite) as tmp:
        (tmp / CONFIG_NAME).write_bytes(config_path.read_bytes())
        with ShardWriter(tmp, specs, max_shard_size) as writer, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # single process: intended
            for name, m in stored.items():
                tensor = torch.empty(tuple(m.size), dtype=m.properties.dtype)
                dcp.load({"model": {name: tensor}}, storage_reader=reader, no_dist=True)
                writer.add(name[len(prefix):], tensor)
        verify_transformer_folder(tmp, {k: s.shape for k, s in expected.items()})
        files = sorted(p.name for p in tmp.iterdir())
    if not quiet:
        params = sum(s.numel for s in specs.values())
        print(f"converted FSDP2 checkpoint {folder} -> {out_dir}: {len(specs)} tensors, {params:,} parameters, "
              f"{str(to).removeprefix('torch.')}; files:", *files, sep="\n  ")
    return Path(out_dir)


def _cmd_convert_fsdp(args) -> None:
    convert_fsdp(args.checkpoint, args.out, args.base, dtype=args.dtype, max_shard_size=args.max_shard_size,
                 overwrite=args.overwrite)


def register_cli(convert_subparsers) -> None:
    """Add `fsdp` to the `cogtune convert` subcommands."""
    p = convert_subparsers.add_parser(
        "fsdp", help="FSDP2 checkpoint (checkpoint-N/sharded/) -> diffusers transformer folder",
        description="Gather the weights of a cogtune FSDP2 full fine-tune checkpoint, one tensor at a time and "
                    "without a process group, and write them as a diffusers transformer folder (config.json + "
                    "safetensors, sharded past --max-shard-size).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint-N folder of an fsdp2 run (or its sharded/)")
    p.add_argument("out", metavar="OUT", help="output transformer folder (must be new or empty)")
    p.add_argument("--base", required=True, metavar="MODEL_DIR",
                   help="the model trained from: pipeline folder or its transformer/ folder (config and shapes)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="output dtype (default fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (atomically)")
    p.set_defaults(func=_cmd_convert_fsdp)
