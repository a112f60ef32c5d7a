"""{output_dir}/loss.png: drawn from metrics.jsonl at each checkpoint and at the end; what is drawn is what was
logged."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from cogtune.train.loop import train
from cogtune.train.metrics import read_metrics
from cogtune.train.plot import loss_figure, write_loss_plot
from conftest import tiny_train_config


def test_the_figure_draws_the_logged_series(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-4 * s} for s in range(1, 6)]
    rows[2]["skipped"] = True  # a skipped step is not drawn
    rows += [{"step": 0, "heldout_loss": 0.9}, {"step": 5, "heldout_loss": 0.4}]
    lines = {line.get_label(): line for ax in loss_figure(rows).axes for line in ax.get_lines()}
    assert list(lines["loss"].get_xdata()) == [1, 2, 4, 5]
    np.testing.assert_allclose(lines["loss"].get_ydata(), [1.0, 0.5, 0.25, 0.2])
    assert list(lines["heldout_loss"].get_ydata()) == [0.9, 0.4] and "train_fixed_loss" not in lines
    np.testing.assert_allclose(lines["lr"].get_ydata(), [1e-4, 2e-4, 4e-4, 5e-4])
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = write_loss_plot(tmp_path / "m.jsonl", tmp_path / "loss.png")
    image = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    assert image.shape == (450, 800) and image.std() > 5  # drawn, not blank
    assert write_loss_plot(tmp_path / "missing.jsonl", tmp_path / "x.png") is None  # a warning, never an error


def test_a_run_leaves_its_plot(tiny_model, synth_data, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_train_config(tiny_model(), synth_data, out, checkpoint__every_steps=2))
    assert result.outputs["loss plot"] == out / "loss.png" and (out / "loss.png").stat().st_size > 0
    assert len([r for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]) == 4
