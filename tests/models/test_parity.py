"""Training builds exactly the transformer inputs that the stock pipelines build at inference.

For each variant, a one-step stock pipeline call with fixed latents, prompt embeddings and (I2V) image is captured
with a forward pre-hook on the transformer; the spec then builds its inputs from the same tensors, the image encoded
from the same pixels with the same generator seed, and every tensor must be equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cogtune.models.cogvideox import CogVideoXSpec
from cogtune.models.tiny import TINY_DEFAULTS
from helpers.capture import pipeline_inputs

VARIANTS = ["cogvideox-2b", "cogvideox-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b", "cogvideox1.5-5b-i2v"]


def _sizes(variant):
    d = TINY_DEFAULTS[variant]
    native = (d["frames"], d["height"], d["width"])
    if variant == "cogvideox-5b-i2v":  # learned positional embeddings fix the size
        return [native]
    longer = d["frames"] + (8 if "1.5" not in variant else 16)
    return [native, (longer, 48, 32), (d["frames"], 64, 64)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_inputs_equal_pipeline_inputs(tiny_model, variant):
    spec = CogVideoXSpec.load(tiny_model(variant))
    pipe = spec.pipe
    for frames, height, width in _sizes(variant):
        latent_frames = (frames - 1) // 4 + 1
        latent_frames += (-latent_frames) % (spec.patch_size_t or 1)  # what the pipeline samples for 1.5
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(1, latent_frames, 16, height // 8, width // 8, generator=gen)
        embeds = torch.randn(1, 226, spec.transformer.config.text_embed_dim, generator=gen)
        call = dict(prompt_embeds=embeds, latents=latents.clone(), num_frames=frames, height=height, width=width)
        image_latents = None
        if spec.variant.i2v:
            pixels = torch.rand(3, height, width, generator=gen)
            img = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            call |= {"image": img, "generator": torch.Generator().manual_seed(7)}
            video = torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float().div(127.5).sub(1)[None, None]
            enc = spec.encode_videos(video)  # [1, 1, 3, H, W]: the first frame is the conditioning image
            first = spec._sample(enc["image_mean"], enc["image_logvar"], [torch.Generator().manual_seed(7)])
            image_latents = spec.image_condition(first.permute(0, 2, 1, 3, 4), latent_frames)
        seen = pipeline_inputs(pipe, **call)
        ours = spec.transformer_inputs(latents, embeds, seen["timestep"].clone(), image_latents)
        where = f"{variant} at {frames}x{height}x{width}"
        torch.testing.assert_close(ours["hidden_states"], seen["hidden_states"], msg=where, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours["encoder_hidden_states"], seen["encoder_hidden_states"], msg=where)
        assert torch.equal(ours["timestep"], seen["timestep"]), where
        if seen.get("ofs") is None:
            assert ours["ofs"] is None, where
        else:
            torch.testing.assert_close(ours["ofs"], seen["ofs"], msg=where)
        if seen.get("image_rotary_emb") is None:
            assert ours["image_rotary_emb"] is None, where
        else:
            for a, b in zip(ours["image_rotary_emb"], seen["image_rotary_emb"]):
                torch.testing.assert_close(a, b, msg=where)


def test_padding_repeats_the_first_latent_frame_at_the_front(tiny_model):
    """The 1.5 pipelines sample one extra latent frame and drop the *first* one, so padding belongs at the front."""
    spec = CogVideoXSpec.load(tiny_model("cogvideox1.5-5b"))
    x = torch.randn(2, 5, 16, 4, 6)
    padded = spec.pad_frames(x)
    assert padded.shape[1] == 6
    assert torch.equal(padded[:, 1:], x) and torch.equal(padded[:, 0], x[:, 0])
    assert spec.pad_frames(padded).shape[1] == 6


def test_i2v_image_scale_follows_invert_scale_latents(tiny_model):
    """1.5-I2V divides image latents by scaling_factor; 5B-I2V multiplies (what the official trainer gets wrong)."""
    for variant, expect in [("cogvideox-5b-i2v", lambda s: s), ("cogvideox1.5-5b-i2v", lambda s: 1 / s)]:
        spec = CogVideoXSpec.load(tiny_model(variant))
        lat = torch.ones(1, 1, 16, 4, 6)
        cond = spec.image_condition(lat, 3)
        factor = spec.vae.config.scaling_factor
        assert torch.allclose(cond[:, 0], torch.full_like(cond[:, 0], expect(factor)))
        assert torch.count_nonzero(cond[:, 1:]) == 0


def test_official_weighting_equals_v_mse(tiny_model):
    """w·(x̂0 − x0)² with w = 1/(1−ᾱ_t) is algebraically (out − v)²; v from the scheduler's own get_velocity."""
    spec = CogVideoXSpec.load(tiny_model("cogvideox-2b"))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 16, 4, 6, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    pred = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 250, 600, 999])
    spec.scheduler.alphas_cumprod = spec.scheduler.alphas_cumprod.double()
    noisy = spec.scheduler.add_noise(x0, noise, t)
    v = spec.scheduler.get_velocity(x0, noise, t)
    ours = spec.prediction_loss(pred, x0, noisy, t, "official")
    expect = ((pred - v) ** 2).reshape(4, -1).mean(1).mean()
    torch.testing.assert_close(ours, expect, rtol=1e-9, atol=1e-9)
    unweighted = spec.prediction_loss(pred, x0, noisy, t, "none")
    assert not torch.allclose(unweighted, expect)
