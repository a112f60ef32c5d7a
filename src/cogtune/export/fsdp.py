"""Convert an FSDP2 checkpoint of a full fine-tune (`checkpoint-N/sharded/`, torch.distributed.checkpoint files, one
per rank) into a diffusers transformer folder, without a process group.

Tensors are read one at a time (each gathered from every rank's file by DCP's reader) and written straight to their
place in the output files, so peak memory is about the largest tensor. The optimizer state is never read.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from cogtune import pickles
from cogtune.errors import CogtuneError
from cogtune.export.shards import refuse_overlap
from cogtune.export.to_diffusers import base_transformer, fit_base, name_prefix, refuse_lora, write_transformer

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
                 overwrite: bool = False, quiet: bool = False, unsafe_pickle: bool | None = None) -> Path:
    """Write the weights of an FSDP2 checkpoint as a diffusers transformer folder at `out_dir` (config from
    `base_model_dir`; exactly the base model's keys and shapes). Returns `out_dir`. `unsafe_pickle`: read its
    `.metadata` with plain pickle (None: as `pickles.allow_unsafe` set it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    refuse_overlap(out_dir, inside_ok=True, CHECKPOINT=checkpoint, **{"--base": base_model_dir})
    folder = locate_sharded(checkpoint)
    with pickles.trusting(unsafe_pickle):
        meta = pickles.check_dcp(folder, only=MODEL).state_dict_metadata  # the model's items' CRCs; no code run
        reader = pickles.dcp_reader(folder)
    stored = {k[len(MODEL):]: m for k, m in meta.items() if k.startswith(MODEL) and isinstance(m, TensorStorageMetadata)}
    if not stored:
        raise CogtuneError(f"{folder} holds no model weights (no '{MODEL}*' tensors)")
    refuse_lora(stored, folder, "convert fsdp")
    config_path, expected = base_transformer(base_model_dir)
    prefix = name_prefix(list(stored), expected)
    config, expected = fit_base({n[len(prefix):]: tuple(m.size) for n, m in stored.items()}, config_path, expected,
                                folder)

    def fill(writer) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # single process: intended
            for name, m in stored.items():
                tensor = torch.empty(tuple(m.size), dtype=m.properties.dtype)
                dcp.load({"model": {name: tensor}}, storage_reader=reader, no_dist=True)
                writer.add(name[len(prefix):], tensor)

    what = None if quiet else f"FSDP2 checkpoint {folder}"
    return write_transformer(out_dir, config_path, expected, dtype, max_shard_size, overwrite, fill, what, config)


