"""data.datasets: several datasets in one run, each with its own repeats, frames and trigger word; planned, cached,
sampled and resumed as one."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cogtune.cli import main
from cogtune.config import load_config
from cogtune.models import load_spec
from cogtune.train.encode import prepare_data
from cogtune.train.loop import train
from cogtune.train.setup import dataset_mix


def _split(synth_data, root):
    """Two official-layout datasets: the first three clips and the last three."""
    prompts = (synth_data / "prompts.txt").read_text().splitlines()
    videos = (synth_data / "videos.txt").read_text().splitlines()
    for name, part in (("a", slice(0, 3)), ("b", slice(3, 6))):
        (root / name).mkdir(parents=True)
        for v in videos[part]:
            (root / name / v).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(synth_data / v, root / name / v)
        (root / name / "prompts.txt").write_text("\n".join(prompts[part]) + "\n")
        (root / name / "videos.txt").write_text("\n".join(videos[part]) + "\n")
    return prompts


def _config(model, root, out, **extra):
    tree = {"model": {"path": str(model)}, "output_dir": str(out), "max_steps": 4, "mixed_precision": "no",
            "lora": {"rank": 4, "alpha": 4}, "optimizer": {"lr": 1e-3}, "validation": {"heldout_loss": False},
            "data": {"datasets": [{"root": str(root / "a"), "frames": 17},
                                  {"root": str(root / "b"), "name": "style", "repeats": 2, "trigger": "sks"}],
                     "cache_dir": str(root / "cache")}}
    for key, value in extra.items():
        tree[key] = value
    return load_config(None, base=tree)


@pytest.fixture(scope="module")
def split(synth_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return root, _split(synth_data, root)


def test_each_dataset_keeps_its_settings_and_repeats(tiny_model, split):
    root, prompts = split
    cfg = _config(tiny_model(), root, root / "run")
    data = prepare_data(load_spec(cfg.model.path), cfg, progress=False)
    assert data.names == ["a"] * 3 + ["style"] * 3
    assert [data.dataset.items[i].caption for i in range(6)] == prompts[:3] + [f"sks, {p}" for p in prompts[3:]]
    assert [b[2] for b in data.buckets] == [17] * 3 + [9] * 3  # a's own frames; style the model's native 9
    mix = dataset_mix(cfg, data.names, data.buckets, [])
    counts = Counter(mix.items(0))  # what the sampler draws from in an epoch
    assert [counts[i] for i in range(6)] == [1, 1, 1, 2, 2, 2] and mix.items(1) == mix.items(0)


@pytest.mark.slow
def test_the_summary_names_every_dataset_and_resume_is_exact(tiny_model, split, tmp_path, capsys):
    root, _ = split
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_config(tiny_model(), root, tmp_path / "straight")
                                                      .model_dump(mode="json")))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "datasets a: 3 clips (17×32×48: 3); style: 3 clips ×2 (9×32×48: 3)" in printed
    assert "≈ 0.4 epochs" in printed  # 4 steps of 1 clip over 3 + 2 × 3 clip appearances
    train(_config(tiny_model(), root, tmp_path / "split", max_steps=2, checkpoint={"every_steps": 2}))
    train(_config(tiny_model(), root, tmp_path / "split", resume="latest"))
    a = load_file(str(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same steps, same CPU: identical


def test_data_check_reports_every_dataset(tiny_model, split, tmp_path, capsys):
    root, _ = split
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_config(tiny_model(), root, tmp_path / "x")
                                                      .model_dump(mode="json")))
    assert main(["data", "check", "--config", str(tmp_path / "run.yaml"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("3 clips: 3 ok") == 2 and f"dataset a ({root / 'a'})" in out and "dataset style" in out


def test_root_and_datasets_are_one_or_the_other(tiny_model, split):
    from cogtune.errors import CogtuneError

    root, _ = split
    with pytest.raises(CogtuneError, match="give data.root .* or data.datasets .*not both"):
        load_config(None, base={"model": {"path": "m"}, "data": {"root": "x", "datasets": [{"root": "y"}]}})
    with pytest.raises(CogtuneError, match="one of them"):
        load_config(None, base={"model": {"path": "m"}, "data": {}})


@pytest.mark.slow
def test_a_heldout_dataset_is_never_trained_on(tiny_model, split, tmp_path):
    from cogtune.train.metrics import read_metrics

    root, _ = split
    sets = [{"root": str(root / "a"), "frames": 17}, {"root": str(root / "b"), "name": "style", "heldout": True}]
    held = _config(tiny_model(), root, tmp_path / "held", validation={"heldout_loss": True})
    held.data.datasets = load_config(None, base={"model": {"path": "m"}, "data": {"datasets": sets}}).data.datasets
    train(held)
    rows = read_metrics(tmp_path / "held" / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows if "heldout_loss" in r] == [0, 4]
    alone = _config(tiny_model(), root, tmp_path / "alone")
    alone.data.datasets = alone.data.datasets[:1]  # dataset a only: what the held-out run may train on
    train(alone)
    a = load_file(str(tmp_path / "held" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "alone" / "lora" / "pytorch_lora_weights.safetensors"))
    for k in a:  # the same clips in the same order through the same code: equal to float round-off
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
