"""A still image trains as what a 1-frame video means to the stock pipelines, for each CogVideoX generation.

What diffusers does with one frame (read in the installed pipelines, checked here by running them):
- 1.0 (`patch_size_t` None): `CogVideoXPipeline(num_frames=1)` samples (1 - 1) // 4 + 1 = 1 latent frame, and its
  rotary grid has temporal size 1. `CogVideoXVideoToVideoPipeline` takes a 1-frame video: it encodes it with the VAE,
  draws from the latent distribution, scales by `scaling_factor` and noises it; the transformer sees that.
- 1.5 (`patch_size_t` 2): `CogVideoXPipeline(num_frames=1)` pads the latent frames to a multiple of 2 (1 → 2; it
  adds 4 frames to `num_frames`), builds the rotary grid for ceil(2 / 2) = 1 temporal patch, and after sampling
  drops the first latent frame. The video-to-video pipeline refuses a latent count that is not a multiple of 2, so
  the T2V call is the closest stock path; the pipelines encode a single frame as `vae.encode(image.unsqueeze(2))`
  (the I2V pipelines' `prepare_latents`).
Each test runs both code paths on the same PNG and compares the tensors with a tolerance derived from float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXVideoToVideoPipeline
from PIL import Image

from cogtune.models import load_spec
from cogtune.train.encode import collate, prepare_data
from conftest import tiny_train_config
from helpers.capture import pipeline_inputs

EPS = torch.finfo(torch.float32).eps
TOL = dict(rtol=64 * EPS, atol=64 * EPS)  # the two paths differ by float round-off only (x/127.5-1 vs 2x/255-1)


def _close(a, b, what):
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=TOL["rtol"], atol=TOL["atol"] * scale, msg=what)


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    """A captioned image folder holding one PNG at the tiny models' size (32x48), so neither path resizes."""
    root = tmp_path_factory.mktemp("stills") / "data"
    root.mkdir()
    rgb = (np.random.default_rng(3).random((32, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "still.png")
    (root / "still.txt").write_text("a red circle on a white background\n")
    return root, Image.open(root / "still.png").convert("RGB")


def _cached(model, data, tmp_path):
    """The image as cogtune trains it: planned, loaded, encoded into the cache and read back as a batch of 1."""
    cfg = tiny_train_config(model, data, tmp_path / "run", data__cache_dir=str(tmp_path / "cache"))
    spec = load_spec(cfg.model.path)
    prepared = prepare_data(spec, cfg, progress=False)
    assert prepared.buckets == [(32, 48, 1)]  # a bucket of its own: one frame, the image's size
    return spec, collate([prepared.dataset[0]], torch.device("cpu"))


def _training_inputs(spec, batch, seed, timesteps):
    """The transformer's keyword arguments in a real training step (spec.training_loss), caught by a hook."""
    seen = {}
    handle = spec.transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        spec.training_loss(spec.transformer, batch, [torch.Generator().manual_seed(seed)], timesteps=timesteps)
    finally:
        handle.remove()
    return seen


def _vae_latents(pipe, image):
    """The stock single-frame encode: the pipeline's preprocessing, `image.unsqueeze(2)`, `vae.encode`."""
    pixels = pipe.video_processor.preprocess(image, height=32, width=48)
    dist = pipe.vae.encode(pixels.unsqueeze(2)).latent_dist
    return dist.mean, dist.logvar


@pytest.mark.parametrize("variant", ["cogvideox-2b", "cogvideox-5b", "cogvideox1.5-5b"])
def test_cached_latents_equal_the_pipelines_single_frame_encode(tiny_model, png, tmp_path, variant):
    spec, batch = _cached(tiny_model(variant), png[0], tmp_path)
    mean, logvar = _vae_latents(spec.pipe, png[1])
    assert batch["latent_mean"].shape == mean.shape and mean.shape[2] == 1  # [1, C, 1 latent frame, h, w]
    _close(batch["latent_mean"], mean, f"{variant} latent mean")
    _close(batch["latent_logvar"], logvar, f"{variant} latent logvar")


@pytest.mark.parametrize("variant", ["cogvideox-2b", "cogvideox-5b"])
def test_1_0_transformer_inputs_equal_video_to_video_of_one_frame(tiny_model, png, tmp_path, variant):
    """The whole chain: VAE draw, scaling, noise at the same timestep, rotary grid (5B) or none (2B's sin-cos)."""
    spec, batch = _cached(tiny_model(variant), png[0], tmp_path)
    pipe = CogVideoXVideoToVideoPipeline(**spec.pipe.components)
    embeds = batch["prompt_embeds"]
    # the generator draws the latent sample, then the noise: the order training draws them from its generator
    seen = pipeline_inputs(pipe, video=[png[1]], prompt_embeds=embeds, height=32, width=48, strength=1.0,
                           generator=torch.Generator().manual_seed(11))
    ours = _training_inputs(spec, batch, 11, seen["timestep"].clone())
    assert ours["hidden_states"].shape == seen["hidden_states"].shape == (1, 1, 16, 4, 6)
    _close(ours["hidden_states"], seen["hidden_states"], f"{variant} noisy latents")
    assert torch.equal(ours["timestep"], seen["timestep"])
    _close(ours["encoder_hidden_states"], seen["encoder_hidden_states"], f"{variant} prompt")
    if seen.get("image_rotary_emb") is None:
        assert ours["image_rotary_emb"] is None
    else:
        for a, b in zip(ours["image_rotary_emb"], seen["image_rotary_emb"]):
            assert a.shape == b.shape
            _close(a, b, f"{variant} rotary grid")


def test_1_5_pads_one_latent_frame_as_the_pipeline_pads_num_frames_1(tiny_model, png, tmp_path):
    spec, batch = _cached(tiny_model("cogvideox1.5-5b"), png[0], tmp_path)
    embeds = batch["prompt_embeds"]
    stock = pipeline_inputs(spec.pipe, prompt_embeds=embeds, num_frames=1, height=32, width=48,
                            generator=torch.Generator().manual_seed(0))
    ours = _training_inputs(spec, batch, 5, stock["timestep"].clone())
    assert ours["hidden_states"].shape == stock["hidden_states"].shape == (1, 2, 16, 4, 6)  # padded 1 → 2
    for a, b in zip(ours["image_rotary_emb"], stock["image_rotary_emb"]):  # one temporal patch
        assert a.shape == b.shape
        _close(a, b, "1.5 rotary grid")
    # our noisy latents handed to the pipeline as its own: it takes them for num_frames=1 and shows them as they are
    again = pipeline_inputs(spec.pipe, prompt_embeds=embeds, num_frames=1, height=32, width=48,
                            latents=ours["hidden_states"].clone())
    _close(again["hidden_states"], ours["hidden_states"], "1.5 latents through the pipeline")
    # the padding is in front (the pipeline drops latents[:, :1] before decoding): the image's latent is the last
    x0 = spec.clean_latents(batch)
    image_latent = batch["latent_mean"].permute(0, 2, 1, 3, 4) * spec.vae.config.scaling_factor
    _close(x0[:, 1:], image_latent, "1.5 image latent after the padding")
    assert torch.equal(x0[:, :1], x0[:, 1:])
    assert isinstance(spec.pipe, CogVideoXPipeline)


def test_wan_trains_an_image_as_the_one_latent_frame_of_num_frames_1(tiny_model, png, tmp_path):
    """Wan's VAE compresses time 4× with the first frame alone (4N+1 frames): 1 frame is 1 latent frame, unpadded."""
    from diffusers import WanPipeline

    spec, batch = _cached(tiny_model("wan2.1-t2v-1.3b"), png[0], tmp_path)
    pipe = WanPipeline(**spec.pipe.components)
    stock = pipeline_inputs(pipe, prompt_embeds=batch["prompt_embeds"], num_frames=1, height=32, width=48,
                            generator=torch.Generator().manual_seed(0))
    ours = _training_inputs(spec, batch, 5, torch.tensor([0.5]))
    assert ours["hidden_states"].shape == stock["hidden_states"].shape == (1, 16, 1, 4, 6)
    mean, logvar = _vae_latents(pipe, png[1])
    _close(batch["latent_mean"], mean, "wan latent mean")
    _close(batch["latent_logvar"], logvar, "wan latent logvar")
