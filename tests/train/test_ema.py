"""ema.*: the average follows its closed form, is saved in every checkpoint and resumed bit for bit, and is exported
beside the plain weights in their formats."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cogtune.errors import CogtuneError
from cogtune.train.ema import EMA
from cogtune.train.loop import train
from conftest import tiny_train_config


def closed_form(weights: dict[int, torch.Tensor], decay: float, steps: list[int]) -> torch.Tensor:
    """The average after the updates at `steps` (weights[s]: after step s): it starts as the first one."""
    first, *rest = steps
    out = weights[first].double() * decay ** len(rest)
    for j, s in enumerate(rest):
        out += (1 - decay) * decay ** (len(rest) - 1 - j) * weights[s].double()
    return out


def test_the_update_rule_against_its_closed_form():
    p = torch.nn.Parameter(torch.zeros(5))
    ema = EMA({"p": p}, decay=0.8, start_step=3, every=2)
    weights = {}
    for step in range(1, 12):
        with torch.no_grad():
            p.copy_(torch.arange(5.0) * step + step ** 2)
        weights[step] = p.detach().clone()
        ema.update(step)
    assert ema.due(3) and ema.due(5) and not ema.due(4) and not ema.due(2)
    want = closed_form(weights, 0.8, [3, 5, 7, 9, 11])
    torch.testing.assert_close(ema.shadow["p"].double(), want, rtol=1e-6, atol=1e-6)
    with ema.swapped_in() as swapped:
        assert swapped and torch.equal(p.detach(), ema.shadow["p"])
    assert torch.equal(p.detach(), weights[11])  # the trained weights are back


@pytest.fixture(scope="module")
def runs(tiny_model, synth_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    common = dict(ema__decay=0.5, ema__start_step=2, checkpoint__every_steps=1, checkpoint__keep_last=10)
    straight = tiny_train_config(tiny_model(), synth_data, root / "straight", max_steps=4, **common)
    train(straight)
    split = tiny_train_config(tiny_model(), synth_data, root / "split", max_steps=2, **common)
    train(split)
    train(tiny_train_config(tiny_model(), synth_data, root / "split", max_steps=4, resume="latest", **common))
    return root


def _as_lora(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"transformer.{k.replace('.default.', '.')}": v for k, v in trainable.items()}


@pytest.mark.slow
def test_checkpoints_and_exports_hold_the_average(runs):
    out = runs / "straight"
    assert not (out / "checkpoint-1" / "ema.safetensors").exists()  # before start_step: no average yet
    weights = {s: load_file(str(out / f"checkpoint-{s}" / "trainable.safetensors")) for s in range(1, 5)}
    for step in (2, 3, 4):
        ema = load_file(str(out / f"checkpoint-{step}" / "ema.safetensors"))
        assert ema.keys() == weights[step].keys()
        for name in list(ema)[:6]:
            want = closed_form({s: w[name] for s, w in weights.items()}, 0.5, list(range(2, step + 1)))
            torch.testing.assert_close(ema[name].double(), want, rtol=1e-6, atol=1e-7)
    final_ema = _as_lora(load_file(str(out / "checkpoint-4" / "ema.safetensors")))
    exported = load_file(str(out / "lora_ema" / "pytorch_lora_weights.safetensors"))
    assert exported.keys() == final_ema.keys() and all(torch.equal(exported[k], final_ema[k]) for k in exported)
    plain = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(plain[k], v) for k, v in _as_lora(weights[4]).items())  # the swap put them back
    assert (out / "lora_ema" / "lora_comfyui.safetensors").is_file() and (out / "lora_ema" / "README.md").is_file()


@pytest.mark.slow
def test_resume_gives_the_same_average_bit_for_bit(runs):
    a = load_file(str(runs / "straight" / "lora_ema" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(runs / "split" / "lora_ema" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same steps on the same CPU


@pytest.mark.slow
def test_a_full_fine_tune_exports_its_average(tiny_model, synth_data, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    cfg = tiny_train_config(tiny_model(), synth_data, tmp_path / "run", method="sft", max_steps=2, ema__decay=0.9,
                            ema__start_step=2)  # one update: the average is the final weights themselves
    train(cfg)
    plain = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "run" / "transformer")).state_dict()
    ema = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "run" / "transformer_ema")).state_dict()
    assert plain.keys() == ema.keys() and all(torch.equal(plain[k], ema[k]) for k in plain)


def test_sharded_strategies_are_refused_in_one_line(tiny_model, synth_data, tmp_path):
    cfg = tiny_train_config(tiny_model(), synth_data, tmp_path / "run", ema__decay=0.99, method="sft",
                            distributed__strategy="fsdp2")
    with pytest.raises(CogtuneError, match="ema.decay with distributed.strategy=fsdp2"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_the_planner_prices_the_average():
    from cogtune.config import load_config
    from cogtune.plan.memory import plan_memory

    base = {"model": {"path": "/nonexistent", "variant": "cogvideox-5b"}, "data": {"root": "/d"}}
    off = plan_memory(load_config(None, base=base))
    on = plan_memory(load_config(None, ["ema.decay=0.999"], base=base))
    host = plan_memory(load_config(None, ["ema.decay=0.999", "ema.on_host=true"], base=base))
    fp32_average = 4 * off.details["trainable_params"]  # one fp32 number per trained parameter
    step = "optimizer step"
    assert on.phase_parts[step]["optimizer"] - off.phase_parts[step]["optimizer"] == pytest.approx(fp32_average)
    assert host.phase_parts[step]["optimizer"] == pytest.approx(off.phase_parts[step]["optimizer"])
    assert host.host_total >= off.host_total  # on the host instead (the pipeline load may still be its peak)
