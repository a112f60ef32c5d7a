"""`cogtune generate` writes a playable mp4 with the LoRA applied, at the tiny model's native size by default."""

from __future__ import annotations

import numpy as np
import pytest

from cogtune.cli import main
from cogtune.data.video import probe, read_frames
from cogtune.models.tiny import TINY_DEFAULTS
from cogtune.train.loop import train
from conftest import tiny_train_config

pytestmark = pytest.mark.slow


def test_generate_with_and_without_lora(tiny_model, synth_data, tmp_path):
    model = tiny_model("cogvideox-5b")
    train(tiny_train_config(model, synth_data, tmp_path / "run", max_steps=3, optimizer__lr=2e-2))
    size = TINY_DEFAULTS["cogvideox-5b"]
    videos = {}
    for name, extra in {"base": [], "lora": ["--lora", f"{tmp_path / 'run' / 'lora'}:1.0@mine"]}.items():
        out = tmp_path / f"{name}.mp4"
        argv = ["generate", "--model", str(model), "--prompt", "a red circle moving left", "--steps", "2",
                "--seed", "3", "--out", str(out), *extra]
        assert main(argv) == 0
        info = probe(out)
        assert (info.frames, info.height, info.width) == (size["frames"], size["height"], size["width"])
        videos[name] = read_frames(out, list(range(info.frames))).astype(np.int16)
    # same seed, same prompt: only the adapter differs, so the pixels must too
    assert np.abs(videos["base"] - videos["lora"]).mean() > 0.5


def test_generate_bad_lora_path(tiny_model, tmp_path, capsys):
    code = main(["generate", "--model", str(tiny_model("cogvideox-5b")), "--prompt", "x", "--out",
                 str(tmp_path / "x.mp4"), "--lora", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "nope" in err


def test_generate_cpu_options(tiny_model, tmp_path, capsys):
    """On the CPU --cpu-offload is ignored with a note; VAE tiling/slicing and a negative prompt still work."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")
    out = tmp_path / "opts.mp4"
    argv = ["generate", "--model", str(tiny_model("cogvideox-5b")), "--prompt", "a red circle", "--steps", "1",
            "--negative-prompt", "blurry", "--cpu-offload", "--vae-tiling", "--vae-slicing", "--dtype", "fp32",
            "--out", str(out)]
    assert main(argv) == 0
    assert "--cpu-offload needs CUDA; ignored" in capsys.readouterr().err
    assert probe(out).frames == TINY_DEFAULTS["cogvideox-5b"]["frames"]


@pytest.mark.parametrize("extra, expect", [
    (["--dtype", "fp16"], "fp16 needs a CUDA GPU"),
    (["--frames", "10"], "8N+1"),
    (["--height", "40"], "multiples of 16"),
    (["--lora", "x.safetensors", "--fuse", "--compare"], "do not mix"),
])
def test_generate_option_errors(tiny_model, tmp_path, capsys, extra, expect):
    import torch

    if "fp16" in extra and torch.cuda.is_available():
        pytest.skip("fp16 works with CUDA")
    code = main(["generate", "--model", str(tiny_model("cogvideox-5b")), "--prompt", "x", "--out",
                 str(tmp_path / "x.mp4"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expect in err, err


@pytest.mark.parametrize("extra, expect", [
    (["--frames", "0"], "--frames: give a whole number from 1"),  # 0 is not "unset": no fallback to the native count
    (["--height", "-16"], "--height: give a whole number from 16 to 4096, not -16"),
    (["--fps", "0"], "--fps: give a whole number from 1"),
    (["--guidance-scale", "nan"], "finite"),
])
def test_zero_negative_and_nan_settings_are_refused(tiny_model, tmp_path, capsys, extra, expect):
    out, model = tmp_path / "x.mp4", str(tiny_model("cogvideox-5b"))
    capsys.readouterr()  # only what the command prints counts
    code = main(["generate", "--model", model, "--prompt", "x", "--steps", "1", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert not out.exists()


@pytest.mark.parametrize("where, expect", [
    ("folder", "is a folder"), ("x.gif", "ending in .mp4"), ("a_file/x.mp4", "is a file, not a folder"),
])
def test_bad_output_path_is_one_line_before_sampling(tiny_model, tmp_path, capsys, where, expect):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    before, model = sorted(p.name for p in tmp_path.iterdir()), str(tiny_model("cogvideox-5b"))
    capsys.readouterr()
    code = main(["generate", "--model", model, "--prompt", "x", "--steps", "1", "--out", str(tmp_path / where)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expect in err and "--out" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not any((tmp_path / "folder").iterdir())


@pytest.mark.parametrize("suffix, expect", [(":abc", "weight 'abc' is not a number"), (":nan", "not a finite")])
def test_lora_weight_that_is_no_number(tiny_model, tmp_path, capsys, suffix, expect):
    lora = tmp_path / "lora"
    lora.mkdir()  # the path exists, so the text after ':' can only be a weight
    model = str(tiny_model("cogvideox-5b"))
    capsys.readouterr()
    code = main(["generate", "--model", model, "--prompt", "x", "--out", str(tmp_path / "x.mp4"),
                 "--lora", f"{lora}{suffix}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expect in err, err


def test_image_that_is_no_image_fails_before_any_weight_is_read(tiny_model, tmp_path):
    from cogtune.errors import CogtuneError
    from cogtune.infer.generate import Settings, resolve_settings

    bad = tmp_path / "frame.png"
    bad.write_text("this is text, not a PNG")
    with pytest.raises(CogtuneError, match="cannot read it as an image"):
        resolve_settings(tiny_model("cogvideox-5b-i2v"), Settings("x", image=bad))
    with pytest.raises(CogtuneError, match="a folder, not an image file"):
        resolve_settings(tiny_model("cogvideox-5b-i2v"), Settings("x", image=tmp_path))
