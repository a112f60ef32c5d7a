"""check_lora_compat: a LoRA that does not fit the model is one clear line naming what does not fit."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cogtune.errors import CogtuneError
from cogtune.export.lora_formats import read_lora, write_comfyui
from cogtune.export.lora_compat import check_lora_compat
from helpers.lora import make_lora


@pytest.fixture(scope="module")
def lora_5b(tiny_model, tmp_path_factory):
    model = tiny_model("cogvideox-5b")
    path, _ = make_lora(model, tmp_path_factory.mktemp("compat"), rank=4, alpha=4)
    return model, path


def _error(lora, model) -> str:
    with pytest.raises(CogtuneError) as info:
        check_lora_compat(lora, model)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message
    return message


def _rewrite(path, out, edit):
    """Save `path`'s tensors after `edit(tensors)`, keeping its metadata."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_fitting_lora_passes_in_both_formats(lora_5b, tmp_path):
    model, path = lora_5b
    assert check_lora_compat(path, model) is None
    assert check_lora_compat(path.parent, model / "transformer") is None  # folder + bare transformer folder
    assert check_lora_compat(write_comfyui(read_lora(path), tmp_path / "c.safetensors"), model) is None


def test_wrong_variant(lora_5b, tiny_model):
    _, path = lora_5b
    other = tiny_model("cogvideox1.5-5b")
    message = _error(path, other)
    assert "trained on cogvideox-5b" in message and "is cogvideox1.5-5b" in message


def test_truncated_file(lora_5b, tmp_path):
    model, path = lora_5b
    data = path.read_bytes()
    for cut in (len(data) // 2, 40):  # inside the tensor data, inside the header
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        message = _error(broken, model)
        assert str(broken) in message and "damaged or not a safetensors file" in message


def test_unknown_key(lora_5b, tmp_path):
    model, path = lora_5b

    def add_foo(tensors):
        tensors["transformer.foo.lora_A.weight"] = torch.zeros(4, 32)
        tensors["transformer.foo.lora_B.weight"] = torch.zeros(32, 4)

    message = _error(_rewrite(path, tmp_path / "foo.safetensors", add_foo), model)
    assert message.startswith("LoRA key transformer.foo.lora_A.weight matches no module of the model")


def test_too_many_blocks(lora_5b, tmp_path):
    model, path = lora_5b

    def add_block_3(tensors):
        for k in [k for k in tensors if k.startswith("transformer.transformer_blocks.0.")]:
            tensors[k.replace("blocks.0.", "blocks.3.")] = tensors[k].clone()

    message = _error(_rewrite(path, tmp_path / "deep.safetensors", add_block_3), model)
    assert "has 4 blocks" in message and "has 2" in message


def test_wrong_width(lora_5b, tmp_path):
    model, path = lora_5b
    key = "transformer.transformer_blocks.1.attn1.to_k.lora_A.weight"

    def widen(tensors):
        tensors[key] = torch.zeros(4, 48)

    message = _error(_rewrite(path, tmp_path / "wide.safetensors", widen), model)
    assert key in message and "in-features 48" in message and "takes 32" in message


def test_non_lora_module_and_half_pairs(lora_5b, tmp_path):
    model, path = lora_5b
    sd = dict(read_lora(path).state_dict)
    sd["transformer.norm_final.lora_A.weight"] = torch.zeros(4, 32)
    sd["transformer.norm_final.lora_B.weight"] = torch.zeros(32, 4)
    assert "targets a LayerNorm" in _error(sd, model)
    sd = dict(read_lora(path).state_dict)
    del sd["transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"]
    assert "lora_A only" in _error(sd, model)


def test_metadata_rank_that_is_not_the_weights_rank(lora_5b, tmp_path):
    """Metadata r=16 over rank-4 weights: stock diffusers fails with a shape traceback; we name the module."""
    import json

    from diffusers import CogVideoXPipeline

    model, path = lora_5b
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    config["transformer.r"] = 16
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata={**metadata, "lora_adapter_metadata": json.dumps(config)})
    with pytest.raises(RuntimeError, match="size mismatch"):  # the file really does not load as it is
        CogVideoXPipeline.from_pretrained(str(model)).load_lora_weights(str(tmp_path), weight_name=bad.name)
    message = _error(bad, model)
    assert "rank 16" in message and "rank 4" in message and "bad.safetensors" in message
