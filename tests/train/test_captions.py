"""Captions as training encodes them: a trigger word in every caption (recorded for users), and caption dropout
(the empty caption's encodings in place of a sample's own, drawn per sample and step from the seed)."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

from cogtune.data.captions import with_trigger
from cogtune.models import load_spec
from cogtune.train.encode import collate, prepare_data
from cogtune.train.loop import drop_captions, train
from conftest import tiny_train_config


def test_the_trigger_goes_where_the_caption_asks_else_in_front():
    assert with_trigger("a dog runs", "sks") == "sks, a dog runs"
    assert with_trigger("a photo of [trigger] running", "sks") == "a photo of sks running"
    assert with_trigger("", "sks") == "sks"
    assert with_trigger("a dog runs", None) == "a dog runs"


@pytest.fixture(scope="module")
def prepared(tiny_model, synth_data, tmp_path_factory):
    cfg = tiny_train_config(tiny_model(), synth_data, tmp_path_factory.mktemp("cap") / "run", data__trigger="sks",
                            data__caption_dropout=0.5, data__cache_dir=str(tmp_path_factory.mktemp("cache")))
    spec = load_spec(cfg.model.path)
    return cfg, spec, prepare_data(spec, cfg, progress=False)


def test_the_cached_encodings_are_of_the_triggered_captions(prepared, synth_data):
    _, spec, data = prepared
    prompts = (synth_data / "prompts.txt").read_text().splitlines()
    assert [it.caption for it in data.dataset.items] == [f"sks, {p}" for p in prompts]
    for i in (0, len(prompts) - 1):
        want = spec.encode_prompts([f"sks, {prompts[i]}"])
        for key, value in want.items():  # encoded alone here, in a batch of captions by the cache
            torch.testing.assert_close(data.dataset[i][key], value[0], rtol=1e-5, atol=1e-5)
    for key, value in spec.encode_prompts([""]).items():
        torch.testing.assert_close(data.dataset.empty_prompt[key], value[0], rtol=1e-5, atol=1e-5)


def test_dropout_swaps_in_the_empty_caption_at_its_rate(prepared):
    _, _, data = prepared
    empty = data.dataset.empty_prompt
    dropped = total = 0
    for step in range(400):
        batch = collate([data.dataset[i] for i in range(5)], torch.device("cpu"))
        before = {k: batch[k].clone() for k in empty}
        drop_captions(batch, empty, 0.3, seed=7, step=step, first=5 * step)
        for i in range(5):
            gone = all(torch.equal(batch[k][i], empty[k]) for k in empty)
            kept = all(torch.equal(batch[k][i], before[k][i]) for k in empty)
            assert gone != kept  # each sample is wholly one or the other
            dropped, total = dropped + gone, total + 1
    # 2000 draws at p = 0.3: standard deviation sqrt(0.3 * 0.7 / 2000) = 0.010; the draws are fixed by the seeds
    assert abs(dropped / total - 0.3) < 0.04
    again = collate([data.dataset[i] for i in range(5)], torch.device("cpu"))
    drop_captions(again, empty, 0.3, seed=7, step=399, first=5 * 399)
    assert all(torch.equal(again[k], batch[k]) for k in empty)  # the same (seed, step, position): the same draw


@pytest.mark.slow
def test_a_run_records_its_trigger(prepared, tmp_path):
    cfg, _, _ = prepared
    cfg = cfg.model_copy(update={"output_dir": tmp_path / "run"})
    result = train(cfg)
    with safe_open(str(result.outputs["lora"]), framework="pt") as f:
        assert f.metadata()["cogtune.trigger"] == "sks"
    card = ModelCard.load(tmp_path / "run" / "lora" / "README.md")
    assert card.data.instance_prompt == "sks" and "Trigger word: `sks`" in card.text
