"""speed.compile and speed.attention: the loss of the default run within the dtype's error, exact resume, outputs and
checkpoints in the names of an uncompiled run, attention kernels that really run, and one-line refusals before any
weight loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogtune.errors import CogtuneError
from cogtune.train.loop import train
from cogtune.train.metrics import read_metrics
from conftest import tiny_train_config

VARIANT = "cogvideox-5b"
# fp32 throughout (mixed_precision: no). Inductor fuses and reorders the sums inside a block; a reordered sum of K
# terms moves by at most ~K·eps relative (K ≤ a few hundred in the tiny model, eps 1.2e-7): 1e-5 bounds it (measured
# 1.1e-7). Pinning torch's math or flash kernel reorders the softmax sums the same way.
FP32_REL = 1e-5
FLASH_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH = "aten::_scaled_dot_product_attention_math"


def _run(tiny_model, synth_data, out: Path, **kw):
    cfg = tiny_train_config(tiny_model(VARIANT), synth_data, out, **kw)
    result = train(cfg)
    losses = {r["step"]: r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r}
    return result, [losses[s] for s in sorted(losses)]


def _saved_keys(out: Path) -> dict[str, list[str]]:
    """Every safetensors file a run wrote (outputs and checkpoints), by path inside the run, with its tensor names."""
    return {str(p.relative_to(out)): sorted(load_file(str(p))) for p in sorted(out.rglob("*.safetensors"))}


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_lora_with_checkpointing_same_loss_resume_and_names(tiny_model, synth_data, tmp_path):
    kw = dict(max_steps=4, memory__gradient_checkpointing=True, checkpoint__every_steps=2)
    _, base = _run(tiny_model, synth_data, tmp_path / "eager", **kw)
    torch._dynamo.reset()  # no compiled code from an earlier test to reuse: this run must compile its own
    graphs = _compiled_graphs()
    result, straight = _run(tiny_model, synth_data, tmp_path / "compiled", speed__compile="blocks", **kw)
    assert _compiled_graphs() > graphs  # the blocks ran compiled, not eager behind the switch
    from cogtune.models import repeated_blocks

    assert all(b._compiled_call_impl is not None for b in repeated_blocks(result.transformer))
    assert straight == pytest.approx(base, rel=FP32_REL)

    _run(tiny_model, synth_data, tmp_path / "resumed", speed__compile="blocks", **{**kw, "max_steps": 2})
    _, resumed = _run(tiny_model, synth_data, tmp_path / "resumed", speed__compile="blocks", resume="latest", **kw)
    assert resumed == pytest.approx(straight, rel=FP32_REL)  # steps 1-2 from the first part, 3-4 after the resume

    eager_keys, compiled_keys = _saved_keys(tmp_path / "eager"), _saved_keys(tmp_path / "compiled")
    assert {"lora/pytorch_lora_weights.safetensors", "checkpoint-4/trainable.safetensors"} <= set(compiled_keys)
    assert compiled_keys == eager_keys == _saved_keys(tmp_path / "resumed")
    assert not any("_orig_mod" in k for keys in compiled_keys.values() for k in keys)


@pytest.mark.slow
def test_compiled_with_every_kth_checkpointing_and_activation_offload(tiny_model, synth_data, tmp_path):
    kw = dict(max_steps=2, memory__gradient_checkpointing=True, memory__checkpointing_every=2,
              memory__activation_offload=True)
    _, base = _run(tiny_model, synth_data, tmp_path / "eager", **kw)
    _, losses = _run(tiny_model, synth_data, tmp_path / "compiled", speed__compile="blocks", **kw)
    assert losses == pytest.approx(base, rel=FP32_REL)


@pytest.mark.slow
def test_a_compiled_checkpoint_resumes_eagerly(tiny_model, synth_data, tmp_path):
    kw = dict(max_steps=4, checkpoint__every_steps=2)
    _, straight = _run(tiny_model, synth_data, tmp_path / "a", **kw)
    _run(tiny_model, synth_data, tmp_path / "b", speed__compile="blocks", **{**kw, "max_steps": 2})
    _, resumed = _run(tiny_model, synth_data, tmp_path / "b", resume="latest", **kw)
    assert resumed == pytest.approx(straight, rel=FP32_REL)


@pytest.mark.slow
def test_compiled_sft_same_loss_and_transformer_files(tiny_model, synth_data, tmp_path):
    kw = dict(method="sft", max_steps=2)
    eager, base = _run(tiny_model, synth_data, tmp_path / "eager", **kw)
    compiled, losses = _run(tiny_model, synth_data, tmp_path / "compiled", speed__compile="blocks", **kw)
    assert losses == pytest.approx(base, rel=FP32_REL)
    assert losses[-1] != base[0]  # the weights moved: the second loss compares trained models
    keys = _saved_keys(tmp_path / "compiled")
    assert keys == _saved_keys(tmp_path / "eager")
    assert any(p.startswith("transformer/") for p in keys)
    assert not any("_orig_mod" in k for names in keys.values() for k in names)
    from diffusers import CogVideoXTransformer3DModel

    CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "compiled" / "transformer"))  # a stock client loads it


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa_math", "sdpa_flash"])
def test_pinned_attention_same_loss(tiny_model, synth_data, tmp_path, attention):
    _, base = _run(tiny_model, synth_data, tmp_path / "sdpa", max_steps=3)
    _, pinned = _run(tiny_model, synth_data, tmp_path / attention, max_steps=3, speed__attention=attention)
    assert pinned == pytest.approx(base, rel=FP32_REL)


def _attention_ops(transformer, inputs: dict) -> set[str]:
    """The aten SDPA kernels one forward pass calls."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        transformer(**inputs)
    return {e.key for e in prof.key_averages() if e.key in (FLASH_CPU, MATH)}


