"""The checkpoint converters and a 5B-I2V full fine-tune trained with model.drop_learned_positions: the weights hold
no learned positional table, so the folder written says so in its config.json (diffusers then builds the table-less
model by itself), where the base's config would describe a table the checkpoint lacks.

The checkpoint is a real torch.distributed.checkpoint save of the run's weights in the layout cogtune's fsdp2 runs
write (`{"model": ...}` under `checkpoint-N/sharded/`), made in one process; `convert zero` shares the same check
(export/to_diffusers.py `fit_base`)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from cogtune.cli import main
from cogtune.train.loop import train
from conftest import tiny_train_config

pytestmark = pytest.mark.slow


def _weights(folder):
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_a_checkpoint_without_the_table_converts_to_a_config_without_it(tiny_model, synth_data, tmp_path, capsys):
    model = tiny_model("cogvideox-5b-i2v")
    cfg = tiny_train_config(model, synth_data, tmp_path / "run", method="sft", data__height=48, data__width=64,
                            max_steps=1, model__drop_learned_positions="true")
    train(cfg)
    saved = _weights(tmp_path / "run" / "transformer")
    assert "patch_embed.pos_embedding" not in saved
    ckpt = tmp_path / "checkpoint-1"
    dcp.save({"model": {k: v.clone() for k, v in saved.items()}}, checkpoint_id=str(ckpt / "sharded"), no_dist=True)

    out = tmp_path / "converted"
    assert main(["convert", "fsdp", str(ckpt), str(out), "--base", str(model)]) == 0
    assert json.loads((out / "config.json").read_text())["use_learned_positional_embeddings"] is False
    ours = _weights(out)
    assert ours.keys() == saved.keys() and all(torch.equal(ours[k], saved[k].float()) for k in ours)

    # a checkpoint that lacks something else still does not fit, in one line
    broken = tmp_path / "checkpoint-2"
    dcp.save({"model": {k: v.clone() for k, v in saved.items() if "norm_out" not in k}},
             checkpoint_id=str(broken / "sharded"), no_dist=True)
    capsys.readouterr()
    assert main(["convert", "fsdp", str(broken), str(tmp_path / "x"), "--base", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit the base model" in err, err
