"""Folders `cogtune ui` serves in its tests: tiny T2V and I2V pipelines and two real LoRA runs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ui_folders(tmp_path_factory):
    """(models dir with t2v/ and i2v/, loras dir with run1/lora/ and run2/lora/ trained-shape LoRAs of t2v)."""
    from cogtune.models import write_tiny_pipeline
    from helpers.lora import make_lora

    root = tmp_path_factory.mktemp("ui-folders")
    models, loras = root / "models", root / "loras"
    write_tiny_pipeline(models / "t2v", "cogvideox-5b", seed=0)
    write_tiny_pipeline(models / "i2v", "cogvideox-5b-i2v", seed=0)
    for i in (1, 2):
        make_lora(models / "t2v", loras / f"run{i}" / "lora", seed=i)
    return models, loras
