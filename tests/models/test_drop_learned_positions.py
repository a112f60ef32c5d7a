"""5B-I2V without its learned positional table (model.drop_learned_positions): what training feeds the transformer
equals what the stock I2V pipeline feeds it at inference, with the table dropped the way diffusers users drop it.

Two code paths: training goes through cogtune (resolve_variant(drop_positions=True) -> load_spec -> the spec's
transformer_inputs, then that transformer's own patch embedding); inference is stock diffusers only
(`CogVideoXTransformer3DModel.from_pretrained(..., use_learned_positional_embeddings=False)` inside
`CogVideoXImageToVideoPipeline.from_pretrained(..., transformer=...)`, one step, captured with hooks). Both at two
sizes the table would refuse.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel
from PIL import Image

from cogtune.errors import CogtuneError
from cogtune.models import load_spec, resolve_variant
from cogtune.models.tiny import TINY_DEFAULTS

VARIANT = "cogvideox-5b-i2v"
SIZES = [(9, 48, 32), (17, 64, 64)]  # tiny native: 9 x 32 x 48
EPS = torch.finfo(torch.float32).eps
TOL = dict(atol=64 * EPS, rtol=64 * EPS)  # fp32: a few dozen ulps for differently ordered sums (VAE, convs)


def _stock_pipeline(model):
    transformer = CogVideoXTransformer3DModel.from_pretrained(str(model / "transformer"),
                                                              use_learned_positional_embeddings=False)
    return CogVideoXImageToVideoPipeline.from_pretrained(str(model), transformer=transformer)


def _pipeline_inputs(pipe, **call):
    """The transformer's keyword arguments and its patch embedding's output in a 1-step stock call."""
    seen = {}
    hooks = [pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True),
             pipe.transformer.patch_embed.register_forward_hook(lambda _m, _a, out: seen.update(embedded=out))]
    try:
        pipe(num_inference_steps=1, guidance_scale=1.0, output_type="latent", **call)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.fixture(scope="module")
def both(tiny_model):
    model = tiny_model(VARIANT)
    spec = load_spec(model, resolve_variant(model, drop_positions=True))
    return model, spec, _stock_pipeline(model)


def test_the_option_builds_the_transformer_without_the_table(both):
    model, spec, pipe = both
    assert spec.facts.positions_dropped and not spec.facts.fixed_resolution
    assert spec.transformer.config.use_learned_positional_embeddings is False
    assert not hasattr(spec.transformer.patch_embed, "pos_embedding")
    # every other weight is the folder's (the table is the only one left unused)
    ours, stock = spec.transformer.state_dict(), pipe.transformer.state_dict()
    assert ours.keys() == stock.keys()
    assert all(torch.equal(ours[k], stock[k]) for k in ours)


@pytest.mark.parametrize("frames,height,width", SIZES)
def test_training_inputs_equal_stock_pipeline_inputs_without_the_table(both, frames, height, width):
    _, spec, pipe = both
    assert (height, width) != (TINY_DEFAULTS[VARIANT]["height"], TINY_DEFAULTS[VARIANT]["width"])
    spec.check_size(frames, height, width)  # allowed with the option
    latent_frames = (frames - 1) // 4 + 1
    gen = torch.Generator().manual_seed(frames + height)
    latents = torch.randn(1, latent_frames, 16, height // 8, width // 8, generator=gen)
    embeds = torch.randn(1, 226, spec.transformer.config.text_embed_dim, generator=gen)
    pixels = torch.rand(3, height, width, generator=gen)
    img = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    seen = _pipeline_inputs(pipe, prompt_embeds=embeds, latents=latents.clone(), num_frames=frames, height=height,
                            width=width, image=img, generator=torch.Generator().manual_seed(7))

    video = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(127.5).sub(1)[None, None]
    enc = spec.encode_videos(video)  # the first (only) frame is the conditioning image
    first = spec._sample(enc["image_mean"], enc["image_logvar"], [torch.Generator().manual_seed(7)])
    image_latents = spec.image_condition(first.permute(0, 2, 1, 3, 4), latent_frames)
    ours = spec.transformer_inputs(latents, embeds, seen["timestep"].clone(), image_latents)
    where = f"{frames}x{height}x{width}"

    # image latents (channels 16:32 of the input: the first latent frame, zeros after it), then the whole input
    assert seen["hidden_states"][:, 0, 16:].abs().max() > 0.1 and not seen["hidden_states"][:, 1:, 16:].any()
    torch.testing.assert_close(ours["hidden_states"][:, :, 16:], seen["hidden_states"][:, :, 16:], msg=where, **TOL)
    torch.testing.assert_close(ours["hidden_states"], seen["hidden_states"], msg=where, **TOL)
    torch.testing.assert_close(ours["encoder_hidden_states"], seen["encoder_hidden_states"], msg=where, **TOL)
    assert torch.equal(ours["timestep"], seen["timestep"]) and seen.get("ofs") is None and ours["ofs"] is None
    for a, b in zip(ours["image_rotary_emb"], seen["image_rotary_emb"], strict=True):  # rotary still applies
        torch.testing.assert_close(a, b, msg=where, **TOL)
    # patch-embedded hidden states, positional terms included (none: no table, no sin-cos with RoPE)
    with torch.no_grad():
        embedded = spec.transformer.patch_embed(ours["encoder_hidden_states"], ours["hidden_states"])
    assert embedded.shape == seen["embedded"].shape == (1, 226 + latent_frames * height * width // 256, 32)
    torch.testing.assert_close(embedded, seen["embedded"], msg=where, **TOL)


def test_without_the_option_the_size_is_refused_naming_it(tiny_model):
    facts = resolve_variant(tiny_model(VARIANT))
    problem = facts.check_size(9, 48, 32)
    assert problem and "\n" not in problem and "model.drop_learned_positions=true" in problem
    assert facts.check_size(9, 32, 48) is None


def test_the_option_on_a_model_without_a_table_is_refused(tiny_model):
    with pytest.raises(CogtuneError, match="no learned positional table"):
        resolve_variant(tiny_model("cogvideox-5b"), drop_positions=True)


def test_the_option_on_a_model_without_a_table_is_one_line_from_train(tiny_model, synth_data, tmp_path, capsys):
    import yaml

    from cogtune.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(tiny_model("cogvideox-5b")), "drop_learned_positions": True},
                                      "data": {"root": str(synth_data)}, "output_dir": str(tmp_path / "out")}))
    code = main(["train", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no learned positional table" in err, err
