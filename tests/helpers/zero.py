"""Real DeepSpeed ZeRO checkpoints of tiny models (tests/helpers/zero_train.py on 2 CPU ranks), one run per case."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

CASES = {  # name: (ZeRO stage, mixed precision, variant)
    "zero2-bf16": (2, "bf16", "cogvideox-5b"),
    "zero3-bf16-i2v": (3, "bf16", "cogvideox-5b-i2v"),  # its learned positional table is a persistent buffer
    "zero1-fp32": (1, "no", "cogvideox-5b"),
}
SCRIPT = Path(__file__).parent / "zero_train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_zero(case: str, model: Path, root: Path) -> tuple[Path, Path]:
    """(checkpoint-2 folder, reference.safetensors with DeepSpeed's own fp32 master weights)."""
    stage, precision, _ = CASES[case]
    ckpt, ref = root / "run" / "checkpoint-2", root / "reference.safetensors"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(SCRIPT), "--model", str(model), "--out", str(ckpt), "--ref",
           str(ref), "--stage", str(stage), "--precision", precision]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ckpt, ref
