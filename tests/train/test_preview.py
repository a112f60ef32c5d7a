"""`cogtune data preview`: the frames training will encode. Each preview frame must be, of all the source clip's
frames (decoded here with PyAV and scaled to cover the bucket, centre-cropped, with PIL), closest to the one the
index lists; and the index gives the bucket and the caption as encoded."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from PIL import Image

from cogtune.cli import main
from conftest import tiny_train_config

pytestmark = pytest.mark.slow


def decode(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def cover_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = frame.shape[:2]
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    img = np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR), dtype=np.float32)
    top, left = (img.shape[0] - height) // 2, (img.shape[1] - width) // 2
    return img[top:top + height, left:left + width]


def test_preview_frames_are_the_listed_source_frames(tiny_model, synth_data, tmp_path):
    import yaml

    cfg = tiny_train_config(tiny_model(), synth_data, tmp_path / "run", data__trigger="sks")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["data", "preview", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "p"), "--clips", "3"]) == 0
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    prompts = (synth_data / "prompts.txt").read_text().splitlines()
    assert len(index["clips"]) == 3 and index["clips_planned"] == len(prompts)
    for n, clip in enumerate(index["clips"]):
        frames, height, width = clip["bucket"]
        assert (frames, height, width) == (cfg.data.frames, cfg.data.height, cfg.data.width)
        assert clip["caption"] == f"sks, {prompts[n]}"
        shown = decode(tmp_path / "p" / f"{clip['name']}.mp4").astype(np.float32)
        assert shown.shape == (frames, height, width, 3)
        source = np.stack([cover_crop(f, height, width) for f in decode(clip["source"])])
        for k, listed in enumerate(clip["source_frames"]):
            distance = np.abs(source - shown[k]).mean(axis=(1, 2, 3))
            assert int(distance.argmin()) == listed, (clip["name"], k, listed, distance.round(2))
            assert distance[listed] < 6  # H.264 at crf 18 and a different resize filter, out of 255
        assert (tmp_path / "p" / f"{clip['name']}.png").stat().st_size > 0


def test_interpolated_frames_are_listed_as_blends(tiny_model, synth_data, tmp_path):
    import yaml

    cfg = tiny_train_config(tiny_model(), synth_data, tmp_path / "run", data__frames=33,
                            data__short_clips="interpolate")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["data", "preview", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "p"), "--clips", "1"]) == 0
    listed = json.loads((tmp_path / "p" / "index.json").read_text())["clips"][0]["source_frames"]
    blends = [f for f in listed if isinstance(f, dict)]
    assert len(listed) == 33 and blends and all(0 < b["weight"] < 1 and b["to"] == b["from"] + 1 for b in blends)
