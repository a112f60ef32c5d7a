"""Shared fixtures: tiny pipelines of the real diffusers classes and real H.264 datasets, built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(variant) -> path of a tiny random-weight pipeline folder (built once per variant)."""
    from cogtune.models import write_tiny_pipeline

    made: dict[str, object] = {}

    def get(variant: str = "cogvideox-5b"):
        if variant not in made:
            made[variant] = write_tiny_pipeline(tmp_path_factory.mktemp(variant) / "model", variant, seed=0)
        return made[variant]

    return get


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    from cogtune.data.synth import write_synth_dataset

    root = tmp_path_factory.mktemp("synth") / "data"
    write_synth_dataset(root, clips=6, seed=0)
    return root


@pytest.fixture(scope="session")
def zero_checkpoint(tiny_model, tmp_path_factory):
    """zero_checkpoint(case) -> (checkpoint-2 folder, reference fp32 weights, tiny pipeline folder) of a real
    DeepSpeed run on 2 CPU ranks (cases: tests/helpers/zero.py), one run each per session. Read-only: copy to damage."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from helpers.zero import CASES, run_zero

    made: dict = {}

    def get(case: str):
        if case not in made:
            model = tiny_model(CASES[case][2])
            ckpt, ref = run_zero(case, model, tmp_path_factory.mktemp(case))
            made[case] = (ckpt, load_file(str(ref)), model)
        return made[case]

    return get


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


def tiny_train_config(model, data, out, **overrides):
    """A TrainConfig for the tiny model, sized like the quickstart; keyword args override dotted keys (a__b → a.b)."""
    from cogtune.config import load_config
    from cogtune.models import resolve_variant

    facts = resolve_variant(model)  # a tiny model is native at its own size
    tree = {
        "model": {"path": str(model)},
        "data": {"root": str(data), "frames": facts.native_frames, "height": facts.native_height,
                 "width": facts.native_width},
        "output_dir": str(out),
        "max_steps": 4,
        "mixed_precision": "no",
        "lora": {"rank": 8, "alpha": 8},
        "optimizer": {"lr": 1e-3},
        "validation": {"heldout_loss": False},
    }
    pairs = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return load_config(None, pairs, base=tree)
