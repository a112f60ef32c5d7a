"""memory.stream_text_encoder: T5 runs layer by layer through diffusers' group offloading hooks and gives the
embeddings of the whole model (here the onload device is the CPU: the hooks, not the transfer, are under test)."""

from __future__ import annotations

import torch

from cogtune.models import load_spec
from cogtune.train.loop import train
from cogtune.train.metrics import read_metrics
from conftest import tiny_train_config

CAPTIONS = ["a red circle moving left", "two squares, one blue, swapping places on a white background"]


def test_streamed_embeddings_equal_the_resident_ones(tiny_model):
    path = tiny_model("cogvideox-5b")
    resident = load_spec(path)
    resident.encoders_to(torch.device("cpu"))
    streamed = load_spec(path)
    streamed.encoders_to(torch.device("cpu"), stream_text=True)
    hooked = [m for m in streamed.pipe.text_encoder.modules() if getattr(m, "_diffusers_hook", None) is not None]
    assert hooked, "no group-offloading hooks were installed"
    want = resident.encode_prompts(CAPTIONS)["prompt_embeds"]
    # the streamed weights are copies at other addresses, and CPU kernels may pick their reduction order by
    # alignment: equal up to 16 fp32 ulps of the output's scale (a wrong layer's weights are off by far more)
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(streamed.encode_prompts(CAPTIONS)["prompt_embeds"], want, rtol=16 * eps,
                               atol=16 * eps * float(want.abs().max()))
    streamed.encode_videos(torch.zeros(1, 9, 3, 32, 48))  # the VAE's turn leaves the streamed T5 where it is
    streamed.encoders_for_training(text=False, vae=False)
    torch.testing.assert_close(streamed.encode_prompts(CAPTIONS[:1]), resident.encode_prompts(CAPTIONS[:1]))


def test_training_with_a_streamed_text_encoder(tiny_model, synth_data, tmp_path):
    def losses(out, **kw):
        # a cache of its own: the captions must really be encoded by the streamed T5
        cfg = tiny_train_config(tiny_model("cogvideox-5b"), synth_data, out, data__cache_dir=str(out / "cache"), **kw)
        train(cfg)
        return [r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]

    assert losses(tmp_path / "s", memory__stream_text_encoder="true") == losses(tmp_path / "r")
