"""Wan 2.1 T2V as a user meets it, through the real CLI: tiny model → LoRA → generate → merge; what is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

VARIANT = "wan2.1-t2v-1.3b"


def cogtune(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cogtune", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_data):
    root = tmp_path_factory.mktemp("wan")
    assert cogtune("tiny", root / "model", "--variant", VARIANT).returncode == 0
    (root / "run.yaml").write_text(json.dumps({
        "model": {"path": str(root / "model")}, "output_dir": str(root / "run"), "max_steps": 3,
        "data": {"root": str(synth_data), "frames": 9, "height": 32, "width": 48}, "mixed_precision": "no",
        "lora": {"rank": 4, "alpha": 8}, "optimizer": {"lr": 0.01}}))
    r = cogtune("train", root / "run.yaml")
    assert r.returncode == 0, r.stderr[-2000:]
    return root


def test_the_lora_generates_and_merges(trained):
    from safetensors.torch import load_file

    lora = trained / "run" / "lora" / "pytorch_lora_weights.safetensors"
    keys = load_file(str(lora))
    assert keys and all(k.startswith("transformer.blocks.") for k in keys)  # diffusers' Wan names
    r = cogtune("generate", "--model", trained / "model", "--lora", f"{lora.parent}:0.8", "--prompt", "a red circle",
                "--steps", 2, "--out", trained / "v.mp4")
    assert r.returncode == 0 and (trained / "v.mp4").stat().st_size > 0, r.stderr[-2000:]
    r = cogtune("lora", "merge", "--model", trained / "model", "--lora", lora.parent, trained / "merged")
    assert r.returncode == 0, r.stderr[-2000:]
    from diffusers import WanTransformer3DModel

    merged = WanTransformer3DModel.from_pretrained(str(trained / "merged"))
    base = WanTransformer3DModel.from_pretrained(str(trained / "model" / "transformer"))
    delta = max((a - b).abs().max().item() for a, b in zip(merged.state_dict().values(), base.state_dict().values()))
    assert delta > 0  # the adapter was fused in (its round trip is proven in test_conformance)
    assert torch.isfinite(torch.cat([p.flatten() for p in merged.parameters()])).all()


def test_what_wan_cannot_do_yet_is_one_line(trained):
    lora = trained / "run" / "lora"
    assert sorted(p.name for p in lora.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]  # no ComfyUI copy
    r = cogtune("lora", "convert", lora, trained / "comfy", "--to", "comfyui")
    assert r.returncode == 2 and "ComfyUI" in r.stderr and "Traceback" not in r.stderr
    assert not (trained / "comfy").exists()
    r = cogtune("plan", trained / "run.yaml")  # (a frame count off 4N+1: test_conformance)
    assert r.returncode == 2 and "no memory profile" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cogvideox_options_on_a_wan_model_are_refused_not_ignored(trained):
    r = cogtune("train", trained / "run.yaml", "i2v.image_dropout=0.2", "overwrite=true")
    assert r.returncode == 2 and "i2v" in r.stderr and "cogvideox" in r.stderr, r.stderr


def test_a_cogvideox_variant_on_a_wan_folder_is_refused(trained):
    r = cogtune("train", trained / "run.yaml", "model.variant=cogvideox-5b", "overwrite=true")
    assert r.returncode == 2 and "wan" in r.stderr and "model.variant" in r.stderr, r.stderr
