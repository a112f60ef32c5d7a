"""The done-when run of data.datasets: two video folders and an image folder in one run, with a weight, repeats, a
trigger word, per-dataset sampling/fps/crop and shuffled tags. It trains, resumes exactly, gives on 2 processes the
losses of 1 process with gradient accumulation, and its `data preview` frames are the listed source frames as
PyAV decodes them; `data check --config` and the run summary describe every dataset.

Why the losses can be compared at all: which clip fills each slot of an epoch is a function of (seed, epoch)
(data/mixing.py), and a sample's noise, timestep and tag order of (seed, step, position in the global batch); so
the interrupted and the two-process runs see the same clips, captions and noise as the straight one. Resume is
compared at 1e-6 (the same arithmetic on the same CPU), 2 vs 1 processes at 1e-4 (an all-reduce of two half
gradients against an accumulated sum, ~1e-7 relative per step; a wrong clip moves the loss by percents). The tiny
random transformer barely listens to its text: another tag order moves its loss by ~4e-6 relative (measured), which
these tolerances cannot see, so the tag order a sample gets is checked where it is drawn
(test_dataset_overrides.py: the same seed, step and position give the same cached order); it takes the position in
the global batch the noise takes, which the two-process comparison here does check.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from cogtune.cli import main
from test_distributed import assert_ok, losses
from test_distributed import cogtune as run_cogtune
from test_preview import cover_crop, decode
from test_several_datasets import _split

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def _stills(root):
    """Three captioned images with tags, smooth (a resize filter changes them little) and larger than 32x48."""
    root.mkdir(parents=True)
    y, x = np.mgrid[0:64, 0:96]
    for n, name in enumerate(("sun.png", "sea.jpg", "hill.png")):
        pixels = np.stack([x * 2 + 20 * n, y * 3, 200 - (x + y) * (1 + n) // 2], -1)  # ramps, no edges
        Image.fromarray(pixels.astype(np.uint8)).save(root / name, quality=95)
        (root / name).with_suffix(".txt").write_text(f"painting, {name[:-4]}, warm light, wide\n")


@pytest.fixture(scope="module")
def mixed(tiny_model, synth_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    _split(synth_data, root)
    _stills(root / "stills")
    tree = {"model": {"path": str(tiny_model())}, "max_steps": 6, "mixed_precision": "no", "batch_size": 1,
            "lora": {"rank": 4, "alpha": 4}, "optimizer": {"lr": 1e-3}, "validation": {"heldout_loss": False},
            "data": {"cache_dir": str(root / "cache"), "datasets": [
                {"root": str(root / "a"), "name": "walks", "weight": 0.1, "sampling": "fps", "target_fps": 6,
                 "short_clips": "pad_last"},
                {"root": str(root / "b"), "name": "style", "repeats": 2, "trigger": "sks", "sampling": "head"},
                {"root": str(root / "stills"), "name": "stills", "trigger": "sks", "shuffle_tags": True,
                 "keep_tokens": 1, "tag_variants": 3}]}}
    (root / "run.yaml").write_text(yaml.safe_dump(tree))
    return root / "run.yaml"


def test_the_mixed_run_trains_resumes_exactly_and_matches_two_processes(mixed, tmp_path):
    # 10 slots an epoch (style 3 x 2 + stills 3 = 9, walks 0.1 of it: 1), 12 samples: walks' slot changes clip
    # in the second epoch, after the resume at step 3
    straight = run_cogtune(mixed, "gradient_accumulation_steps=2", f"output_dir={tmp_path / 'straight'}")
    assert_ok(straight)
    assert ("datasets walks: 3 clips, weight 0.1: 1 of 10 per epoch (9×32×48: 3); style: 3 clips ×2 (9×32×48: 3); "
            "stills: 3 clips (1×32×48: 3 images)") in straight.stdout
    assert ("frames  walks: fps sampling at 6 fps (window center), short clips pad_last, crop center; style: head "
            "sampling, short clips skip, crop center; stills: uniform sampling, short clips skip, crop center, "
            "tags shuffled (3 orders, first 1 kept)") in straight.stdout
    want = losses(tmp_path / "straight")
    assert sorted(want) == list(range(1, 7))

    common = [mixed, "gradient_accumulation_steps=2", f"output_dir={tmp_path / 'split'}"]
    assert_ok(run_cogtune(*common, "max_steps=3", "checkpoint.every_steps=3"))
    assert_ok(run_cogtune(*common, "resume=latest"))
    split = losses(tmp_path / "split")
    assert all(split[s] == pytest.approx(want[s], rel=1e-6, abs=1e-7) for s in want), (split, want)

    two = run_cogtune(mixed, f"output_dir={tmp_path / 'two'}", nproc=2)
    assert_ok(two)
    got = losses(tmp_path / "two")
    assert sorted(got) == sorted(want) and all(got[s] == pytest.approx(want[s], rel=1e-4) for s in want), (got, want)


def test_preview_shows_every_dataset_as_pyav_decodes_its_listed_frames(mixed, tmp_path, capsys):
    assert main(["data", "preview", str(mixed), "--out", str(tmp_path / "p"), "--clips", "2"]) == 0
    clips = json.loads((tmp_path / "p" / "index.json").read_text())["clips"]
    assert [c["dataset"] for c in clips] == ["walks"] * 2 + ["style"] * 2 + ["stills"] * 2
    assert [c["fps"] for c in clips[:4]] == [6, 6, 8, 8]  # walks' own fps; style at the model's
    assert [c["source_frames"] for c in clips[2:4]] == [list(range(9))] * 2  # style samples the head
    assert clips[0]["frames_from"]["target_fps"] == 6 and clips[4]["frames_from"] == {"crop": "center"}
    assert clips[4]["caption"].startswith("sks, painting, ") and all(
        o.startswith("sks, painting, ") for o in clips[4]["tag_orders"]) and len(clips[4]["tag_orders"]) == 3
    for clip in clips:
        frames, height, width = clip["bucket"]
        shown = decode(tmp_path / "p" / f"{clip['name']}.mp4").astype(np.float32)
        assert shown.shape == (frames, height, width, 3) and frames == (1 if clip["kind"] == "image" else 9)
        source = np.stack([cover_crop(f, height, width) for f in decode(clip["source"])])  # PyAV, images too
        for k, listed in enumerate(clip["source_frames"]):
            distance = np.abs(source - shown[k]).mean(axis=(1, 2, 3))
            assert int(distance.argmin()) == listed, (clip["name"], k, listed, distance.round(2))
            assert distance[listed] < 6, (clip["name"], distance[listed])  # H.264 at crf 18 and another resize filter, out of 255


def test_data_check_describes_every_dataset(mixed, capsys):
    assert main(["data", "check", "--config", str(mixed), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    for line in ("dataset walks (", "): weight 0.1; fps sampling at 6 fps (window center), short clips pad_last",
                 "dataset style (", "): repeats 2; head sampling, short clips skip, crop center; trigger sks",
                 "dataset stills (", "tags shuffled (3 orders, first 1 kept); trigger sks", "3 clips (3 of them images)"):
        assert line in out, line
    assert out.count("3 clips: 3 ok") == 2
