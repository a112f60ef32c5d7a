"""memory.optimizer_in_backward: the weights of the usual loop, without ever holding all gradients; exact resume;
one-line refusals where it cannot work."""

from __future__ import annotations

import pytest
import torch

from cogtune.errors import CogtuneError
from cogtune.train.loop import train
from cogtune.train.memory import OptimizerInBackward
from conftest import tiny_train_config

pytestmark = pytest.mark.slow


def _sft(tiny_model, synth_data, out, **kw):
    cfg = tiny_train_config(tiny_model("cogvideox-2b"), synth_data, out, method="sft", optimizer__max_grad_norm="null",
                            optimizer__weight_decay=0.01, **kw)
    return train(cfg)


def _weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.transformer.state_dict().items()}


def test_same_weights_as_the_usual_step(tiny_model, synth_data, tmp_path):
    schedule = dict(lr_scheduler__name="linear", lr_scheduler__warmup_steps=2)  # the scheduler must reach every group
    usual = _weights(_sft(tiny_model, synth_data, tmp_path / "usual", **schedule))
    fused = _weights(_sft(tiny_model, synth_data, tmp_path / "fused", memory__optimizer_in_backward="true", **schedule))
    assert usual.keys() == fused.keys()
    for key in usual:
        torch.testing.assert_close(fused[key], usual[key], rtol=1e-6, atol=1e-7, msg=key)
    from diffusers import CogVideoXTransformer3DModel

    start = CogVideoXTransformer3DModel.from_pretrained(str(tiny_model("cogvideox-2b") / "transformer")).state_dict()
    moved = sum(not torch.equal(start[k], usual[k]) for k in usual)
    assert moved > len(usual) // 2  # the comparison is between trained weights, not untouched ones


def test_resume_is_exact(tiny_model, synth_data, tmp_path):
    kw = dict(memory__optimizer_in_backward="true", checkpoint__every_steps=2)
    straight = _weights(_sft(tiny_model, synth_data, tmp_path / "a", **kw))
    _sft(tiny_model, synth_data, tmp_path / "b", max_steps=2, **kw)
    resumed = _weights(_sft(tiny_model, synth_data, tmp_path / "b", resume="latest", **kw))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def _most_gradients_alive(model: torch.nn.Module, optimizer_in_backward: bool) -> int:
    """The most parameters holding a gradient at any moment of one backward pass."""
    params = list(model.parameters())
    most = [0]

    def count(_):
        most[0] = max(most[0], sum(p.grad is not None for p in params))

    for p in params:  # registered first: runs before the optimizer's hook frees the gradient
        p.register_post_accumulate_grad_hook(count)
    if optimizer_in_backward:
        OptimizerInBackward(params, lambda one: torch.optim.AdamW(one, lr=1e-3))
    model(torch.randn(4, 16)).square().sum().backward()
    return most[0]


def test_never_holds_all_gradients():
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)])

    assert _most_gradients_alive(model(), False) == 12  # the usual backward ends with every gradient alive
    assert _most_gradients_alive(model(), True) == 1


def test_state_dict_round_trip():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)
    opt = OptimizerInBackward(net.parameters(), lambda one: torch.optim.AdamW(one, lr=1e-2))
    net(torch.randn(2, 4)).sum().backward()
    saved = opt.state_dict()
    assert len(saved["state"]) == 2 and saved["state"][0]["step"] == 1
    torch.manual_seed(0)
    net2 = torch.nn.Linear(4, 4)
    opt2 = OptimizerInBackward(net2.parameters(), lambda one: torch.optim.AdamW(one, lr=1e-2))
    opt2.load_state_dict(saved)
    opt2.param_groups[0]["lr"] = 0.5  # a scheduler writes here; the per-parameter optimizer must see it
    assert opt2.inner[0].param_groups[0]["lr"] == 0.5 and opt2.inner[0].state is opt2.state


@pytest.mark.parametrize("overrides,match", [
    ({}, "max_grad_norm"),
    ({"optimizer__max_grad_norm": "null", "gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ({"optimizer__max_grad_norm": "null", "distributed__strategy": "zero2"}, "several processes"),
])
def test_refusals_are_one_line(tiny_model, synth_data, tmp_path, overrides, match):
    cfg = tiny_train_config(tiny_model("cogvideox-2b"), synth_data, tmp_path, method="sft",
                            memory__optimizer_in_backward="true", **overrides)
    with pytest.raises(CogtuneError, match=match) as info:
        train(cfg)
    assert "\n" not in str(info.value)
