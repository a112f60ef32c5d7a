"""The rows an offline W&B run wrote, read back from its `run-<id>.wandb` file.

The file is a LevelDB-style log (32 KiB blocks; each chunk: CRC32 4 bytes, length 2, type 1 = full/first/middle/last)
after a 7-byte `:W&B` header; each record is a `wandb_internal_pb2.Record` protobuf, as W&B documents for `wandb sync`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    chunks, pending, off = [], b"", HEADER
    while off + 7 <= len(data):
        left = BLOCK - off % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            off += left
            continue
        _, length, kind = struct.unpack("<IHB", data[off:off + 7])
        if length == 0 and kind == 0:
            off += left
            continue
        body, off = data[off + 7:off + 7 + length], off + 7 + length
        if kind == 1:
            chunks.append(body)
        elif kind == 2:
            pending = body
        elif kind == 3:
            pending += body
        elif kind == 4:
            chunks.append(pending + body)
    out = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        out.append(record)
    return out


def history(path: Path) -> list[dict]:
    """Each `wandb.log` row as {key: value} (values decoded from JSON; nested keys joined with '/')."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows
