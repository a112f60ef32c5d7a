"""diffusers <-> ComfyUI LoRA conversion on a real tiny CogVideoX-5B: names, bit-exact round trip, same effect.

Also holds the small helpers the other export tests use (`make_lora`, `transformer_inputs`, `run_transformer`).
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cogtune.cli import build_parser
from cogtune.errors import CogtuneError
from helpers.lora import make_lora, run_transformer, transformer_inputs
from cogtune.export.lora_formats import (
    WEIGHT_NAME, load_lora_any, load_lora_into_pipeline, read_lora, write_comfyui, write_diffusers,
)

# ComfyUI core's native CogVideoX (comfy/ldm/cogvideo/model.py) names, written out here independently of the code
# under test: diffusers module -> ComfyUI module.
NATIVE_BLOCK = {"attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.to_out.0": "attn_out",
                "ff.net.0.proj": "ff_proj", "ff.net.2": "ff_out", "norm1.linear": "norm1.linear",
                "norm2.linear": "norm2.linear"}
NATIVE_TOP = {"patch_embed.proj": "patch_embed.proj", "patch_embed.text_proj": "patch_embed.text_proj",
              "time_embedding.linear_1": "time_embedding_linear_1",
              "time_embedding.linear_2": "time_embedding_linear_2",
              "norm_out.linear": "norm_out.linear", "proj_out": "proj_out"}
WIDE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear", "proj_out",
                "time_embedding.linear_1", "patch_embed.proj"]


def native_name(module: str) -> str:
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    return f"blocks.{m.group(1)}.{NATIVE_BLOCK[m.group(2)]}" if m else NATIVE_TOP[module]


@pytest.fixture(scope="module")
def wide_lora(tiny_model, tmp_path_factory):
    model = tiny_model("cogvideox-5b")
    path, ref = make_lora(model, tmp_path_factory.mktemp("wide"), rank=4, alpha=2, targets=WIDE_TARGETS,
                          alpha_pattern={"proj_out": 8})
    return model, path, ref


def test_comfyui_keys_follow_native_naming(wide_lora, tmp_path):
    _, path, _ = wide_lora
    comfy = write_comfyui(read_lora(path), tmp_path / "c.safetensors")
    keys = list(load_file(str(comfy)))
    diffusers_modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in load_file(str(path))}
    expected = {f"diffusion_model.{native_name(m)}.{s}" for m in diffusers_modules
                for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(keys) == expected
    assert "diffusion_model.blocks.1.attn_out.lora_down.weight" in keys
    assert "diffusion_model.time_embedding_linear_1.alpha" in keys
    tensors = load_file(str(comfy))
    assert tensors["diffusion_model.proj_out.alpha"].item() == 8.0  # alpha_pattern survives, per module
    assert tensors["diffusion_model.blocks.0.q.alpha"].item() == 2.0


def test_round_trip_is_bit_exact(wide_lora, tmp_path):
    _, path, _ = wide_lora
    comfy = write_comfyui(read_lora(path), tmp_path / "c.safetensors")
    back = write_diffusers(read_lora(comfy), tmp_path / "back")
    assert back == tmp_path / "back" / WEIGHT_NAME
    a, b = load_file(str(path)), load_file(str(back))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with safe_open(str(path), "pt") as f1, safe_open(str(back), "pt") as f2:
        assert f1.metadata() == f2.metadata()  # same LoraConfig (alpha, patterns) and cogtune.* keys


def test_comfy_application_equals_diffusers_fuse(wide_lora, tmp_path):
    model, path, _ = wide_lora
    comfy = load_file(str(write_comfyui(read_lora(path), tmp_path / "c.safetensors")))
    base = CogVideoXTransformer3DModel.from_pretrained(str(model / "transformer")).state_dict()
    by_native = {native_name(m): m for m in {k.rsplit(".weight", 1)[0] for k in base if k.endswith(".weight")}
                 if re.fullmatch(r"transformer_blocks\.\d+\.(.+)", m) and m.split(".", 2)[2] in NATIVE_BLOCK
                 or m in NATIVE_TOP}
    expected = {}
    for key in comfy:
        if not key.endswith(".lora_down.weight"):
            continue
        native = key.removeprefix("diffusion_model.").removesuffix(".lora_down.weight")
        down, up = comfy[key], comfy[key.replace("lora_down", "lora_up")]
        alpha = comfy[key.replace("lora_down.weight", "alpha")].item()
        w = base[by_native[native] + ".weight"]
        expected[by_native[native]] = w + alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)

    pipe = CogVideoXPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    assert len(expected) == len({k.rsplit(".lora_", 1)[0] for k in load_file(str(path))})
    for module, w in expected.items():
        torch.testing.assert_close(fused[module + ".weight"], w, atol=1e-6, rtol=1e-6)
        assert not torch.equal(fused[module + ".weight"], base[module + ".weight"])


def test_comfyui_lora_loads_like_the_diffusers_one(wide_lora, tmp_path):
    model, path, ref = wide_lora
    comfy = write_comfyui(read_lora(path), tmp_path / "c.safetensors")
    state_dict, config, cogtune = load_lora_any(comfy)
    assert all(k.startswith("transformer.") and ".lora_" in k for k in state_dict)
    assert config["lora_alpha"] == 2 and cogtune["cogtune.variant"] == "cogvideox-5b"

    pipe = CogVideoXPipeline.from_pretrained(str(model))
    inputs = transformer_inputs(pipe.transformer.config)
    base = run_transformer(pipe.transformer, inputs)
    load_lora_into_pipeline(pipe, comfy, "from_comfy")
    got = run_transformer(pipe.transformer, inputs)

    pipe2 = CogVideoXPipeline.from_pretrained(str(model))
    pipe2.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="orig")
    want = run_transformer(pipe2.transformer, inputs)
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run_transformer(ref, inputs), want, atol=1e-5, rtol=1e-5)


def test_cli_convert_both_ways(wide_lora, tmp_path, capsys):
    _, path, _ = wide_lora
    parser = build_parser("lora")
    for argv in (["lora", "convert", str(path.parent), str(tmp_path / "c.safetensors"), "--to", "comfyui"],
                 ["lora", "convert", str(tmp_path / "c.safetensors"), str(tmp_path / "d"), "--to", "diffusers"]):
        args = parser.parse_args(argv)
        args.func(args)
    assert "wrote comfyui LoRA" in capsys.readouterr().out
    a, b = load_file(str(path)), load_file(str(tmp_path / "d" / WEIGHT_NAME))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_foreign_comfyui_lora_without_metadata(wide_lora, tmp_path):
    """A ComfyUI file from elsewhere: lora_A/lora_B names, per-module .alpha, no metadata at all."""
    model, path, _ = wide_lora
    comfy = load_file(str(write_comfyui(read_lora(path), tmp_path / "c.safetensors")))
    foreign = {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v for k, v in comfy.items()}
    save_file(foreign, str(tmp_path / "foreign.safetensors"))  # no metadata
    lora = read_lora(tmp_path / "foreign.safetensors")
    assert lora.source_format == "comfyui" and lora.alphas["proj_out"] == 8
    assert lora.alphas["transformer_blocks.0.attn1.to_q"] == 2
    assert lora.lora_config["lora_alpha"] == 2 and lora.lora_config["alpha_pattern"] == {"^proj_out": 8.0}

    pipe = CogVideoXPipeline.from_pretrained(str(model))
    inputs = transformer_inputs(pipe.transformer.config)
    load_lora_into_pipeline(pipe, tmp_path / "foreign.safetensors", "foreign")
    pipe2 = CogVideoXPipeline.from_pretrained(str(model))
    pipe2.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="orig")
    torch.testing.assert_close(run_transformer(pipe.transformer, inputs), run_transformer(pipe2.transformer, inputs),
                               atol=1e-5, rtol=1e-5)


def test_cli_convert_never_clobbers_silently(wide_lora, tmp_path):
    _, path, _ = wide_lora
    parser = build_parser("lora")

    def convert(*argv):
        args = parser.parse_args(["lora", "convert", *map(str, argv)])
        args.func(args)

    source = path.read_bytes()
    with pytest.raises(CogtuneError, match="is the input LoRA itself"):  # would replace the LoRA with another format
        convert(path, path, "--to", "comfyui", "--overwrite")
    assert path.read_bytes() == source

    out = tmp_path / "c.safetensors"
    convert(path, out, "--to", "comfyui")
    (tmp_path / "ref").write_text("")  # what any new file gets under this process's umask
    assert out.stat().st_mode & 0o777 == (tmp_path / "ref").stat().st_mode & 0o777
    out.write_bytes(b"keep me")
    with pytest.raises(CogtuneError, match="exists.*--overwrite"):
        convert(path, out, "--to", "comfyui")
    assert out.read_bytes() == b"keep me"
    convert(path, out, "--to", "comfyui", "--overwrite")
    assert load_file(str(out)).keys() == load_file(str(write_comfyui(read_lora(path), tmp_path / "d"))).keys()
    with pytest.raises(CogtuneError, match="is a file, not a folder"):
        convert(path, out / "x.safetensors", "--to", "diffusers")