def _tiny_transformer_and_inputs(tiny_model, variant: str):
    """The tiny model's transformer and its inputs for one clip, built as training builds them."""
    from cogtune.models import load_spec

    spec = load_spec(tiny_model(variant))
    torch.manual_seed(0)
    x0 = spec.clean_latents(spec.encode_videos(torch.rand(1, 9, 3, 32, 48) * 2 - 1))
    text = spec.encode_prompts(["a red square"])["prompt_embeds"]
    return spec, spec.transformer_inputs(x0, text, torch.tensor([500]))


@pytest.mark.parametrize("variant", ["cogvideox-5b", "wan2.1-t2v-1.3b"])
def test_attention_choices_take_effect(tiny_model, variant):
    """A pin that torch ignored would leave the kernel it picks by itself (flash on this CPU); a dispatcher backend
    on a model whose attention bypasses the dispatcher is ignored: the facts must say so, and cogtune refuse it."""
    from cogtune.train.speed import attention_kernel

    spec, inputs = _tiny_transformer_and_inputs(tiny_model, variant)
    t = spec.transformer
    assert _attention_ops(t, inputs) == {FLASH_CPU}  # what torch picks on its own here
    with attention_kernel("sdpa_math"):
        assert MATH in _attention_ops(t, inputs) and FLASH_CPU not in _attention_ops(t, inputs)
    with attention_kernel("sdpa_flash"):
        assert _attention_ops(t, inputs) == {FLASH_CPU}
    # the dispatcher's math backend, switched as speed.attention switches flash/xformers (they need CUDA): it runs
    # only where the model's attention calls the dispatcher
    from diffusers.models.attention_dispatch import attention_backend

    with attention_backend("_native_math"):
        honoured = MATH in _attention_ops(t, inputs)
    assert honoured == spec.facts.attention_dispatch


@pytest.mark.parametrize("variant,switches,match", [
    (VARIANT, {"speed__compile": "blocks", "memory__block_offload": True}, "with memory.block_offload"),
    (VARIANT, {"speed__compile": "blocks", "memory__fp8_weights": True}, "with memory.fp8_weights"),
    (VARIANT, {"speed__compile": "blocks", "distributed__strategy": "fsdp2"}, "strategy=fsdp2"),
    (VARIANT, {"speed__attention": "flash"}, "calls torch's SDPA directly, not diffusers' attention dispatcher"),
    (VARIANT, {"speed__attention": "xformers"}, "calls torch's SDPA directly"),
    ("wan2.1-t2v-1.3b", {"speed__attention": "flash"}, "flash needs a CUDA device"),
    (VARIANT, {"speed__attention": "sdpa_efficient"}, "sdpa_efficient needs a CUDA device"),
    (VARIANT, {"speed__attention": "sdpa_cudnn"}, "sdpa_cudnn needs a CUDA device"),
])
def test_what_cannot_work_here_is_one_line_before_loading(tiny_model, synth_data, tmp_path, variant, switches,
                                                          match):
    if torch.cuda.is_available() and "CUDA" in match:
        pytest.skip("CUDA is here")
    cfg = tiny_train_config(tiny_model(variant), synth_data, tmp_path / "run", data__cache_dir=tmp_path / "c",
                            **switches)
    with pytest.raises(CogtuneError, match=match) as info:
        train(cfg)
    assert "\n" not in str(info.value) and not (tmp_path / "c").exists() and not (tmp_path / "run").exists()


def test_compile_without_a_compiler_is_one_line(tiny_model, synth_data, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA: inductor needs Triton, not a C++ compiler")
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, c++ or clang++ to be found
    monkeypatch.delenv("CXX", raising=False)
    cfg = tiny_train_config(tiny_model(VARIANT), synth_data, tmp_path / "run", speed__compile="blocks")
    with pytest.raises(CogtuneError, match="inductor needs a C\\+\\+ compiler"):
        train(cfg)


@pytest.mark.parametrize("given,want", [("false", "off"), ("true", "blocks"), ("blocks", "blocks"), ("off", "off")])
def test_compile_takes_yaml_booleans(tiny_model, synth_data, tmp_path, given, want):
    cfg = tiny_train_config(tiny_model(VARIANT), synth_data, tmp_path, speed__compile=given)
    assert cfg.speed.compile == want


def test_unknown_attention_is_one_line(tiny_model, synth_data, tmp_path):
    with pytest.raises(CogtuneError, match="speed.attention") as info:
        tiny_train_config(tiny_model(VARIANT), synth_data, tmp_path, speed__attention="sage")
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_compiled_blocks_of_another_family(tiny_model, synth_data, tmp_path):
    """The blocks come from the model's spec: a Wan run compiles its own blocks, at the same loss."""
    def run(out, **kw):
        cfg = tiny_train_config(tiny_model("wan2.1-t2v-1.3b"), synth_data, out, max_steps=2, **kw)
        train(cfg)
        return [r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]

    base = run(tmp_path / "eager")
    assert run(tmp_path / "compiled", speed__compile="blocks") == pytest.approx(base, rel=FP32_REL)
    assert _saved_keys(tmp_path / "compiled") == _saved_keys(tmp_path / "eager")
