"""validation.holdout: clips set aside are never trained on. A run holding out 2 of 6 clips trains exactly as a run
on a dataset that lists only the other 4, and its heldout_loss is taken on the 2 set aside."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from cogtune.data.split import holdout_indices
from cogtune.errors import CogtuneError
from cogtune.train.loop import train
from cogtune.train.metrics import read_metrics
from conftest import tiny_train_config

pytestmark = pytest.mark.slow


def _lora(out):
    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))


def test_held_out_clips_are_never_trained_on(tiny_model, synth_data, tmp_path, capsys):
    model = tiny_model("cogvideox-5b")
    prompts = (synth_data / "prompts.txt").read_text().splitlines()
    videos = (synth_data / "videos.txt").read_text().splitlines()
    held = holdout_indices(len(videos), 2, seed=0)
    assert len(held) == 2
    cfg = tiny_train_config(model, synth_data, tmp_path / "held", max_steps=6, seed=0, validation__holdout=2,
                            validation__heldout_loss=True)
    train(cfg)
    printed = capsys.readouterr().out
    assert "; 2 held out (never trained on" in printed and "step 6: heldout_loss " in printed
    rows = read_metrics(tmp_path / "held" / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows if "heldout_loss" in r] == [0, 6] and not any("train_fixed_loss" in r for r in rows)

    kept = tmp_path / "kept"  # the same clips but the held-out two, in the same order
    kept.mkdir()
    shutil.copytree(synth_data / "videos", kept / "videos")
    (kept / "prompts.txt").write_text("\n".join(p for i, p in enumerate(prompts) if i not in held) + "\n")
    (kept / "videos.txt").write_text("\n".join(v for i, v in enumerate(videos) if i not in held) + "\n")
    train(tiny_train_config(model, kept, tmp_path / "kept_run", max_steps=6, seed=0))
    a, b = _lora(tmp_path / "held"), _lora(tmp_path / "kept_run")
    assert a.keys() == b.keys()
    for k in a:  # the same clips in the same order through the same code: equal to float round-off
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_share_and_the_limits(tiny_model, synth_data, tmp_path):
    assert holdout_indices(6, 0.34, seed=3) == holdout_indices(6, 2, seed=3)  # 0.34 × 6 rounds to 2
    assert holdout_indices(6, 0.01, seed=3) and len(holdout_indices(6, 0.01, seed=3)) == 1  # at least one clip
    assert holdout_indices(6, 0, seed=3) == []
    with pytest.raises(CogtuneError, match="leaving none to train on"):
        holdout_indices(6, 6, seed=0)
    with pytest.raises(CogtuneError, match="validation.holdout"):
        tiny_train_config(tiny_model("cogvideox-5b"), synth_data, tmp_path / "x", validation__holdout=2.5)
