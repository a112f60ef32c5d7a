"""The keyword arguments a stock pipeline hands its transformer, caught with a forward pre-hook on a 1-step call."""

from __future__ import annotations


def pipeline_inputs(pipe, **call):
    seen = {}

    def hook(_module, args, kwargs):
        seen.update(kwargs)

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(num_inference_steps=1, guidance_scale=1.0, output_type="latent", **call)
    finally:
        handle.remove()
    return seen

