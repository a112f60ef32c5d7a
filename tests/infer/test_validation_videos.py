"""Validation during training writes an mp4 per prompt and a PNG contact sheet at the configured steps."""

from __future__ import annotations

import pytest
from PIL import Image

from cogtune.data.video import probe
from cogtune.train.loop import train
from conftest import tiny_train_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("variant", ["cogvideox-5b", "cogvideox-5b-i2v"])
def test_validation_writes_videos_and_sheet(tiny_model, synth_data, tmp_path, variant):
    image = tmp_path / "cond.png"
    Image.new("RGB", (48, 32), "blue").save(image)
    prompts = ["a red circle moving left", "a blue square moving up"]
    images = [str(image)] * 2 if "i2v" in variant else []
    cfg = tiny_train_config(tiny_model(variant), synth_data, tmp_path / "run", max_steps=4, validation__every_steps=2,
                            validation__prompts=prompts, validation__images=images, validation__inference_steps=2)
    train(cfg)
    for step in (2, 4):
        folder = tmp_path / "run" / "validation" / f"step-{step}"
        videos = sorted(folder.glob("*.mp4"))
        assert [v.name for v in videos] == ["00.mp4", "01.mp4"]
        assert all(probe(v).frames == cfg.data.frames for v in videos)
        sheet = Image.open(folder / "contact_sheet.png")
        assert sheet.height == 2 * cfg.data.height  # one row per prompt
    assert not (tmp_path / "run" / "validation" / "step-0").exists()
    assert list((tmp_path / "run" / "logs" / "tensorboard").glob("events.*"))


def test_i2v_validation_needs_an_image_per_prompt(tiny_model, synth_data, tmp_path):
    from cogtune.errors import CogtuneError

    cfg = tiny_train_config(tiny_model("cogvideox-5b-i2v"), synth_data, tmp_path / "run",
                            validation__prompts=["x"], validation__images=[])
    with pytest.raises(CogtuneError, match="validation.images"):
        train(cfg)
