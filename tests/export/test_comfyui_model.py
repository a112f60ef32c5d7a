"""`cogtune convert comfyui`: the file ComfyUI core's detector reads as the right variant, holding exactly the source
transformer (mapped back with an independent inverse map, it loads strictly and gives the same outputs)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, DiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from cogtune.cli import main
from cogtune.export.comfyui_model import convert_comfyui
from cogtune.models.tiny import TINY_DEFAULTS
from helpers import comfyui
from helpers.capture import pipeline_inputs
from helpers.lora import make_lora

VARIANTS = ["cogvideox-2b", "cogvideox-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b", "cogvideox1.5-5b-i2v"]
# What ComfyUI core must infer from the file of each variant (its detector's published rules): the learned table
# of 5B-I2V reads as "no RoPE" there, which the converter reports as a caveat.
EXPECTED = {
    "cogvideox-2b": dict(in_channels=16, patch_size_t=None, table=True, rope=False, ofs=False, cls="CogVideoX_T2V"),
    "cogvideox-5b": dict(in_channels=16, patch_size_t=None, table=False, rope=True, ofs=False, cls="CogVideoX_T2V"),
    "cogvideox-5b-i2v": dict(in_channels=32, patch_size_t=None, table=True, rope=False, ofs=False,
                             cls="CogVideoX_I2V"),
    "cogvideox1.5-5b": dict(in_channels=16, patch_size_t=2, table=False, rope=True, ofs=False, cls="CogVideoX_T2V"),
    "cogvideox1.5-5b-i2v": dict(in_channels=32, patch_size_t=2, table=False, rope=True, ofs=True,
                                cls="CogVideoX_I2V"),
}


def _shapes(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _back(path) -> dict[str, torch.Tensor]:
    return {comfyui.diffusers_key(k): v for k, v in load_file(str(path)).items()}


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory):
    """variant -> (model folder, ComfyUI file, caveats)."""
    made = {}

    def get(variant):
        if variant not in made:
            out = tmp_path_factory.mktemp("comfy") / f"{variant}.safetensors"
            made[variant] = (tiny_model(variant), *convert_comfyui(tiny_model(variant), out))
        return made[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_comfyui_detector_reads_the_variant(converted, variant):
    model, path, caveats = converted(variant)
    cfg = CogVideoXTransformer3DModel.load_config(str(model / "transformer"))
    found = comfyui.detect(_shapes(path))
    want = EXPECTED[variant]
    assert found is not None, "ComfyUI's detector would not see a CogVideoX model"
    assert found["model_class"] == want["cls"]
    assert found["in_channels"] == want["in_channels"] == cfg["in_channels"]
    assert found["patch_size"] == cfg["patch_size"] and found["patch_size_t"] == want["patch_size_t"]
    assert found["use_learned_positional_embeddings"] is want["table"]
    assert found["use_rotary_positional_embeddings"] is want["rope"]
    assert (found["ofs_embed_dim"] is not None) is want["ofs"]
    if want["ofs"]:
        assert found["ofs_embed_dim"] == cfg["ofs_embed_dim"]
    assert found["num_layers"] == cfg["num_layers"] and found["time_embed_dim"] == cfg["time_embed_dim"]
    assert found["text_embed_dim"] == cfg["text_embed_dim"]
    assert found["width"] == cfg["num_attention_heads"] * cfg["attention_head_dim"]
    # tiny heads are 16 wide: ComfyUI's width // 64 cannot see them, and the converter says so
    assert found["num_attention_heads"] != cfg["num_attention_heads"]
    assert any("64-wide attention heads" in c for c in caveats)
    assert any("no RoPE" in c for c in caveats) is (variant == "cogvideox-5b-i2v")
    if want["table"]:
        shape = _shapes(path)["patch_embed.pos_embedding"]
        assert shape == comfyui.table_shape(found, cfg["sample_height"], cfg["sample_width"], cfg["sample_frames"])
    meta = safe_open(str(path), framework="pt").metadata()
    assert meta["cogtune.variant"] == variant
    assert json.loads(meta["cogtune.transformer_config"])["in_channels"] == cfg["in_channels"]


def test_real_size_configs_fit_comfyui_but_5b_i2v_rope():
    """On the published configs ComfyUI's fixed assumptions (64-wide heads, a 60x90x49 table after 226 tokens)
    hold; only 5B-I2V's RoPE + learned table is something its detector cannot express."""
    from cogtune.models import family
    from cogtune.models.variants import real_configs

    fam = family("cogvideox")
    for variant in VARIANTS:
        notes = fam.comfyui_caveats(real_configs(variant)["transformer"])
        rope_note = [n for n in notes if "no RoPE" in n]
        assert bool(rope_note) is (variant == "cogvideox-5b-i2v"), (variant, notes)
        assert not [n for n in notes if "will not load" in n or "64-wide" in n], (variant, notes)
    # the tables a real 2B / 5B-I2V file holds have the shape ComfyUI's model builds (else its load would fail)
    from cogtune.export.shards import model_specs

    width = {"patch_size": 2, "patch_size_t": None}
    sincos = fam.comfyui_extra_tensors(real_configs("cogvideox-2b")["transformer"])["patch_embed.pos_embedding"]
    assert tuple(sincos.shape) == comfyui.table_shape(width | {"width": 1920}, 60, 90, 49)
    learned = model_specs(real_configs("cogvideox-5b-i2v")["transformer"])["patch_embed.pos_embedding"]
    assert learned.shape == comfyui.table_shape(width | {"width": 3072}, 60, 90, 49)
    assert not fam.comfyui_extra_tensors(real_configs("cogvideox-5b")["transformer"])


