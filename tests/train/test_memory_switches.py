"""Each memory switch runs on the tiny model and leaves training where it was (within the switch's own error),
with the trainable parameters and the saved LoRA unchanged in format."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from cogtune.train.loop import train
from cogtune.train.metrics import read_metrics
from conftest import tiny_train_config

pytestmark = pytest.mark.slow
STEPS = 4


def _run(tiny_model, synth_data, out, **switches):
    cfg = tiny_train_config(tiny_model("cogvideox-5b"), synth_data, out, max_steps=STEPS, **switches)
    result = train(cfg)
    losses = [r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]
    lora = load_file(str(result.lora_path))
    return losses, {k: (tuple(v.shape), v.dtype) for k, v in lora.items()}


@pytest.fixture(scope="module")
def baseline(tiny_model, synth_data, tmp_path_factory):
    return _run(tiny_model, synth_data, tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("switches,rel", [
    # recomputation is exact: same ops, same inputs
    ({"memory__gradient_checkpointing": True}, 1e-5),
    ({"memory__gradient_checkpointing": True, "memory__checkpointing_every": 2}, 1e-5),
    # the recompute reads host copies of the block inputs: the same values
    ({"memory__gradient_checkpointing": True, "memory__activation_offload": True}, 1e-5),
    ({"memory__gradient_checkpointing": True, "memory__checkpointing_every": 2, "memory__activation_offload": True},
     1e-5),
    ({"memory__offload_encoders": False}, 1e-6),
    ({"data__ram_cache_gb": 0}, 1e-6),  # every step reads the cache from disk, on the prefetch thread
    # T5 and the VAE in bf16 (8 significant bits): cached latents and embeddings move by ~0.5%, and the loss, mostly
    # the noise the model has yet to learn, by far less (measured: 4e-4)
    ({"memory__encoder_dtype": "bf16"}, 0.005),
    # the "device copy" of each block's frozen weights is a clone on the CPU: the same values
    ({"memory__block_offload": True}, 1e-6),
    ({"memory__block_offload": True, "memory__gradient_checkpointing": True}, 1e-5),
    # float8_e4m3fn keeps 3 mantissa bits: each frozen weight is off by up to 2^-4 (6.25%) relative, errors that
    # mostly average out over a layer's fan-in; the v-prediction loss of a random tiny model moves by a few percent
    ({"memory__fp8_weights": True, "memory__gradient_checkpointing": True}, 0.1),
])
def test_switch_keeps_the_loss(tiny_model, synth_data, tmp_path, baseline, switches, rel):
    losses, lora = _run(tiny_model, synth_data, tmp_path, **switches)
    base_losses, base_lora = baseline
    assert losses == pytest.approx(base_losses, rel=rel)
    assert lora == base_lora


@pytest.mark.parametrize("name,lr", [("prodigy", 1.0), ("came", 1e-3)])
def test_other_optimizers_train(tiny_model, synth_data, tmp_path, baseline, name, lr):
    losses, lora = _run(tiny_model, synth_data, tmp_path, optimizer__name=name, optimizer__lr=lr)
    assert len(losses) == STEPS and all(l == l for l in losses)  # finite
    assert losses[0] == pytest.approx(baseline[0][0], rel=1e-6)  # first loss is before any update
    assert lora == baseline[1]


def test_adamw8bit(tiny_model, synth_data, tmp_path, baseline):
    pytest.importorskip("bitsandbytes")
    losses, lora = _run(tiny_model, synth_data, tmp_path, optimizer__name="adamw8bit")
    assert losses[0] == pytest.approx(baseline[0][0], rel=1e-6) and lora == baseline[1]
    # bitsandbytes keeps tensors under 4096 elements (every tiny LoRA matrix) in 32-bit state: AdamW's updates up to
    # its fused kernel's rounding
    assert losses == pytest.approx(baseline[0], rel=1e-4)


def test_missing_optimizer_package_is_one_line(tiny_model, synth_data, tmp_path, monkeypatch):
    import sys

    from cogtune.errors import CogtuneError

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # what an uninstalled package looks like to import
    with pytest.raises(CogtuneError, match="pip install prodigyopt"):
        _run(tiny_model, synth_data, tmp_path, optimizer__name="prodigy")


@pytest.mark.parametrize("switches,match", [
    ({"method": "sft", "memory__fp8_weights": True}, "fp8_weights .* needs method: lora"),
    ({"method": "sft", "memory__block_offload": True}, "block_offload .* needs method: lora"),
    ({"memory__activation_offload": True}, "needs memory.gradient_checkpointing"),
])
def test_impossible_switches_are_refused_before_caching(tiny_model, synth_data, tmp_path, switches, match):
    from cogtune.errors import CogtuneError

    cfg = tiny_train_config(tiny_model("cogvideox-5b"), synth_data, tmp_path / "run", data__cache_dir=tmp_path / "c",
                            **switches)
    with pytest.raises(CogtuneError, match=match) as info:
        train(cfg)
    assert "\n" not in str(info.value) and not (tmp_path / "c").exists()
