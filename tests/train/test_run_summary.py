"""The summary printed before the first step states what the run will do, in numbers derived here independently."""

from __future__ import annotations

import re

import pytest
from safetensors.torch import load_file

from cogtune.cli import main
from conftest import tiny_train_config

pytestmark = pytest.mark.slow


def test_summary_states_the_run(tiny_model, synth_data, tmp_path, capsys):
    import yaml

    cfg = tiny_train_config(tiny_model("cogvideox-5b"), synth_data, tmp_path / "run", max_steps=3,
                            gradient_accumulation_steps=2, lora__rank=4, lora__alpha=2,
                            memory__gradient_checkpointing=True, checkpoint__every_steps=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    lora = load_file(str(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    trainable = sum(t.numel() for t in lora.values())  # what trained is exactly what was saved
    clips = len((synth_data / "videos.txt").read_text().split())
    assert re.search(rf"LoRA rank 4, alpha 2 on .*: {trainable / 1e3:.1f}k of ", text), text
    assert f"data    {clips} clips planned, 0 skipped" in text
    size = f"{cfg.data.frames}×{cfg.data.height}×{cfg.data.width}: {clips}"
    assert size in text
    assert f"steps   3, 2 clips each (batch 1 × accumulation 2 × 1 process) ≈ {3 * 2 / clips:.1f} epochs" in text
    assert "memory  gradient_checkpointing;" in text and "checkpoint-N/ every 2 steps" in text


def test_two_runs_in_one_process(tiny_model, synth_data, tmp_path, capsys):
    """A notebook or script may cache in bf16, then train in fp32, in one Python process."""
    import yaml

    for i, (command, precision) in enumerate([("data cache", "bf16"), ("train", "no"), ("train", "bf16")]):
        cfg = tiny_train_config(tiny_model("cogvideox-2b"), synth_data, tmp_path / f"run{i}", max_steps=1,
                                mixed_precision=precision)
        config = tmp_path / f"run{i}.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        assert main([*command.split(), str(config)]) == 0, capsys.readouterr().err


def test_memory_forecast_warns_before_a_run_that_will_not_fit(tiny_model, synth_data, tmp_path):
    from cogtune.plan import GiB, plan_memory
    from cogtune.train.summary import memory_forecast

    cfg = tiny_train_config(tiny_model("cogvideox-5b"), synth_data, tmp_path / "run")
    peak = plan_memory(cfg, world_size=1, device="cuda", propose=False).total
    line, fits = memory_forecast(cfg, 1, int(80 * GiB))
    assert fits and f"predicted peak {peak / GiB:.1f} GiB" in line and "80.0 GiB" in line
    line, fits = memory_forecast(cfg, 1, int(peak * 0.9))  # a GPU smaller than the peak
    assert not fits and "run out of memory" in line and "cogtune plan" in line


def test_unset_frames_and_size_are_the_variants_native(tiny_model, synth_data, tmp_path, capsys):
    """No data.frames/height/width: the model's native shape (a tiny model's is its own small one), said in the
    summary, recorded in config.yaml, and the same run as one that names that shape."""
    import yaml

    from cogtune.models import resolve_variant

    model = tiny_model("cogvideox1.5-5b")
    native = resolve_variant(model)
    cfg = tiny_train_config(model, synth_data, tmp_path / "run", max_steps=2)
    tree = cfg.model_dump(mode="json")
    for key in ("frames", "height", "width"):
        del tree["data"][key]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    text = capsys.readouterr().out
    shape = f"{native.native_frames}×{native.native_height}×{native.native_width}"
    assert f"{shape}: " in text and "native frames/height/width: data.frames, data.height, data.width not set" in text
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert (saved["frames"], saved["height"], saved["width"]) == (native.native_frames, native.native_height,
                                                                  native.native_width)
    named = tmp_path / "named.yaml"
    named.write_text(yaml.safe_dump(tree | {"data": {**tree["data"], **{k: saved[k] for k in ("frames", "height",
                                                                                               "width")}},
                                            "output_dir": str(tmp_path / "named")}))
    assert main(["train", str(named)]) == 0
    a, b = (load_file(str(tmp_path / d / "lora" / "pytorch_lora_weights.safetensors")) for d in ("run", "named"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # same code path and seed: identical


def test_the_planner_prices_the_native_shape_of_an_unset_config():
    from cogtune.config import load_config
    from cogtune.plan.memory import plan_memory

    base = {"model": {"path": "/nonexistent", "variant": "cogvideox1.5-5b"}, "data": {"root": "/d"}}
    unset = plan_memory(load_config(None, base=base))
    named = plan_memory(load_config(None, ["data.frames=81", "data.height=768", "data.width=1360"], base=base))
    assert unset.tokens == named.tokens and unset.total == named.total
    assert unset.tokens != plan_memory(load_config(None, ["data.frames=49", "data.height=480", "data.width=720"],
                                                   base=base)).tokens
