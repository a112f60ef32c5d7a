"""`cogtune convert sat`: SAT checkpoints and LoRAs, laid out here from the documented SAT naming, convert back exactly.

The SAT layout is built in the test from a tiny diffusers transformer (q/k/v fused into query_key_value, the two
adaLN linears interleaved into one 12-chunk `adaLN_modulations.N.1`, ...), following CogVideo's SAT model names as
the official converters (diffusers scripts/convert_cogvideox_to_diffusers.py, CogVideo tools/) read them.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from cogtune.errors import CogtuneError
from cogtune.export.lora_formats import read_lora
from cogtune.cli import build_parser
from helpers.lora import make_lora, run_transformer, transformer_inputs
from helpers.sat import P, to_sat


def save_sat(module: dict[str, torch.Tensor], folder, **extra):
    (folder / "1000").mkdir(parents=True)
    torch.save({"module": module, "iteration": 1000, "dp_world_size": 1, **extra},
               folder / "1000" / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text("1000\n")
    return folder


def cli(argv):
    args = build_parser("convert").parse_args(["convert", "sat", *map(str, argv)])
    args.func(args)


@pytest.mark.parametrize("variant", ["cogvideox-2b", "cogvideox-5b-i2v", "cogvideox1.5-5b-i2v"])
def test_full_checkpoint_converts_back_exactly(tiny_model, tmp_path, variant):
    model = tiny_model(variant)
    original = CogVideoXTransformer3DModel.from_pretrained(str(model / "transformer")).eval()
    sd = original.state_dict()
    cfg = original.config
    ckpt = save_sat(to_sat(sd, cfg.num_layers, cfg.use_rotary_positional_embeddings), tmp_path / "sat")
    # sample_* (the size of 2B's sin-cos and 5B-I2V's learned tables) cannot be read off the weights: without --config
    # they are the published ones; the tiny model has its own. 1.5 goes without --config: its sizes are all inferred.
    extra = ["--config", model / "transformer"] if not cfg.use_rotary_positional_embeddings or \
        cfg.use_learned_positional_embeddings else []
    cli([ckpt, tmp_path / "out", "--variant", variant, "--max-shard-size", "40KB", *extra])

    converted = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "out")).eval()
    got = converted.state_dict()
    assert got.keys() == sd.keys()
    for k in sd:
        assert torch.equal(got[k], sd[k]), k
    for key in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "ofs_embed_dim",
                "patch_bias"):
        assert converted.config[key] == cfg[key], key
    inputs = transformer_inputs(cfg)
    # weights are bit-equal; the output may differ in the last float32 bit: diffusers' own save_pretrained with shards,
    # loaded back, shows the same ~2e-7 (the sharded load path, not the data)
    torch.testing.assert_close(run_transformer(converted, inputs), run_transformer(original, inputs),
                               atol=1e-6, rtol=1e-5)


def test_wrong_variant_is_one_line(tiny_model, tmp_path):
    """The checkpoint's own keys decide: 1.5's Linear patch embedding, I2V's doubled input channels, and between 2B
    and 5B the position encoding (2B's sin-cos pos_embedding table, 5B's rotary freqs_sin/freqs_cos)."""
    checkpoints = {}
    for variant in ("cogvideox1.5-5b-i2v", "cogvideox-2b", "cogvideox-5b"):
        model = tiny_model(variant)
        t = CogVideoXTransformer3DModel.from_pretrained(str(model / "transformer"))
        checkpoints[variant] = save_sat(to_sat(t.state_dict(), t.config.num_layers,
                                               t.config.use_rotary_positional_embeddings), tmp_path / variant)
    for variant, wrong in (("cogvideox1.5-5b-i2v", "cogvideox-5b"), ("cogvideox1.5-5b-i2v", "cogvideox1.5-5b"),
                           ("cogvideox-2b", "cogvideox-5b"), ("cogvideox-5b", "cogvideox-2b")):
        with pytest.raises(CogtuneError, match=f"is {variant} by its own keys, not --variant {wrong}: pass "
                                               f"--variant {variant}"):
            cli([checkpoints[variant], tmp_path / "out", "--variant", wrong])
        assert not (tmp_path / "out").exists()
    model = tiny_model("cogvideox-2b")  # without --variant the keys decide
    cli([checkpoints["cogvideox-2b"], tmp_path / "auto", "--config", model / "transformer"])
    converted = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "auto"))
    assert not converted.config.use_rotary_positional_embeddings and converted.config.in_channels == 16


def sat_export_lora(out, rank=4, seed=5):
    """What tools/export_sat_lora_weight.py writes for CogVideoX-2B: its 30 blocks' attention projections under
    diffusers names, saved by diffusers' write_lora_layers (no alpha); SAT trained them at lora_alpha 1."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(30):
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            key = f"transformer.transformer_blocks.{block}.attn1.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, 8, generator=gen)
            tensors[f"{key}.lora_B.weight"] = torch.randn(8, rank, generator=gen)
    out.mkdir()
    save_file(tensors, str(out / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    return out / "pytorch_lora_weights.safetensors", tensors


def test_an_alpha_less_2b_lora_says_where_it_came_from(tmp_path, capsys):
    src, tensors = sat_export_lora(tmp_path / "export")
    with pytest.raises(CogtuneError, match="--source finetune or --source sat-export"):
        cli([src, tmp_path / "a", "--variant", "cogvideox-2b"])
    cli([src, tmp_path / "sat", "--variant", "cogvideox-2b", "--source", "sat-export"])
    assert "SAT LoRA exported by tools/export_sat_lora_weight.py" in capsys.readouterr().out
    lora = read_lora(tmp_path / "sat")
    for module in lora.modules[:8]:  # SAT's LoraMixin: W + (lora_alpha / r) B A with lora_alpha 1
        a, b = tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"]
        got = lora.alphas[module] / lora.rank(module) * (lora.state_dict[f"transformer.{module}.lora_B.weight"]
                                                         @ lora.state_dict[f"transformer.{module}.lora_A.weight"])
        torch.testing.assert_close(got, (b @ a) / 4, rtol=1e-6, atol=1e-6)
    cli([src, tmp_path / "ft", "--variant", "cogvideox-2b", "--source", "finetune"])
    assert read_lora(tmp_path / "ft").lora_config["lora_alpha"] == 64


def test_a_lora_needs_its_variant_named(tiny_model, tmp_path):
    src, _ = official_trainer_lora(tiny_model("cogvideox-5b"), tmp_path / "official")
    with pytest.raises(CogtuneError, match="does not say which variant it belongs to: pass --variant"):
        cli([src, tmp_path / "out"])


def test_pickled_objects_need_consent(tiny_model, tmp_path):
    model = tiny_model("cogvideox-5b")
    original = CogVideoXTransformer3DModel.from_pretrained(str(model / "transformer"))
    ckpt = save_sat(to_sat(original.state_dict(), 2, True), tmp_path / "sat", args=argparse.Namespace(lr=1e-4))
    with pytest.raises(CogtuneError, match="argparse.Namespace.*pass --unsafe-pickle if you trust this file"):
        cli([ckpt, tmp_path / "out", "--variant", "cogvideox-5b"])
    cli([ckpt, tmp_path / "out", "--variant", "cogvideox-5b", "--unsafe-pickle", "--dtype", "bf16"])
    stored = load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    converted = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "out"), torch_dtype=torch.bfloat16)
    # sizes inferred from the weights, the rest from the published 5B config
    assert all(torch.equal(v.bfloat16(), converted.state_dict()[k]) for k, v in original.state_dict().items())


