"""Still images as samples, on real PNG/JPEG/WebP files written with PIL: every layout lists them, they load as the
same pixels of a video frame would, and `data check` reports the broken and uncaptioned ones."""

from __future__ import annotations

import json
import struct
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from cogtune.cli import main
from cogtune.data.frames import FramePlan
from cogtune.data.sources import read_dataset
from cogtune.data.video import decode_plan, probe, write_mp4

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


RGB = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)


def write_images(root, names=("a.png", "b.jpg", "c.webp"), captions=True):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(RGB).save(root / name, quality=95) if not name.endswith(".png") else \
            Image.fromarray(RGB).save(root / name)
        if captions:
            (root / name).with_suffix(".txt").write_text(f"style {name}\n")
    return root


def test_every_layout_takes_an_image_entry(tmp_path):
    folder = write_images(tmp_path / "folder")
    write_mp4(np.zeros((9, 32, 48, 3), np.uint8), folder / "clip.mp4", 8)
    (folder / "clip.txt").write_text("a video\n")
    listing = read_dataset(folder)
    assert [(s.listed, s.is_image, s.ok) for s in listing.samples] == [
        ("a.png", True, True), ("b.jpg", True, True), ("c.webp", True, True), ("clip.mp4", False, True)]
    (folder / "metadata.csv").write_text("video,caption,start\na.png,one,\nclip.mp4,two,0.5\nb.jpg,three,1\n")
    rows = read_dataset(folder / "metadata.csv").samples
    assert [s.is_image for s in rows] == [True, False, True] and rows[0].ok and rows[1].ok
    assert rows[2].problems[0].startswith("bad-time:") and "still image" in rows[2].problems[0]
    (folder / "metadata.jsonl").write_text('{"video": "c.webp", "caption": "x"}\n')
    assert read_dataset(folder / "metadata.jsonl").samples[0].is_image
    (folder / "prompts.txt").write_text("one\ntwo\n")
    (folder / "videos.txt").write_text("a.png\nclip.mp4\n")
    (folder / "metadata.csv").unlink()
    (folder / "metadata.jsonl").unlink()
    assert [s.is_image for s in read_dataset(folder).samples] == [True, False]


def test_a_thumbnail_beside_its_video_is_not_a_sample(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_mp4(np.zeros((9, 32, 48, 3), np.uint8), folder / "clip.mp4", 8)
    Image.fromarray(RGB).save(folder / "clip.jpg")
    (folder / "clip.txt").write_text("a video\n")
    thumb = next(s for s in read_dataset(folder).samples if s.is_image)
    assert thumb.problems[0].startswith("thumbnail:")


@pytest.mark.parametrize("crop", ["center", "random", "stretch"])
def test_an_image_loads_as_the_same_pixels_of_a_video_frame(tmp_path, crop):
    """A lossless (PNG-coded) video of the same pixels: frame 0 after resize + crop equals the image, bit for bit."""
    Image.fromarray(RGB).save(tmp_path / "a.png")
    with av.open(str(tmp_path / "a.mov"), "w", format="mov") as c:
        stream = c.add_stream("png", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = 70, 50, "rgb24"
        for _ in range(3):
            c.mux(stream.encode(av.VideoFrame.from_ndarray(RGB, format="rgb24")))
        c.mux(stream.encode())
    for h, w in ((32, 48), (48, 32), (50, 70)):  # wider, taller, as it is
        video = decode_plan(tmp_path / "a.mov", FramePlan((0,)), h, w, crop, np.random.default_rng(1))
        image = decode_plan(tmp_path / "a.png", FramePlan((0,)), h, w, crop, np.random.default_rng(1))
        assert image.shape == (1, 3, h, w) and torch.equal(image, video), (h, w, crop)
    assert (probe(tmp_path / "a.png").frames, probe(tmp_path / "a.png").width) == (1, 70)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers turn it by 90 degrees
    Image.fromarray(RGB).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    info = probe(tmp_path / "turned.jpg")
    assert (info.width, info.height) == (50, 70)
    assert decode_plan(tmp_path / "turned.jpg", FramePlan((0,)), 64, 48).shape == (1, 3, 64, 48)


def test_data_check_reports_the_corrupt_and_the_uncaptioned_image(tmp_path, capsys):
    folder = write_images(tmp_path / "stills")
    (folder / "broken.png").write_bytes((folder / "a.png").read_bytes()[:200])  # truncated PNG
    (folder / "broken.txt").write_text("cut short\n")
    (folder / "notes.jpg").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("garbage\n")
    Image.fromarray(RGB).save(folder / "lonely.webp")  # no caption beside it
    bomb = folder / "bomb.png"  # a header claiming 3.6 gigapixels: refused from the header, never decoded
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
                     + _chunk(b"IEND", b""))
    (folder / "bomb.txt").write_text("huge\n")
    with pytest.raises(SystemExit) as exit:
        main(["data", "check", str(folder), "--json", str(tmp_path / "r.json"), "--workers", "1",
              "--height", "32", "--width", "48", "--strict"])
    out = capsys.readouterr().out
    assert exit.value.code == 1
    assert "unreadable: not a readable image (no image format cogtune reads (PNG, JPEG, WebP))" in out
    report = {r["path"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert [p.split(":")[0] for p in report["broken.png"]["problems"]] == ["corrupt"]
    assert [p.split(":")[0] for p in report["notes.jpg"]["problems"]] == ["unreadable"]
    assert [p.split(":")[0] for p in report["lonely.webp"]["problems"]] == ["no-caption"]
    assert report["bomb.png"]["problems"] == ["unreadable: too many pixels to decode safely; scale the image down"]
    assert not any(report[n]["usable"] for n in ("broken.png", "notes.jpg", "lonely.webp", "bomb.png"))
    for name in ("a.png", "b.jpg", "c.webp"):
        r = report[name]
        assert r["ok"] and (r["kind"], r["frames"], r["used_frames"], r["width"], r["height"]) == (
            "image", 1, 1, 70, 50), name
    assert "7 clips (7 of them images): 3 ok, 4 with problems (4 unusable)" in out


def test_a_short_video_is_still_flagged(tmp_path, capsys):
    """One frame is the images' rule only: a 1-frame video is too short for the model's frame counts."""
    folder = write_images(tmp_path / "mixed", names=("a.png",))
    write_mp4(np.zeros((1, 32, 48, 3), np.uint8), folder / "one.mp4", 8)
    (folder / "one.txt").write_text("a one-frame video\n")
    assert main(["data", "check", str(folder), "--frames", "9", "--height", "32", "--width", "48",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "too-short: clip has 1 frames but 9 are needed" in out and "2 clips (1 of them images): 1 ok" in out
