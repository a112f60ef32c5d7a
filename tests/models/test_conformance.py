"""Every registered family and variant, through the same checks (a new family passes them untouched or is not done).

- the tiny build is a stock diffusers pipeline folder and samples a finite video of its native size;
- the transformer inputs training builds equal what the stock pipeline passes, for the same tensors;
- objective identity: a model that outputs the objective's target for the training clip's latents makes the stock
  pipeline (its own scheduler, one step) decode exactly that clip's VAE latents;
- a trained LoRA loads with stock `load_lora_weights` and gives the trained transformer's output; an SFT folder loads
  with `from_pretrained` and gives the trained transformer's output;
- refusals: a frame count outside the rule is one line;
- the repeated blocks found are every block of the config; the planner prices the variant or says it cannot.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cogtune.errors import CogtuneError
from cogtune.models import all_variants, families, family, get_variant, load_spec, repeated_blocks, transformer_class

VARIANTS = sorted(all_variants())
T2V = [v for v in VARIANTS if not get_variant(v).i2v]
SFT = sorted({next(iter(f.VARIANTS)) for f in families()} | {v for v in VARIANTS if get_variant(v).i2v})  # one a family
EPS32 = torch.finfo(torch.float32).eps


def _size(model):
    f = get_variant_of(model)
    return f.native_frames, f.native_height, f.native_width


def get_variant_of(model):
    from cogtune.models import resolve_variant

    return resolve_variant(model)


def _embeds(spec, text="a red circle moving left"):
    return spec.encode_prompts([text])


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_build_is_a_stock_pipeline(tiny_model, variant):
    from diffusers import DiffusionPipeline

    from cogtune.infer.generate import Settings, build_pipeline, resolve_settings, sample

    model = tiny_model(variant)
    pipe = DiffusionPipeline.from_pretrained(str(model), local_files_only=True)
    assert type(pipe).__name__ in family(get_variant(variant).family).PIPELINES
    assert type(pipe.transformer).__name__ == get_variant(variant).transformer_class
    image = None
    if get_variant(variant).i2v:
        from PIL import Image

        image = model.parent / "first.png"
        Image.fromarray(np.full((32, 48, 3), 128, np.uint8)).save(image)
    s = resolve_settings(model, Settings("a red circle", image=image, steps=2))
    video = sample(build_pipeline(model), s, progress=False)
    assert video.shape == (s.frames, s.height, s.width, 3) and np.isfinite(video).all()
    assert s.guidance_scale == get_variant(variant).guidance


@pytest.mark.parametrize("variant", T2V)
def test_transformer_inputs_equal_the_pipelines(tiny_model, variant):
    spec = load_spec(tiny_model(variant))
    frames, height, width = _size(tiny_model(variant))
    embeds = _embeds(spec)
    from helpers.capture import pipeline_inputs

    seen = pipeline_inputs(spec.pipe, **embeds, num_frames=frames, height=height, width=width,
                    generator=torch.Generator().manual_seed(0))
    ours = spec.transformer_inputs(seen["hidden_states"], embeds["prompt_embeds"], seen["timestep"])
    for key, value in ours.items():
        theirs = seen.get(key)
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, theirs, rtol=0, atol=0, check_dtype=False, msg=key)
        elif isinstance(value, tuple):
            for a, b in zip(value, theirs):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
        elif key != "return_dict":
            assert value == theirs, key


def _perfect_output(spec, pipe, x_t, model_t, x0):
    """The objective's target for clean latents x0 at the pipeline's current step (what a perfect model outputs)."""
    obj = spec.objective
    if obj.name == "v_prediction":
        t = model_t.long()
    else:  # the scheduler's own σ (its model timesteps are truncated to integers)
        t = pipe.scheduler.sigmas[pipe.scheduler.step_index or 0].reshape(1).float()
    a = obj.add_noise(torch.ones_like(x0), torch.zeros_like(x0), t)
    b = obj.add_noise(torch.zeros_like(x0), torch.ones_like(x0), t)
    return obj.target(x0, (x_t - a * x0) / b, t)


@pytest.mark.parametrize("variant", T2V)
def test_objective_target_makes_the_pipeline_reproduce_the_clip(tiny_model, variant):
    """Training target, latent scaling/normalisation and the pipeline's scheduler and decoding agree: one step
    of a model that outputs the target lands on the clip's latents, decoded as the VAE decodes them."""
    spec = load_spec(tiny_model(variant))
    frames, height, width = _size(tiny_model(variant))
    gen = torch.Generator().manual_seed(3)
    clip = torch.rand(1, frames, 3, height, width, generator=gen) * 2 - 1
    latents = spec.encode_videos(clip)
    x0 = spec.clean_latents(latents)
    pipe = spec.pipe

    def perfect(_module, _args, kwargs, output):  # T2V: the hidden states are x_t alone
        return (_perfect_output(spec, pipe, kwargs["hidden_states"], kwargs["timestep"], x0),)

    handle = pipe.transformer.register_forward_hook(perfect, with_kwargs=True)
    try:
        with torch.no_grad():
            got = pipe(**_embeds(spec), num_frames=frames, height=height, width=width, num_inference_steps=1,
                       guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="pt").frames
    finally:
        handle.remove()
    with torch.no_grad():
        want = spec.vae.decode(latents["latent_mean"]).sample  # [1, 3, F, H, W] in [-1, 1]
    want = (want / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    # one rescale of the latents each way and a VAE decode in fp32: a few ulps of the decoder's outputs
    torch.testing.assert_close(got.float(), want, rtol=0, atol=1e3 * EPS32)


def _train(tiny_model, synth_data, out, variant, method):
    from conftest import tiny_train_config

    from cogtune.train.loop import train

    frames, height, width = _size(tiny_model(variant))
    cfg = tiny_train_config(tiny_model(variant), synth_data, out, max_steps=3, method=method,
                            optimizer__lr=3e-2 if method == "lora" else 1e-3, data__frames=frames,
                            data__height=height, data__width=width)
    return train(cfg)


def _forward_inputs(spec, frames, height, width):
    gen = torch.Generator().manual_seed(5)
    x0 = spec.clean_latents(spec.encode_videos(torch.rand(1, frames, 3, height, width, generator=gen) * 2 - 1))
    noisy = torch.randn(x0.shape, generator=gen)
    t = spec.objective.model_timestep(spec.objective.prepare(spec.objective.heldout_points()[2][1], "cpu"))
    image = None
    if spec.facts.i2v:
        image = spec.image_condition(torch.randn(1, 1, *x0.shape[2:], generator=gen), x0.shape[1])
    return spec.transformer_inputs(noisy, _embeds(spec)["prompt_embeds"], t, image)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_loads_in_stock_diffusers_at_the_trained_scale(tiny_model, synth_data, tmp_path, variant):
    result = _train(tiny_model, synth_data, tmp_path / "run", variant, "lora")
    spec = load_spec(tiny_model(variant))
    kwargs = _forward_inputs(spec, *_size(tiny_model(variant)))
    with torch.no_grad():
        base = spec.transformer(**kwargs)[0]
        trained = result.transformer.eval()(**kwargs)[0]
        spec.pipe.load_lora_weights(str(result.lora_path.parent), weight_name=result.lora_path.name,
                                    adapter_name="trained")
        loaded = spec.pipe.transformer(**kwargs)[0]
    assert (trained - base).abs().max() > 1e3 * EPS32  # the LoRA changes the output: the check below can fail
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", SFT)
def test_sft_folder_loads_with_from_pretrained(tiny_model, synth_data, tmp_path, variant):
    result = _train(tiny_model, synth_data, tmp_path / "run", variant, "sft")
    folder = result.outputs["transformer"]
    loaded = transformer_class(folder).from_pretrained(str(folder), use_safetensors=True).eval()
    spec = load_spec(tiny_model(variant))
    kwargs = _forward_inputs(spec, *_size(tiny_model(variant)))
    with torch.no_grad():
        base, got, want = spec.transformer(**kwargs)[0], loaded(**kwargs)[0], result.transformer.eval()(**kwargs)[0]
    assert (want - base).abs().max() > 1e3 * EPS32
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same fp32 weights in the same module code


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_frame_count_off_the_rule_is_one_line(tiny_model, synth_data, tmp_path, variant):
    from conftest import tiny_train_config

    from cogtune.train.loop import train

    frames, height, width = _size(tiny_model(variant))
    cfg = tiny_train_config(tiny_model(variant), synth_data, tmp_path / "run", data__frames=frames + 1,
                            data__height=height, data__width=width)
    with pytest.raises(CogtuneError, match=rf"data\.frames={frames + 1}: .*{get_variant(variant).frame_step}N\+1"):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variant", VARIANTS)
def test_blocks_are_every_repeated_block(tiny_model, variant):
    spec = load_spec(tiny_model(variant))
    blocks = repeated_blocks(spec.transformer)
    assert len(blocks) == spec.transformer.config.num_layers
    lists = [m for m in spec.transformer.modules() if isinstance(m, torch.nn.ModuleList)
             and len(m) == spec.transformer.config.num_layers]
    assert any(list(lst) == blocks for lst in lists)


@pytest.mark.parametrize("variant", VARIANTS)
def test_planner_prices_the_variant_or_says_it_cannot(variant):
    from cogtune.config import load_config
    from cogtune.plan.memory import plan_memory

    facts = get_variant(variant)
    cfg = load_config(None, base={"model": {"path": "/nonexistent", "variant": variant},
                                  "data": {"root": "/x", "frames": facts.native_frames, "height": facts.native_height,
                                           "width": facts.native_width}})
    if family(facts.family).memory_configs(variant) is None:
        with pytest.raises(CogtuneError, match="no memory profile"):
            plan_memory(cfg, gpu_memory=80)
    else:
        assert plan_memory(cfg, gpu_memory=80).training_peak[1] > 0