def sat_lora(transformer, layers: int) -> dict[str, torch.Tensor]:
    """SAT LoRA layout of a peft LoRA on to_q/to_k/to_v/to_out.0, plus base weights as SAT's LoraLinear saves them."""
    lora = {k.replace(".default", ""): v for k, v in get_peft_model_state_dict(transformer).items()}
    out = {}
    for i in range(layers):
        b, L = f"transformer_blocks.{i}.attn1.", f"{P}transformer.layers.{i}.attention."
        for j, x in enumerate("qkv"):
            out[f"{L}query_key_value.matrix_A.{j}"] = lora[f"{b}to_{x}.lora_A.weight"]
            out[f"{L}query_key_value.matrix_B.{j}"] = lora[f"{b}to_{x}.lora_B.weight"]
        out[f"{L}dense.matrix_A.0"] = lora[f"{b}to_out.0.lora_A.weight"]
        out[f"{L}dense.matrix_B.0"] = lora[f"{b}to_out.0.lora_B.weight"]
        out[f"{L}dense.original.weight"] = torch.randn(32, 32)
    return out


@pytest.mark.parametrize("alpha,flag", [(1, []), (3, ["--alpha", "3"])])
def test_sat_lora_loads_at_its_trained_scale(tiny_model, tmp_path, capsys, alpha, flag):
    model = tiny_model("cogvideox-5b")
    _, trained = make_lora(model, tmp_path / "peft", rank=4, alpha=alpha)  # SAT trains at lora_alpha/r, default 1/r
    ckpt = save_sat(sat_lora(trained, 2), tmp_path / "sat")
    cli([ckpt, tmp_path / "out", "--variant", "cogvideox-5b", *flag])
    assert ("SAT's default lora_alpha=1" in capsys.readouterr().out) == (not flag)

    pipe = CogVideoXPipeline.from_pretrained(str(model))
    inputs = transformer_inputs(pipe.transformer.config)
    base = run_transformer(pipe.transformer, inputs)
    pipe.load_lora_weights(str(tmp_path / "out"), weight_name="pytorch_lora_weights.safetensors", adapter_name="s")
    want = run_transformer(trained, inputs)
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(run_transformer(pipe.transformer, inputs), want, atol=1e-5, rtol=1e-5)


