"""Tiny pipelines of all five variants load and generate with the *stock* diffusers pipelines; variant table facts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cogtune.errors import CogtuneError
from cogtune.models.tiny import TINY_DEFAULTS, build_tokenizer, write_tiny_pipeline
from cogtune.models.variants import VARIANTS, detect_variant, get_variant, real_configs

diffusers = pytest.importorskip("diffusers")

# Published facts, written out here independently of the code under test.
STRUCTURE = {
    "cogvideox-2b": dict(in_channels=16, rope=False, learned=False, patch_t=None, patch_bias=True, ofs=False,
                         scaling=1.15258426, invert=False, snr=3.0),
    "cogvideox-5b": dict(in_channels=16, rope=True, learned=False, patch_t=None, patch_bias=True, ofs=False,
                         scaling=0.7, invert=False, snr=1.0),
    "cogvideox-5b-i2v": dict(in_channels=32, rope=True, learned=True, patch_t=None, patch_bias=True, ofs=False,
                             scaling=0.7, invert=False, snr=1.0),
    "cogvideox1.5-5b": dict(in_channels=16, rope=True, learned=False, patch_t=2, patch_bias=False, ofs=False,
                            scaling=0.7, invert=True, snr=1.0),
    "cogvideox1.5-5b-i2v": dict(in_channels=32, rope=True, learned=False, patch_t=2, patch_bias=False, ofs=True,
                                scaling=0.7, invert=True, snr=1.0),
}
PROMPT = "a red circle moving left on a white background"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: write_tiny_pipeline(root / name, name, seed=0) for name in VARIANTS}


def _load(path: Path, i2v: bool):
    cls = diffusers.CogVideoXImageToVideoPipeline if i2v else diffusers.CogVideoXPipeline
    pipe = cls.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, i2v: bool, frames: int, height: int, width: int) -> np.ndarray:
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, num_frames=frames, height=height, width=width,
                  output_type="np", generator=torch.Generator().manual_seed(0))
    if i2v:
        ramp = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None].repeat(height, 0).repeat(3, 2)
        kwargs["image"] = Image.fromarray(ramp)
    return pipe(**kwargs).frames


@pytest.mark.parametrize("name", list(VARIANTS))
def test_stock_pipeline_generates_requested_frames(tiny_dirs, name):
    frames, height, width = 17 if "1.5" in name else 9, 32, 48
    assert TINY_DEFAULTS[name] == {"frames": frames, "height": height, "width": width}
    pipe = _load(tiny_dirs[name], VARIANTS[name].i2v)
    out = _generate(pipe, VARIANTS[name].i2v, frames, height, width)
    # 1.5 pipelines pad the latent frames to a multiple of patch_size_t and drop the padding before decoding,
    # so the video has exactly the requested number of frames.
    assert out.shape == (1, frames, height, width, 3)
    assert np.isfinite(out).all() and out.std() > 0


@pytest.mark.parametrize("name,frames", [("cogvideox1.5-5b", 33), ("cogvideox1.5-5b-i2v", 49), ("cogvideox-5b", 17)])
def test_other_frame_counts(tiny_dirs, name, frames):
    pipe = _load(tiny_dirs[name], VARIANTS[name].i2v)
    assert _generate(pipe, VARIANTS[name].i2v, frames, 32, 48).shape == (1, frames, 32, 48, 3)


def test_learned_positions_lock_the_5b_i2v_size(tiny_dirs):
    pipe = _load(tiny_dirs["cogvideox-5b-i2v"], True)
    with pytest.raises(ValueError, match="different resolution"):
        _generate(pipe, True, 9, 48, 48)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tiny_keeps_real_structure(tiny_dirs, name):
    root, want = tiny_dirs[name], STRUCTURE[name]

    def read(rel: str) -> dict:
        return json.loads((root / rel).read_text())

    index, tcfg, vcfg = read("model_index.json"), read("transformer/config.json"), read("vae/config.json")
    scfg, tecfg = read("scheduler/scheduler_config.json"), read("text_encoder/config.json")
    assert index["_class_name"] == ("CogVideoXImageToVideoPipeline" if VARIANTS[name].i2v else "CogVideoXPipeline")
    assert index["tokenizer"][1] in ("T5Tokenizer", "T5TokenizerFast")
    assert tcfg["in_channels"] == want["in_channels"] and tcfg["out_channels"] == 16
    assert tcfg["use_rotary_positional_embeddings"] is want["rope"]
    assert tcfg["use_learned_positional_embeddings"] is want["learned"]
    assert tcfg["patch_size_t"] == want["patch_t"] and tcfg["patch_bias"] is want["patch_bias"]
    assert bool(tcfg["ofs_embed_dim"]) is want["ofs"]
    assert tcfg["max_text_seq_length"] == 226 and tcfg["text_embed_dim"] == tecfg["d_model"]
    assert vcfg["scaling_factor"] == want["scaling"] and vcfg["invert_scale_latents"] is want["invert"]
    assert 2 ** (len(vcfg["block_out_channels"]) - 1) == 8
    assert vcfg["temporal_compression_ratio"] == 4 and vcfg["latent_channels"] == 16
    assert scfg["_class_name"] == "CogVideoXDDIMScheduler" and scfg["snr_shift_scale"] == want["snr"]
    assert scfg["prediction_type"] == "v_prediction" and scfg["rescale_betas_zero_snr"] is True
    assert scfg["timestep_spacing"] == "trailing"
    assert json.loads((root / "cogtune_tiny.json").read_text()) == {"variant": name, **TINY_DEFAULTS[name]}
    assert detect_variant(tcfg, vcfg) == name


def test_tiny_is_deterministic_for_a_seed(tmp_path):
    files = ["transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors"]
    a, b, c = (write_tiny_pipeline(tmp_path / d, "cogvideox-2b", seed=s) for d, s in (("a", 3), ("b", 3), ("c", 4)))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
        assert (a / f).read_bytes() != (c / f).read_bytes()


def test_tokenizer_pads_like_t5_and_round_trips(tmp_path):
    tok = build_tokenizer()
    ids = tok(PROMPT, padding="max_length", max_length=226, truncation=True, add_special_tokens=True,
              return_tensors="pt").input_ids[0].tolist()
    words = PROMPT.split()
    assert ids[: len(words) + 1][-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert tok.unk_token_id not in ids[: len(words)] and ids[len(words) + 1:] == [0] * (226 - len(words) - 1)
    unknown = tok("zebra!", add_special_tokens=False).input_ids  # spelled out in characters, never <unk>
    assert unknown and tok.unk_token_id not in unknown
    tok.save_pretrained(tmp_path)
    again = type(tok).from_pretrained(tmp_path)
    assert again(PROMPT).input_ids == tok(PROMPT).input_ids


@pytest.mark.parametrize("name", list(VARIANTS))
def test_detect_variant_on_real_configs(name):
    cfg = real_configs(name)
    assert detect_variant(cfg["transformer"], cfg["vae"]) == name
    assert detect_variant(cfg["transformer"]) == name


def test_detect_variant_on_old_and_foreign_configs():
    # CogVideoX-2b transformer/config.json as first published (diffusers 0.30): no rope / patch_size_t keys at all.
    old_2b = {"in_channels": 16, "out_channels": 16, "num_attention_heads": 30, "num_layers": 30, "patch_size": 2}
    assert detect_variant(old_2b) == "cogvideox-2b"
    with pytest.raises(CogtuneError, match="in_channels=33"):  # e.g. CogVideoX-Fun inpainting models
        detect_variant({**real_configs("cogvideox-5b")["transformer"], "in_channels": 33})
    with pytest.raises(CogtuneError, match="scaling_factor"):
        detect_variant(real_configs("cogvideox-5b")["transformer"], real_configs("cogvideox-2b")["vae"])


def test_real_transformer_configs_build_the_published_sizes():
    sizes = {}
    for name in ("cogvideox-2b", "cogvideox-5b"):
        with torch.device("meta"):
            model = diffusers.CogVideoXTransformer3DModel(**real_configs(name)["transformer"])
        sizes[name] = sum(p.numel() for p in model.parameters())
    assert 1.6e9 < sizes["cogvideox-2b"] < 1.8e9 and 5.4e9 < sizes["cogvideox-5b"] < 5.7e9


def test_check_frames_and_table():
    v10, v15 = get_variant("cogvideox-5b"), get_variant("cogvideox1.5-5b")
    assert v10.check_frames(49) is None and v10.check_frames(9) is None
    for bad in (50, 48, 57, 1):
        message = v10.check_frames(bad)
        assert message and "8N+1" in message and "\n" not in message
    for ok in (17, 81, 161, 49):  # 49 = 16*3 + 1 is a valid 1.5 length too
        assert v15.check_frames(ok) is None
    for bad in (41, 50, 177):
        assert "16N+1" in v15.check_frames(bad)
    assert v10.allowed_frames() == [9, 17, 25, 33, 41, 49]
    assert v15.allowed_frames()[-1] == 161 and len(v15.allowed_frames()) == 10
    assert get_variant("cogvideox-5b-i2v").fixed_resolution and not get_variant("cogvideox1.5-5b-i2v").fixed_resolution
    assert (v15.native_height, v15.native_width, v15.fps) == (768, 1360, 16)
    assert (v10.native_height, v10.native_width, v10.fps, v10.native_frames) == (480, 720, 8, 49)


def test_unknown_variant_names_the_valid_ones():
    with pytest.raises(CogtuneError) as err:
        get_variant("cogvideox-7b")
    assert "\n" not in str(err.value) and all(name in str(err.value) for name in VARIANTS)
