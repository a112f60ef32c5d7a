"""Fast CPU tests of cogtune.data: decode, frame sampling, resize/crop, mp4 writing, synth dataset, official layout."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cogtune.data.dataset import VideoClips
from cogtune.data.sources import load_dataset, load_official
from cogtune.data.synth import DIRECTIONS, SYNTH_WORDS, write_synth_dataset
from cogtune.data.video import frame_indices, load_clip, probe, read_frames, resize_crop, write_mp4
from cogtune.errors import CogtuneError

STEP = 8  # grey level per frame index: coarse enough to survive H.264


def indexed_clip(path: Path, n: int = 30, fps: float = 12) -> Path:
    """Frame i is a solid grey of level i * STEP."""
    frames = np.stack([np.full((64, 64, 3), i * STEP, np.uint8) for i in range(n)])
    return write_mp4(frames, path, fps)


def decoded_index(frames: np.ndarray) -> list[int]:
    return [round(float(f.mean()) / STEP) for f in frames]


def test_frame_indices() -> None:
    assert frame_indices(30, 9) == [round(i * 29 / 8) for i in range(9)]
    assert frame_indices(30, 9)[0] == 0 and frame_indices(30, 9)[-1] == 29
    assert frame_indices(17, 17) == list(range(17))
    assert frame_indices(30, 5, "head") == [0, 1, 2, 3, 4]
    assert frame_indices(30, 1) == [0]
    r = frame_indices(30, 5, "random", np.random.default_rng(0))
    assert r == list(range(r[0], r[0] + 5)) and 0 <= r[0] <= 25
    with pytest.raises(CogtuneError, match="clip has 10 frames but 17 are needed"):
        frame_indices(10, 17)
    with pytest.raises(CogtuneError, match="unknown frame sampling mode"):
        frame_indices(30, 5, "middle")


@pytest.mark.parametrize("mode", ["uniform", "head"])
def test_read_frames_picks_the_right_frames(tmp_path: Path, mode: str) -> None:
    path = indexed_clip(tmp_path / "idx.mp4", n=30)
    idx = frame_indices(probe(path).frames, 9, mode)
    frames = read_frames(path, idx)
    assert frames.shape == (9, 64, 64, 3) and frames.dtype == np.uint8
    assert decoded_index(frames) == idx


def test_read_frames_any_order_and_errors(tmp_path: Path) -> None:
    path = indexed_clip(tmp_path / "idx.mp4", n=20)
    assert decoded_index(read_frames(path, [5, 2, 5, 19])) == [5, 2, 5, 19]
    with pytest.raises(CogtuneError, match=r"idx\.mp4 decodes to 20 frames but frame 20 is needed"):
        read_frames(path, [0, 20])
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(CogtuneError, match="bad.mp4"):
        probe(bad)
    with pytest.raises(CogtuneError, match="missing.mp4"):
        probe(tmp_path / "missing.mp4")


def test_resize_crop_keeps_aspect() -> None:
    # 2:1 frame, left half black, right half white. Cover-scaling to 16x16 gives 16x32 (half black = 16 columns);
    # the centre crop takes columns 8..23, so 16 - 8 = 8 of its 16 columns are black.
    x = np.zeros((2, 32, 64, 3), np.uint8)
    x[:, :, 32:] = 255
    out = resize_crop(x, 16, 16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    assert int((out[0, :, :, 0].mean(0) < 128).sum()) == 8
    # Left quarter black: after scaling the black is columns 0..7, all outside the centre crop; stretch keeps 4.
    x = np.full((1, 32, 64, 3), 255, np.uint8)
    x[:, :, :16] = 0
    assert int((resize_crop(x, 16, 16)[0, :, :, 0].mean(0) < 128).sum()) == 0
    assert int((resize_crop(x, 16, 16, "stretch")[0, :, :, 0].mean(0) < 128).sum()) == 4


def test_resize_crop_circle_stays_round() -> None:
    yy, xx = np.mgrid[0:48, 0:96]
    disc = ((yy - 23.5) ** 2 + (xx - 47.5) ** 2 <= 16**2).astype(np.uint8) * 255
    x = np.repeat(disc[None, :, :, None], 3, axis=3)
    out = resize_crop(x, 32, 32)[0, :, :, 0] > 127
    rows, cols = np.nonzero(out)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(height - width) <= 1 and abs(height - 2 * 16 * 32 / 48) <= 2
    stretched = resize_crop(x, 32, 32, "stretch")[0, :, :, 0] > 127
    rows, cols = np.nonzero(stretched)
    assert (rows.max() - rows.min()) > 1.5 * (cols.max() - cols.min())  # distorted, as asked


def test_resize_crop_random_is_seeded() -> None:
    x = np.random.default_rng(0).integers(0, 256, (3, 40, 90, 3), dtype=np.uint8)
    a = resize_crop(x, 20, 20, "random", np.random.default_rng(1))
    b = resize_crop(x, 20, 20, "random", np.random.default_rng(1))
    assert a.shape == (3, 20, 20, 3) and np.array_equal(a, b)
    with pytest.raises(CogtuneError, match="unknown crop mode"):
        resize_crop(x, 20, 20, "zoom")


def test_write_mp4_probe_round_trip(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (20, 48, 80, 3), dtype=np.uint8)
    path = write_mp4(frames, tmp_path / "sub" / "a.mp4", fps=12)
    info = probe(path)
    assert (info.frames, info.fps, info.width, info.height) == (20, 12.0, 80, 48)
    assert info.codec == "h264" and info.pix_fmt == "yuv420p"
    assert info.duration == pytest.approx(20 / 12, abs=0.05)
    assert [p.name for p in path.parent.iterdir()] == ["a.mp4"]  # no temp file left behind
    # float [-1, 1] torch [F, 3, H, W], odd size padded to even
    clip = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 3, 33, 47)
    info = probe(write_mp4(clip, tmp_path / "b.mp4", fps=8.5))
    assert (info.frames, info.fps, info.width, info.height) == (5, 8.5, 48, 34)
    levels = read_frames(tmp_path / "b.mp4", list(range(5))).reshape(5, -1).mean(1)
    assert np.allclose(levels, [0, 63.75, 127.5, 191.25, 255], atol=3)


def test_load_clip(tmp_path: Path) -> None:
    path = indexed_clip(tmp_path / "idx.mp4", n=30)
    clip = load_clip(path, 17, 32, 48)
    assert clip.shape == (17, 3, 32, 48) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    grey = ((clip.mean(dim=(1, 2, 3)) + 1) * 127.5).numpy()
    assert [round(g / STEP) for g in grey] == frame_indices(30, 17)
    with pytest.raises(CogtuneError, match=r"idx.mp4.*30 frames but 49"):
        load_clip(path, 49, 32, 48)


def test_synth_dataset_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "synth"
    written = write_synth_dataset(root, clips=6, seed=3)
    samples = load_official(root)
    assert [(s.listed, s.caption) for s in samples] == written
    assert (root / "videos.txt").read_text().splitlines() == [rel for rel, _ in written]
    for s in samples:
        assert s.video.is_absolute() and s.video == (root / s.listed).resolve()
        assert set(s.caption.split()) <= set(SYNTH_WORDS)
        info = probe(s.video)
        assert info.frames >= 17 and 8 <= info.fps <= 16 and (info.width, info.height) == (96, 64)
        first, last = read_frames(s.video, [0, info.frames - 1]).astype(np.float32)
        # the shape moves the way the caption says: its centroid (pixels unlike the corner) shifts that way
        centre = [np.argwhere(np.abs(f - f[0, 0]).sum(-1) > 60).mean(0) for f in (first, last)]
        dy, dx = DIRECTIONS[s.caption.split(" moving ")[1].split()[0]]
        move = centre[1] - centre[0]
        assert move[0] * dy > 10 or move[1] * dx > 10, (s.caption, move)
    assert write_synth_dataset(tmp_path / "again", clips=6, seed=3) == written  # deterministic
    with pytest.raises(CogtuneError, match="not empty"):
        write_synth_dataset(root, clips=2)
    assert len(write_synth_dataset(root, clips=2, overwrite=True)) == 2


def test_synth_cli_refusal_names_a_flag_that_works(tmp_path: Path, capsys) -> None:
    from cogtune.cli import main

    root = tmp_path / "data"
    assert main(["data", "synth", str(root), "--clips", "1"]) == 0
    assert main(["data", "synth", str(root), "--clips", "1"]) == 2
    err = capsys.readouterr().err
    flags = re.findall(r"(?<![\w-])--[a-z][a-z-]*", err)
    assert flags, err  # on the command line the way out is a flag, not a Python keyword argument
    assert main(["data", "synth", str(root), "--clips", "1", *flags]) == 0


def test_dataset_items(tmp_path: Path) -> None:
    write_synth_dataset(tmp_path, clips=2, seed=0)
    ds = VideoClips(load_dataset(tmp_path), frames=17, height=32, width=32, crop="random", seed=7)
    item = ds[1]
    assert item["video"].shape == (17, 3, 32, 32) and item["index"] == 1
    assert item["path"] == "videos/clip_001.mp4" and item["caption"] == ds.samples[1].caption
    assert torch.equal(ds[1]["video"], item["video"])  # seeded: same crop each time
    assert -1 <= item["video"].min() < item["video"].max() <= 1


def test_official_layout_errors(tmp_path: Path) -> None:
    write_synth_dataset(tmp_path, clips=3)
    (tmp_path / "prompts.txt").write_bytes(b"a red circle\n\xff\xfe broken\nthird\n")
    with pytest.raises(CogtuneError, match=r"prompts\.txt line 2 is not valid UTF-8"):
        load_official(tmp_path)
    (tmp_path / "prompts.txt").write_text("one\ntwo\n\n\n", encoding="utf-8")  # trailing blanks ignored
    with pytest.raises(CogtuneError, match=r"prompts\.txt has 2 lines but .*videos\.txt has 3"):
        load_official(tmp_path)
    (tmp_path / "prompts.txt").write_text("one\r\ntwo\r\nthree\r\n\r\n", encoding="utf-8")
    assert [s.caption for s in load_official(tmp_path)] == ["one", "two", "three"]
    (tmp_path / "prompts.txt").write_bytes(b"one\rtwo\rthree\r")  # old Mac line ends
    assert [s.caption for s in load_official(tmp_path)] == ["one", "two", "three"]
    (tmp_path / "prompts.txt").write_text("one\n\nthree\n", encoding="utf-8")
    with pytest.raises(CogtuneError, match=r"prompts\.txt line 2 is blank"):
        load_official(tmp_path)
    (tmp_path / "prompts.txt").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "videos.txt").write_text("videos/clip_000.mp4\nvideos/nope.mp4\nvideos/clip_002.mp4\n")
    with pytest.raises(CogtuneError, match=r"nope\.mp4 listed on line 2 of .*videos\.txt does not exist"):
        load_official(tmp_path)


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    with pytest.raises(CogtuneError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "videos.txt").write_text("a.mp4\n")
    with pytest.raises(CogtuneError, match=r"not a dataset folder.*prompts\.txt \+ videos\.txt"):
        load_dataset(tmp_path)