def official_trainer_lora(model, out, seed=3):
    """What CogVideo's finetune trainer saves: rank 128, lora_alpha 64, save_lora_weights without metadata."""
    transformer = CogVideoXTransformer3DModel.from_pretrained(str(model / "transformer"))
    transformer.add_adapter(LoraConfig(r=128, lora_alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    CogVideoXPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return out / "pytorch_lora_weights.safetensors", transformer


@pytest.mark.parametrize("flag,scale", [([], 0.5), (["--alpha", "32"], 0.25)])
def test_official_trainer_lora_gets_its_alpha(tiny_model, tmp_path, capsys, flag, scale):
    model = tiny_model("cogvideox-5b")
    src, trained = official_trainer_lora(model, tmp_path / "official")
    with safe_open(str(src), "pt") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {})
    cli([src.parent, tmp_path / "fixed", "--variant", "cogvideox-5b", *flag])
    assert ("(CogVideo finetune trainer output): assuming lora_alpha=64 with rank 128 (scale 0.5)"
            in capsys.readouterr().out) \
        == (not flag)

    pipe = CogVideoXPipeline.from_pretrained(str(model))
    inputs = transformer_inputs(pipe.transformer.config)
    base = run_transformer(pipe.transformer, inputs)
    pipe.load_lora_weights(str(tmp_path / "fixed"), weight_name="pytorch_lora_weights.safetensors", adapter_name="f")
    got = run_transformer(pipe.transformer, inputs)
    trained.set_adapters(["default"], [scale / 0.5])  # the trained model at scale alpha/r = 0.5, times the ratio
    want = run_transformer(trained, inputs)
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    with pytest.raises(CogtuneError, match="already records its LoRA config"):  # nothing to fix the second time
        cli([tmp_path / "fixed", tmp_path / "again", "--variant", "cogvideox-5b"])


@pytest.mark.parametrize("variant", ["cogvideox-2b", "cogvideox-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b",
                                     "cogvideox1.5-5b-i2v"])
def test_real_size_layouts_map_onto_published_configs(variant):
    """Real sizes, no memory: meta tensors laid out the SAT way come back as exactly the published model's keys."""
    from cogtune.export.sat import check_against_model, infer_config, sat_to_diffusers
    from cogtune.export.lora_compat import model_skeleton
    from cogtune.models.variants import real_configs

    published = real_configs(variant)["transformer"]
    skeleton = model_skeleton(published)
    sd = skeleton.state_dict()
    layout = to_sat(sd, published["num_layers"], published["use_rotary_positional_embeddings"])
    converted, _ = sat_to_diffusers({k: v for k, v in layout.items() if k.startswith(P)})
    cfg = infer_config(converted, variant)
    assert cfg == published
    kept = check_against_model(converted, cfg)
    assert {k: tuple(v.shape) for k, v in kept.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_lora_output_is_replaced_only_with_overwrite(tiny_model, tmp_path, capsys):
    src, _ = official_trainer_lora(tiny_model("cogvideox-5b"), tmp_path / "official")
    out = tmp_path / "fixed" / "pytorch_lora_weights.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"an earlier export")
    with pytest.raises(CogtuneError, match="exists.*--overwrite"):
        cli([src, out.parent, "--variant", "cogvideox-5b"])
    assert out.read_bytes() == b"an earlier export" and "note:" not in capsys.readouterr().out
    cli([src, out.parent, "--variant", "cogvideox-5b", "--overwrite"])
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["cogtune.converted_from"] == "cogvideo-finetune"
