"""`cogtune lora merge`: the merged transformer folder equals the pipeline with the same adapters fused."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

from cogtune.cli import build_parser
from cogtune.errors import CogtuneError
from cogtune.export.lora_formats import read_lora, write_comfyui
from cogtune.cli import build_parser
from cogtune.export.merge import merge_loras
from helpers.lora import make_lora, run_transformer, transformer_inputs


@pytest.fixture(scope="module")
def two_loras(tiny_model, tmp_path_factory):
    model = tiny_model("cogvideox-5b")
    tmp = tmp_path_factory.mktemp("merge")
    a, _ = make_lora(model, tmp / "a", rank=4, alpha=2, seed=1)
    b, _ = make_lora(model, tmp / "b", rank=8, alpha=16, targets=("to_q", "to_v", "ff.net.0.proj"), seed=2)
    b_comfy = write_comfyui(read_lora(b), tmp / "b_comfy.safetensors")  # one of them in the ComfyUI format

    pipe = CogVideoXPipeline.from_pretrained(str(model))
    inputs = transformer_inputs(pipe.transformer.config)
    base = run_transformer(pipe.transformer, inputs)
    pipe.load_lora_weights(str(a.parent), weight_name=a.name, adapter_name="a")
    pipe.load_lora_weights(str(b.parent), weight_name=b.name, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, 0.3])
    active = run_transformer(pipe.transformer, inputs)
    pipe.fuse_lora()
    fused = run_transformer(pipe.transformer, inputs)
    torch.testing.assert_close(fused, active, atol=1e-5, rtol=1e-5)
    assert (fused - base).abs().max() > 1e-3
    return model, a, b_comfy, inputs, fused


def test_merged_transformer_equals_fused_pipeline(two_loras, tmp_path):
    model, a, b_comfy, inputs, fused = two_loras
    out = merge_loras(model, [f"{a.parent}:0.7", f"{b_comfy}:0.3"], tmp_path / "merged", max_shard_size="40KB")
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()  # sharded: index + several files
    assert len(list(out.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    merged = CogVideoXTransformer3DModel.from_pretrained(str(out))
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(run_transformer(merged, inputs), fused, atol=1e-5, rtol=1e-5)
    info = json.loads((out / "cogtune_merge.json").read_text())
    assert [entry["weight"] for entry in info["loras"]] == [0.7, 0.3]


def test_merge_pipeline_folder_via_cli(two_loras, tmp_path, capsys):
    model, a, b_comfy, inputs, fused = two_loras
    parser = build_parser("lora")
    args = parser.parse_args(["lora", "merge", "--model", str(model), "--lora", f"{a}:0.7", "--lora",
                              f"{b_comfy}:0.3", str(tmp_path / "pipe"), "--pipeline"])
    args.func(args)
    assert "merged 2 LoRA(s) into a pipeline folder" in capsys.readouterr().out
    pipe = CogVideoXPipeline.from_pretrained(str(tmp_path / "pipe"))
    torch.testing.assert_close(run_transformer(pipe.transformer, inputs), fused, atol=1e-5, rtol=1e-5)
    vae = next((model / "vae").glob("*.safetensors"))
    assert (tmp_path / "pipe" / "vae" / vae.name).read_bytes() == vae.read_bytes()

    with pytest.raises(CogtuneError, match="not empty"):  # refuses to overwrite without --overwrite
        args.func(args)


def test_merge_refuses_a_lora_for_another_model(two_loras, tiny_model, tmp_path):
    _, a, _, _, _ = two_loras
    with pytest.raises(CogtuneError, match="trained on cogvideox-5b"):
        merge_loras(tiny_model("cogvideox1.5-5b"), [str(a)], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_merge_never_writes_over_its_own_model(two_loras, tmp_path):
    import shutil

    model, a, _, _, _ = two_loras
    mine = shutil.copytree(model, tmp_path / "model")  # a copy: a failing check must not break the shared model
    weights = {p: p.read_bytes() for p in (mine / "transformer").iterdir()}
    for out in (mine, mine / "transformer", tmp_path):
        with pytest.raises(CogtuneError, match="overlaps --model"):
            merge_loras(mine, [str(a)], out, overwrite=True)
    assert {p: p.read_bytes() for p in (mine / "transformer").iterdir()} == weights

    (tmp_path / "a_file").write_text("")
    with pytest.raises(CogtuneError, match="is a file, not a folder"):
        merge_loras(model, [str(a)], tmp_path / "a_file" / "merged")
