"""`cogtune convert fsdp` refuses what it cannot convert, in one line (the conversion itself is checked against a
real 2-process FSDP2 run in test_distributed.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cogtune.errors import CogtuneError
from cogtune.export.fsdp import convert_fsdp


def test_not_a_checkpoint(tmp_path, tiny_model):
    with pytest.raises(CogtuneError, match="not an FSDP2 checkpoint"):
        convert_fsdp(tmp_path, tmp_path / "out", tiny_model("cogvideox-2b"))


def test_cli_one_line(tmp_path, tiny_model):
    proc = subprocess.run([sys.executable, "-m", "cogtune", "convert", "fsdp", str(tmp_path), str(tmp_path / "out"),
                           "--base", str(tiny_model("cogvideox-2b"))], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("cogtune: error:") and "not an FSDP2 checkpoint" in lines[-1]
    assert not (tmp_path / "out").exists()
