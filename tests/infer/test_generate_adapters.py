"""Several adapters, fusing, I2V and --compare in `cogtune generate`, checked against stock diffusers on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cogtune.cli import main
from cogtune.data.video import probe, read_frames, to_uint8_frames
from cogtune.infer.compare import compare_videos, strip_height
from cogtune.infer.generate import (Settings, activate_adapters, build_pipeline, parse_loras, resolve_settings,
                                    sample)
from cogtune.models.tiny import TINY_DEFAULTS
from cogtune.train.lora import WEIGHT_NAME
from helpers.lora import lora_folder

VARIANT = "cogvideox-5b"
SIZE = TINY_DEFAULTS[VARIANT]


@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory):
    model = tiny_model(VARIANT)
    root = tmp_path_factory.mktemp("loras")
    return lora_folder(model, root / "a", seed=1), lora_folder(model, root / "b", seed=2)


def transformer_output(pipe) -> torch.Tensor:
    """The transformer on fixed inputs (latents, text states, timestep, the pipeline's own rotary grid)."""
    g = torch.Generator().manual_seed(0)
    frames = (SIZE["frames"] - 1) // 4 + 1
    latents = torch.randn(1, frames, 16, SIZE["height"] // 8, SIZE["width"] // 8, generator=g)
    text = torch.randn(1, 226, pipe.transformer.config.text_embed_dim, generator=g)
    rotary = pipe._prepare_rotary_positional_embeddings(SIZE["height"], SIZE["width"], frames, torch.device("cpu"))
    with torch.no_grad():
        return pipe.transformer(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500]),
                                image_rotary_emb=rotary, return_dict=False)[0]


def test_two_weighted_adapters_match_stock_diffusers(tiny_model, loras):
    from diffusers import CogVideoXPipeline

    model = tiny_model(VARIANT)
    a, b = loras
    ours = build_pipeline(model, parse_loras([f"{a}:0.7@a", f"{b}:0.3@b"]), dtype="fp32", device="cpu")
    stock = CogVideoXPipeline.from_pretrained(model)
    stock.load_lora_weights(a, weight_name=WEIGHT_NAME, adapter_name="a")
    stock.load_lora_weights(b, weight_name=WEIGHT_NAME, adapter_name="b")
    stock.set_adapters(["a", "b"], [0.7, 0.3])
    out, ref = transformer_output(ours), transformer_output(stock)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)

    stock.disable_lora()
    base = transformer_output(stock)
    assert (out - base).abs().max() > 1e-2  # the adapters really act
    stock.enable_lora()
    stock.set_adapters(["a", "b"], [1.0, 1.0])
    assert (out - transformer_output(stock)).abs().max() > 1e-3  # and the weights do too


def test_fuse_gives_the_unfused_frames(tiny_model, loras):
    model = tiny_model(VARIANT)
    specs = parse_loras([f"{loras[0]}:0.7@a", f"{loras[1]}:0.3@b"])
    s = resolve_settings(model, Settings("a red circle moving left", steps=2, seed=3))
    unfused = build_pipeline(model, specs, dtype="fp32", device="cpu")
    fused = build_pipeline(model, specs, dtype="fp32", device="cpu", fuse=True)
    assert not any("lora_" in n for n, _ in fused.transformer.named_parameters())  # merged, layers unloaded
    video_unfused, video_fused = sample(unfused, s, progress=False), sample(fused, s, progress=False)
    assert video_fused.shape == (SIZE["frames"], SIZE["height"], SIZE["width"], 3)
    np.testing.assert_allclose(video_fused, video_unfused, atol=2e-4)
    activate_adapters(unfused, [])
    assert np.abs(sample(unfused, s, progress=False) - video_fused).max() > 1e-2


def test_fuse_cli_writes_the_video(tiny_model, loras, tmp_path):
    out = tmp_path / "fused.mp4"
    argv = ["generate", "--model", str(tiny_model(VARIANT)), "--prompt", "a blue square", "--steps", "1",
            "--lora", f"{loras[0]}:0.5", "--fuse", "--out", str(out)]
    assert main(argv) == 0
    assert probe(out).frames == SIZE["frames"]


def test_i2v_generates_the_requested_shape(tiny_model, tmp_path):
    model = tiny_model("cogvideox1.5-5b-i2v")
    image = tmp_path / "first.png"
    Image.new("RGB", (80, 40), "red").save(image)  # another aspect: scaled to cover, then centre-cropped
    out = tmp_path / "i2v.mp4"
    argv = ["generate", "--model", str(model), "--image", str(image), "--prompt", "a red circle", "--steps", "2",
            "--frames", "17", "--height", "48", "--width", "64", "--out", str(out)]
    assert main(argv) == 0
    info = probe(out)
    assert (info.frames, info.height, info.width) == (17, 48, 64)


@pytest.mark.parametrize("variant, with_image, expect", [
    (VARIANT, True, "takes no --image"), ("cogvideox1.5-5b-i2v", False, "--image PATH"),
])
def test_image_mismatch_is_one_line(tiny_model, tmp_path, capsys, variant, with_image, expect):
    image = tmp_path / "first.png"
    Image.new("RGB", (48, 32), "red").save(image)
    argv = ["generate", "--model", str(tiny_model(variant)), "--prompt", "x", "--out", str(tmp_path / "x.mp4"),
            *(["--image", str(image)] if with_image else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err
    assert not (tmp_path / "x.mp4").exists()


def test_compare_writes_side_by_side_video_and_sheet(tiny_model, loras, tmp_path):
    model = tiny_model(VARIANT)
    a, b = loras
    out = tmp_path / "cmp.mp4"
    argv = ["generate", "--model", str(model), "--prompt", "a red circle", "--steps", "2", "--seed", "5",
            "--lora", f"{a}:0.7@a", "--lora", f"{b}:0.3@b", "--compare", "--out", str(out)]
    assert main(argv) == 0
    info = probe(out)
    h, w = SIZE["height"], SIZE["width"]
    assert (info.frames, info.width, info.height) == (SIZE["frames"], 4 * w, strip_height(h) + h)
    sheet = Image.open(out.with_suffix(".png"))
    assert sheet.height == strip_height(h) + 4 * h  # a frame-label row, then one row per run
    frames = read_frames(out, [0])[0, strip_height(h):].astype(int)
    columns = [frames[:, i * w:(i + 1) * w] for i in range(4)]
    assert all(np.abs(columns[0] - c).mean() > 1 for c in columns[1:])  # each run differs from the base

    # the columns are exactly what each adapter setting gives alone, with the same seed
    specs = parse_loras([f"{a}:0.7@a", f"{b}:0.3@b"])
    s = resolve_settings(model, Settings("a red circle", steps=2, seed=5))
    pipe = build_pipeline(model, specs, dtype="fp32", device="cpu")
    videos, labels = compare_videos(pipe, s, specs, progress=False)
    assert labels == ["base", "a x0.7", "b x0.3", "a+b"]
    for video, active in zip(videos, [[], specs[:1], specs[1:], specs]):
        activate_adapters(pipe, active)
        np.testing.assert_array_equal(video, to_uint8_frames(sample(pipe, s, progress=False), (0.0, 1.0)))


def test_compare_needs_an_adapter(tiny_model, tmp_path, capsys):
    argv = ["generate", "--model", str(tiny_model(VARIANT)), "--prompt", "x", "--compare", "--out",
            str(tmp_path / "c.mp4")]
    assert main(argv) == 2
    assert "--lora" in capsys.readouterr().err
