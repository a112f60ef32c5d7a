"""Still images trained beside videos in one run (data.datasets): planned into one-frame buckets of their own,
cached, named per bucket in the summary, previewed, and resumed exactly; refused by a variant that takes none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from cogtune.cli import main
from cogtune.config import load_config
from cogtune.models import load_spec
from cogtune.train.encode import plan_data, prepare_data
from cogtune.train.loop import train


def write_stills(root):
    """Three captioned images of other sizes and formats than the training size: each is covered and cropped."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, (h, w) in (("wide.png", (40, 80)), ("tall.jpg", (96, 64)), ("big.webp", (64, 96))):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / name)
        (root / name).with_suffix(".txt").write_text(f"a painting, {name.split('.')[0]}\n")
    return root


@pytest.fixture(scope="module")
def stills(tmp_path_factory):
    return write_stills(tmp_path_factory.mktemp("stills") / "stills")


def _config(model, videos, stills, out, **extra):
    tree = {"model": {"path": str(model)}, "output_dir": str(out), "max_steps": 4, "mixed_precision": "no",
            "batch_size": 2, "lora": {"rank": 4, "alpha": 4}, "optimizer": {"lr": 1e-3},
            "validation": {"heldout_loss": False},
            "data": {"datasets": [{"root": str(videos), "name": "clips"},
                                  {"root": str(stills), "name": "stills", "trigger": "sks"}],
                     "cache_dir": str(out.parent / "cache")}}
    return load_config(None, base=tree | extra)


def test_images_plan_into_one_frame_buckets_beside_the_videos(tiny_model, synth_data, stills, tmp_path):
    cfg = _config(tiny_model(), synth_data, stills, tmp_path / "run")
    data = prepare_data(load_spec(cfg.model.path), cfg, progress=False)
    assert data.names == ["clips"] * 6 + ["stills"] * 3
    assert data.buckets == [(32, 48, 9)] * 6 + [(32, 48, 1)] * 3
    latents = [data.dataset[i]["latent_mean"].shape for i in (0, 6)]
    assert latents == [(16, 3, 4, 6), (16, 1, 4, 6)]  # 9 frames → 3 latent frames; an image → 1
    assert data.dataset.items[6].caption == "sks, a painting, big"


@pytest.mark.slow
def test_a_mixed_run_summarises_images_per_bucket_and_resumes_exactly(tiny_model, synth_data, stills, tmp_path,
                                                                      capsys):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(
        _config(tiny_model(), synth_data, stills, tmp_path / "straight").model_dump(mode="json")))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "datasets clips: 6 clips (9×32×48: 6); stills: 3 clips (1×32×48: 3 images)" in printed
    assert "9 clips planned (3 of them still images, 1 frame each), 0 skipped" in printed
    train(_config(tiny_model(), synth_data, stills, tmp_path / "split", max_steps=2, checkpoint={"every_steps": 2}))
    train(_config(tiny_model(), synth_data, stills, tmp_path / "split", resume="latest"))
    a = load_file(str(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same steps, same CPU: identical


def test_1_5_trains_an_image_as_one_padded_latent_frame(tiny_model, stills, tmp_path):
    cfg = load_config(None, base={"model": {"path": str(tiny_model("cogvideox1.5-5b"))}, "output_dir": str(
        tmp_path / "run"), "max_steps": 2, "mixed_precision": "no", "lora": {"rank": 4, "alpha": 4},
        "validation": {"heldout_loss": False}, "data": {"root": str(stills), "cache_dir": str(tmp_path / "c")}})
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows
                                                                       if "loss" in r)


def test_a_variant_that_takes_no_stills_skips_them_with_its_reason(tiny_model, synth_data, stills, tmp_path):
    cfg = _config(tiny_model("cogvideox-5b-i2v"), synth_data, stills, tmp_path / "run")
    from cogtune.models import resolve_variant

    planned = plan_data(resolve_variant(cfg.model.path), cfg)
    assert len(planned.items) == 6 and len(planned.skipped) == 3
    assert all("takes no still images: image-to-video models condition on the sample's first frame" in s
               for s in planned.skipped)


def test_preview_writes_an_image_as_its_one_frame(tiny_model, stills, tmp_path):
    tree = {"model": {"path": str(tiny_model())}, "output_dir": str(tmp_path / "run"),
            "data": {"root": str(stills), "crop": "center"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    assert main(["data", "preview", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "p")]) == 0
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    assert [(c["listed"], c["bucket"], c["source_frames"], c["kind"]) for c in index["clips"]] == [
        (n, [1, 32, 48], [0], "image") for n in ("big.webp", "tall.jpg", "wide.png")]
    assert all((tmp_path / "p" / f"{c['name']}.png").is_file() for c in index["clips"])


def test_data_check_with_the_config_flags_images_its_model_refuses(tiny_model, stills, tmp_path, capsys):
    tree = {"model": {"path": str(tiny_model("cogvideox-5b-i2v"))}, "data": {"root": str(stills)}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    assert main(["data", "check", "--config", str(tmp_path / "run.yaml"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("no-stills: cogvideox-5b-i2v takes no still images") == 3
    assert "3 clips (3 of them images): 0 ok, 3 with problems (3 unusable)" in out
    tree["model"]["path"] = str(tiny_model())  # a model that takes them
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    assert main(["data", "check", "--config", str(tmp_path / "run.yaml"), "--workers", "1"]) == 0
    assert "no-stills" not in capsys.readouterr().out


def test_a_broken_image_and_a_one_frame_video_are_skipped_with_their_reasons(tiny_model, tmp_path):
    from cogtune.data.video import write_mp4

    folder = write_stills(tmp_path / "stills")
    (folder / "cut.png").write_bytes((folder / "wide.png").read_bytes()[:150])  # header fine, pixels cut short
    (folder / "cut.txt").write_text("cut short\n")
    write_mp4(np.zeros((1, 32, 48, 3), np.uint8), folder / "one.mp4", 8)  # one frame is the images' rule only
    (folder / "one.txt").write_text("a one-frame video\n")
    cfg = load_config(None, base={"model": {"path": str(tiny_model())}, "output_dir": str(tmp_path / "run"),
                                  "data": {"root": str(folder), "cache_dir": str(tmp_path / "c")}})
    data = prepare_data(load_spec(cfg.model.path), cfg, progress=False)
    assert data.buckets == [(32, 48, 1)] * 3
    skipped = dict(s.split(": ", 1) for s in data.skipped)
    assert skipped["one.mp4"].startswith("clip has 1 frames but 9 are needed")
    assert "not a readable image" in skipped["cut.png"]
