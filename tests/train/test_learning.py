"""Learning happens: the fixed-point loss (fixed clips, latents, noise and timesteps) falls clearly during training."""

from __future__ import annotations

import pytest

from cogtune.train.loop import train
from cogtune.train.metrics import read_metrics
from conftest import tiny_train_config

pytestmark = pytest.mark.slow


def test_fixed_point_loss_falls(tiny_model, synth_data, tmp_path):
    cfg = tiny_train_config(
        tiny_model("cogvideox-5b"), synth_data, tmp_path / "run", max_steps=60, optimizer__lr=5e-3,
        lora__rank=16, lora__alpha=16, validation__heldout_loss=True, validation__every_steps=20,
    )
    train(cfg)
    rows = read_metrics(tmp_path / "run" / "logs" / "metrics.jsonl")
    # no validation.holdout: the fixed-point loss is on training clips, and named so
    assert not any("heldout_loss" in r for r in rows)
    heldout = [(r["step"], r["train_fixed_loss"]) for r in rows if "train_fixed_loss" in r]
    assert [s for s, _ in heldout] == [0, 20, 40, 60]
    before, after = heldout[0][1], heldout[-1][1]
    # The fixed-point loss is deterministic (same clips, latents, noise, timesteps), so any drop is the weights'
    # doing, not sampling noise. 15% is far beyond float round-off yet the tiny model reaches ~27% within 60 steps.
    assert after < 0.85 * before, heldout
    train_steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_steps] == list(range(1, 61))
    assert all({"loss", "lr", "step"} <= r.keys() for r in train_steps)