def _stock_inputs(model, variant):
    """The kwargs the stock pipeline hands its transformer on a 1-step call at the tiny model's native size."""
    pipe = DiffusionPipeline.from_pretrained(str(model))
    d = TINY_DEFAULTS[variant]
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 226, pipe.transformer.config.text_embed_dim, generator=gen)
    call = dict(prompt_embeds=embeds, num_frames=d["frames"], height=d["height"], width=d["width"],
                generator=torch.Generator().manual_seed(1))
    if "i2v" in variant:
        pixels = (torch.rand(d["height"], d["width"], 3, generator=gen) * 255).round().to(torch.uint8).numpy()
        call["image"] = Image.fromarray(np.asarray(pixels))
    return pipe.transformer.eval(), pipeline_inputs(pipe, **call)


def _run(transformer, inputs):
    with torch.no_grad():
        kwargs = {k: (v.to(transformer.dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep"
                      else v) for k, v in inputs.items()}
        return transformer(**{**kwargs, "return_dict": False})[0]


def _reloaded(source, path) -> CogVideoXTransformer3DModel:
    """A fresh model from the source's config with the ComfyUI file's tensors, mapped back, loaded strictly."""
    back = _back(path)
    persistent = set(source.state_dict())
    added = set(back) - persistent  # what the file adds (2B's sin-cos table): it must equal diffusers' own buffer
    for key in added:
        module, name = key.rsplit(".", 1)
        torch.testing.assert_close(back.pop(key), getattr(source.get_submodule(module), name).to(back_dtype(back)),
                                   rtol=0, atol=0)
    assert set(back) == persistent, "every tensor of the source must be in the file"
    fresh = CogVideoXTransformer3DModel.from_config(source.config)
    fresh.load_state_dict(back, strict=True)
    return fresh.to(back_dtype(back)).eval()


def back_dtype(tensors) -> torch.dtype:
    return next(iter(tensors.values())).dtype


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_transformer_as_diffusers(converted, variant):
    model, path, _ = converted(variant)
    source, inputs = _stock_inputs(model, variant)
    if variant == "cogvideox-2b":
        assert "patch_embed.pos_embedding" in _shapes(path)  # computed: diffusers stores no sin-cos table
    fresh = _reloaded(source, path)
    for key, tensor in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key
    ours, theirs = _run(fresh, inputs), _run(source, inputs)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # same weights, same code: bit-exact in fp32
    assert ours.abs().max() > 0


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_option(tiny_model, tmp_path, dtype, torch_dtype):
    model = tiny_model("cogvideox1.5-5b-i2v")
    out = tmp_path / "m.safetensors"
    assert main(["convert", "comfyui", str(model), str(out), "--dtype", dtype]) == 0
    assert {t.dtype for t in load_file(str(out)).values()} == {torch_dtype}
    source, inputs = _stock_inputs(model, "cogvideox1.5-5b-i2v")
    fresh = _reloaded(source, out)
    cast = source.to(torch_dtype)
    for key, tensor in cast.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key
    torch.testing.assert_close(_run(fresh, inputs), _run(cast, inputs))  # the dtype's default tolerance


def test_transformer_folder_and_lora_merge_output(tiny_model, tmp_path):
    """A transformer/ folder and a `lora merge` output convert too; with no --dtype the source's dtype is kept."""
    model = tiny_model("cogvideox-5b")
    lora, _ = make_lora(model, tmp_path / "lora", seed=3)
    merged = tmp_path / "merged"
    assert main(["lora", "merge", "--model", str(model), "--lora", str(lora), str(merged), "--dtype", "bf16"]) == 0
    for src, out in ((model / "transformer", tmp_path / "plain.safetensors"), (merged, tmp_path / "merged.safetensors")):
        assert main(["convert", "comfyui", str(src), str(out)]) == 0
        assert comfyui.detect(_shapes(out))["use_rotary_positional_embeddings"] is True
    assert {t.dtype for t in load_file(str(tmp_path / "merged.safetensors")).values()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(str(tmp_path / "plain.safetensors")).values()} == {torch.float32}
    source = CogVideoXTransformer3DModel.from_pretrained(str(merged), torch_dtype=torch.bfloat16)
    fresh = _reloaded(source, tmp_path / "merged.safetensors")
    plain = load_file(str(tmp_path / "plain.safetensors"))["blocks.0.q.weight"]
    assert not torch.equal(plain.bfloat16(), load_file(str(tmp_path / "merged.safetensors"))["blocks.0.q.weight"])
    for key, tensor in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key


def test_5b_i2v_trained_without_its_table_runs_with_rope_in_comfyui(tiny_model, tmp_path):
    """A 5B-I2V folder saved without the learned table (model.drop_learned_positions): ComfyUI reads I2V + RoPE,
    exactly the model diffusers builds from that folder, and no caveat about RoPE is printed."""
    dropped = tmp_path / "dropped"
    CogVideoXTransformer3DModel.from_pretrained(str(tiny_model("cogvideox-5b-i2v") / "transformer"),
                                                use_learned_positional_embeddings=False).save_pretrained(dropped)
    path, caveats = convert_comfyui(dropped, tmp_path / "m.safetensors")
    found = comfyui.detect(_shapes(path))
    assert found["model_class"] == "CogVideoX_I2V" and found["use_rotary_positional_embeddings"] is True
    assert "patch_embed.pos_embedding" not in _shapes(path)
    assert not [c for c in caveats if "RoPE" in c]
    source = CogVideoXTransformer3DModel.from_pretrained(str(dropped))
    fresh = _reloaded(source, path)
    for key, tensor in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key


def _fails(capsys, argv, *words):
    capsys.readouterr()  # what earlier steps printed (e.g. a fixture's save_pretrained progress bars)
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def test_bad_inputs_one_line_nothing_written(tiny_model, tmp_path, capsys):
    model = tiny_model("cogvideox-5b")
    out = tmp_path / "out" / "m.safetensors"
    lora, _ = make_lora(model, tmp_path / "lora", seed=4)
    _fails(capsys, ["convert", "comfyui", str(lora), str(out)], "is a LoRA", "lora convert")
    _fails(capsys, ["convert", "comfyui", str(lora.parent), str(out)], "is a LoRA")
    run = tmp_path / "run"  # a LoRA run's output_dir
    shutil.copytree(lora.parent, run / "lora")
    _fails(capsys, ["convert", "comfyui", str(run), str(out)], "is a LoRA")
    other = tmp_path / "unet"
    shutil.copytree(model / "transformer", other)
    config = json.loads((other / "config.json").read_text()) | {"_class_name": "UNet2DConditionModel"}
    (other / "config.json").write_text(json.dumps(config))
    _fails(capsys, ["convert", "comfyui", str(other), str(out)], "UNet2DConditionModel")
    wan = tiny_model("wan2.1-t2v-1.3b")  # a family cogtune trains, whose ComfyUI names it does not know yet
    _fails(capsys, ["convert", "comfyui", str(wan), str(out)], "wan model", "ComfyUI's names")
    zero = tmp_path / "ckpt"
    zero.mkdir()
    (zero / "latest").write_text("global_step2")
    _fails(capsys, ["convert", "comfyui", str(zero), str(out)], "convert zero", "then `cogtune convert comfyui")
    _fails(capsys, ["convert", "comfyui", str(model), str(tmp_path / "m.bin")], ".safetensors")
    assert not out.parent.exists() or not any(out.parent.iterdir())

    out.parent.mkdir(exist_ok=True)
    out.write_bytes(b"old")
    _fails(capsys, ["convert", "comfyui", str(model), str(out)], "exists", "--overwrite")
    assert out.read_bytes() == b"old"
    broken = tmp_path / "broken"
    shutil.copytree(model / "transformer", broken)
    config = json.loads((broken / "config.json").read_text()) | {"num_layers": 3}  # the weights have 2 layers
    (broken / "config.json").write_text(json.dumps(config))
    _fails(capsys, ["convert", "comfyui", str(broken), str(out), "--overwrite"], "do not match")
    assert out.read_bytes() == b"old"
    assert main(["convert", "comfyui", str(model), str(out), "--overwrite"]) == 0
    assert comfyui.detect(_shapes(out)) is not None
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.safetensors"]  # no temp file left


def test_full_fine_tune_card_names_the_comfyui_command(tmp_path):
    from cogtune.export.model_card import write_model_card

    for variant, expected in (("cogvideox-5b", True), ("wan2.1-t2v-1.3b", False)):
        folder = tmp_path / variant
        folder.mkdir()
        card = write_model_card(folder, base_model="base", hub_id="", variant=variant, i2v=False, method="sft",
                                settings={}, files=[]).read_text()
        assert ("cogtune convert comfyui" in card) is expected, card
