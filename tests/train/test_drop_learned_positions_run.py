"""A tiny 5B-I2V LoRA trained at a non-native size with model.drop_learned_positions: its metadata and card say so,
stock diffusers loads it (`load_lora_weights` on the transformer built without the table) and reproduces the trained
model, `cogtune generate` and `lora merge` apply the choice by themselves, and every mismatch is one line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel
from PIL import Image

from cogtune.cli import main
from cogtune.data.video import probe
from cogtune.errors import CogtuneError
from cogtune.export.lora_formats import load_lora_into_pipeline
from cogtune.train.lora import read_metadata
from cogtune.train.loop import train
from conftest import tiny_train_config

pytestmark = pytest.mark.slow

VARIANT = "cogvideox-5b-i2v"
FRAMES, HEIGHT, WIDTH = 9, 48, 64  # the tiny model's native size is 9 x 32 x 48
DROP = "model.drop_learned_positions"


def _inputs(spec, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = (FRAMES - 1) // 4 + 1
    latents = torch.randn(1, f, 16, HEIGHT // 8, WIDTH // 8, generator=gen)
    text = torch.randn(1, 226, spec.transformer.config.text_embed_dim, generator=gen)
    return spec.transformer_inputs(latents, text, torch.tensor([500]), torch.randn(latents.shape, generator=gen))


def _out(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs)[0]


@pytest.fixture(scope="module")
def run(tiny_model, synth_data, tmp_path_factory):
    model = tiny_model(VARIANT)
    out = tmp_path_factory.mktemp("drop") / "run"
    image = _image(out.parent)
    cfg = tiny_train_config(model, synth_data, out, data__height=HEIGHT, data__width=WIDTH, max_steps=3,
                            optimizer__lr=2e-2, validation__prompts='["a red circle"]',
                            validation__images=f'["{image}"]', validation__inference_steps=2,
                            **{DROP.replace(".", "__"): "true"})
    return model, out, train(cfg)


def _image(tmp_path):
    path = tmp_path / "first.png"
    Image.new("RGB", (WIDTH, HEIGHT), "red").save(path)
    return path


def test_the_choice_is_recorded(run):
    _, out, result = run
    assert "drop_learned_positions: true" in (out / "config.yaml").read_text()
    videos = list((out / "validation").rglob("*.mp4"))  # sampled in training, at the trained size
    assert videos and (probe(videos[0]).height, probe(videos[0]).width) == (HEIGHT, WIDTH)
    assert result.spec.transformer.config.use_learned_positional_embeddings is False
    meta = read_metadata(out / "lora" / "pytorch_lora_weights.safetensors")
    assert meta["cogtune.drop_learned_positions"] == "true"
    assert (meta["cogtune.height"], meta["cogtune.width"]) == (str(HEIGHT), str(WIDTH))
    assert read_metadata(out / "lora" / "lora_comfyui.safetensors")[
        "cogtune.drop_learned_positions"] == "true"
    card = (out / "lora" / "README.md").read_text()
    assert "use_learned_positional_embeddings=False" in card and "inference must" in card


def test_stock_diffusers_loads_it_and_reproduces_the_trained_model(run):
    model, out, result = run
    inputs = _inputs(result.spec)
    trained = _out(result.transformer, inputs)
    transformer = CogVideoXTransformer3DModel.from_pretrained(str(model / "transformer"),
                                                              use_learned_positional_embeddings=False)
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(model), transformer=transformer)
    base = _out(pipe.transformer, inputs)
    pipe.load_lora_weights(str(out / "lora"), weight_name="pytorch_lora_weights.safetensors", adapter_name="x")
    loaded = _out(pipe.transformer, inputs)
    assert (trained - base).abs().max() > 1e-3, "training left the LoRA at zero; the comparison would prove nothing"
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)


def test_generate_applies_the_choice_at_the_trained_size(run, tmp_path, capsys):
    model, out, _ = run
    video = tmp_path / "v.mp4"
    argv = ["generate", "--model", str(model), "--lora", str(out / "lora"), "--image", str(_image(tmp_path)),
            "--prompt", "a red circle", "--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH),
            "--steps", "2", "--out", str(video)]
    assert main(argv) == 0
    assert "without the learned positional table" in capsys.readouterr().err
    info = probe(video)
    assert (info.frames, info.height, info.width) == (FRAMES, HEIGHT, WIDTH)


def test_generate_without_such_a_lora_refuses_the_size_in_one_line(run, tmp_path, capsys):
    model, _, _ = run
    code = main(["generate", "--model", str(model), "--image", str(_image(tmp_path)), "--prompt", "x",
                 "--height", str(HEIGHT), "--width", str(WIDTH), "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and DROP in err, err


def test_the_lora_is_refused_on_a_pipeline_with_the_table(run):
    model, out, _ = run
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(model))  # the table on, as the folder says
    with pytest.raises(CogtuneError) as e:
        load_lora_into_pipeline(pipe, out / "lora", "x")
    assert "\n" not in str(e.value) and "use_learned_positional_embeddings=False" in str(e.value)
    assert not getattr(pipe.transformer, "peft_config", None)  # refused before anything was loaded


def test_a_lora_trained_with_the_table_is_refused_beside_it(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model, out, _ = run
    src = out / "lora" / "pytorch_lora_weights.safetensors"
    meta = read_metadata(src) | {"cogtune.drop_learned_positions": "false"}
    (tmp_path / "other").mkdir()
    save_file(load_file(str(src)), str(tmp_path / "other" / "pytorch_lora_weights.safetensors"), metadata=meta)
    code = main(["generate", "--model", str(model), "--lora", str(out / "lora"), "--lora", str(tmp_path / "other"),
                 "--image", str(_image(tmp_path)), "--prompt", "x", "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot run on one model" in err, err


def test_merge_builds_the_model_without_the_table(run, tmp_path):
    from cogtune.infer.generate import Settings, resolve_settings

    model, out, result = run
    merged = tmp_path / "merged"
    assert main(["lora", "merge", "--model", str(model), "--lora", str(out / "lora"), str(merged), "--pipeline"]) == 0
    assert json.loads((merged / "transformer" / "config.json").read_text())["use_learned_positional_embeddings"] is False
    loaded = CogVideoXTransformer3DModel.from_pretrained(str(merged / "transformer"))
    inputs = _inputs(result.spec, seed=1)
    torch.testing.assert_close(_out(loaded, inputs), _out(result.transformer, inputs), atol=1e-5, rtol=1e-5)
    # the merged pipeline folder has no table: it takes the trained size with no LoRA to say so
    s = resolve_settings(merged, Settings("x", image=_image(tmp_path), height=HEIGHT, width=WIDTH))
    assert (s.height, s.width) == (HEIGHT, WIDTH)


def test_training_at_that_size_without_the_option_is_one_line(run, synth_data, tmp_path, capsys):
    model, _, _ = run
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(model)}, "data": {"root": str(synth_data)},
                                      "output_dir": str(tmp_path / "out"), "mixed_precision": "no"}))
    code = main(["train", str(config), f"data.height={HEIGHT}", f"data.width={WIDTH}", "data.frames=9"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"{DROP}=true" in err, err
    assert not (tmp_path / "out" / "lora").exists()


def test_sft_saves_a_config_that_builds_the_model_without_the_table(tiny_model, synth_data, tmp_path):
    model = tiny_model(VARIANT)
    cfg = tiny_train_config(model, synth_data, tmp_path / "run", method="sft", data__height=HEIGHT,
                            data__width=WIDTH, max_steps=1, **{DROP.replace(".", "__"): "true"})
    result = train(cfg)
    folder = tmp_path / "run" / "transformer"
    assert json.loads((folder / "config.json").read_text())["use_learned_positional_embeddings"] is False
    assert "config.json says so" in (folder / "README.md").read_text()
    loaded = CogVideoXTransformer3DModel.from_pretrained(str(folder))  # by itself: no override needed
    assert not hasattr(loaded.patch_embed, "pos_embedding")
    inputs = _inputs(result.spec, seed=2)
    torch.testing.assert_close(_out(loaded, inputs), _out(result.transformer, inputs), atol=1e-5, rtol=1e-5)


def test_preview_follows_the_option(run, synth_data, tmp_path):
    from cogtune.train.preview import write_preview

    model, _, _ = run
    size = dict(data__height=HEIGHT, data__width=WIDTH)
    cfg = tiny_train_config(model, synth_data, tmp_path / "o", **size, **{DROP.replace(".", "__"): "true"})
    index = json.loads(write_preview(cfg, tmp_path / "p", clips=1).read_text())
    assert index["clips"][0]["bucket"] == [FRAMES, HEIGHT, WIDTH]
    with pytest.raises(CogtuneError, match=f"{DROP}=true"):
        write_preview(tiny_train_config(model, synth_data, tmp_path / "o", **size), tmp_path / "q", clips=1)


def test_on_a_model_of_another_variant_the_variant_is_what_is_refused(run, tiny_model, tmp_path, capsys):
    _, out, _ = run
    code = main(["generate", "--model", str(tiny_model("cogvideox-5b")), "--lora", str(out / "lora"), "--prompt", "x",
                 "--steps", "1", "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "was trained on cogvideox-5b-i2v" in err, err
