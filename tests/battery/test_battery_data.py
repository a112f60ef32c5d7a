"""Damaged and unusual datasets through the real `cogtune data check`: reports name the clip, output stays valid."""

from __future__ import annotations

import json
import os
import shutil
from fractions import Fraction
from pathlib import Path

import av
import pytest
import numpy as np

from harness import assert_intact, cli, error_line, snapshot

FPS = 8


def _pattern(height: int, width: int) -> np.ndarray:
    """Coarse quadrants (H.264 keeps them nearly exact): white top-left, red top-right, black bottom half."""
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 2, : width // 2] = 255
    img[: height // 2, width // 2:, 0] = 255
    return img


def _write(path: Path, img: np.ndarray, frames: int = 9, rotation: int = 0) -> Path:
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(FPS))
        s.width, s.height, s.pix_fmt = img.shape[1], img.shape[0], "yuv420p"
        if rotation:
            s.set_display_rotation(rotation)
        for _ in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _rotated_pair(tmp: Path) -> tuple[Path, Path]:
    """The same portrait picture: stored upright (reference) and stored landscape with a 90-degree display matrix."""
    portrait = _pattern(96, 48)
    (tmp / "ref").mkdir()
    ref = _write(tmp / "ref" / "clip.mp4", portrait)
    stored = np.ascontiguousarray(np.rot90(portrait, -1))  # players turn it back by 90 degrees counter-clockwise
    (tmp / "rot").mkdir()
    rot = _write(tmp / "rot" / "clip.mp4", stored, rotation=90)
    with av.open(str(rot)) as c:  # the test clip really carries the rotation, as FFmpeg reads it
        assert next(c.decode(c.streams.video[0])).rotation == 90
    return ref, rot


def test_rotated_clip_reported_and_decoded_at_display_size(tmp_path):
    from cogtune.data.video import load_clip, probe

    ref, rot = _rotated_pair(tmp_path)
    info = probe(rot)
    assert (info.width, info.height, info.rotation) == (48, 96, 90)
    (rot.parent / "clip.txt").write_text("a portrait clip")
    before = snapshot(rot.parent)
    r = cli("data", "check", rot.parent, "--frames", "9", "--height", "96", "--width", "48",
            "--json", tmp_path / "report.json")
    assert r.returncode == 0, r.stderr[-3000:]
    clip = next(c for c in json.loads((tmp_path / "report.json").read_text()) if c["video"])
    assert (clip["width"], clip["height"]) == (48, 96)
    assert not any(p.startswith("upscaled") for p in clip["problems"]), clip["problems"]
    assert_intact(before, rot.parent)
    a = load_clip(ref, 9, 96, 48)
    b = load_clip(rot, 9, 96, 48)
    assert a.shape == b.shape == (9, 3, 96, 48)
    assert float((a - b).abs().mean()) * 127.5 < 0.03 * 255  # codec error only; a wrong turn differs by ~40%


def test_rotated_clip_lands_in_portrait_bucket(tmp_path):
    from cogtune.data.buckets import assign_bucket
    from cogtune.data.video import probe

    _, rot = _rotated_pair(tmp_path)
    info = probe(rot)
    bucket, _ = assign_bucket(info.height, info.width, 10**9, [(96, 48), (48, 96)], [1])
    assert (bucket.height, bucket.width) == (96, 48)


def test_non_utf8_file_name_gives_valid_json(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    good = _write(root / "a.mp4", _pattern(32, 32))
    (root / "a.txt").write_text("a cat")
    raw = os.fsencode(root) + b"/clip\xff"
    shutil.copy(good, raw + b".mp4")
    with open(raw + b".txt", "w") as f:
        f.write("a dog")
    before = snapshot(root)
    r = cli("data", "check", root, "--frames", "9", "--height", "32", "--width", "32", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    paths = [c["path"] for c in json.loads((tmp_path / "r.json").read_bytes().decode("utf-8"))]
    assert "clip\\xff.mp4" in paths, paths
    assert "clip\\xff.mp4" in r.stdout
    assert_intact(before, root)


# --- damaged datasets: each damage is reported against its clip or file (or refused in one line), never a crash ---

def _lines(d: Path, name: str, lines: list[str]) -> None:
    (d / name).write_text("\n".join(lines) + "\n")


def _videos(d: Path) -> list[str]:
    return (d / "videos.txt").read_text().split()


def _table(d: Path, name: str, text: bytes) -> Path:
    (d / "prompts.txt").unlink()
    (d / "videos.txt").unlink()
    (d / name).write_bytes(text)
    return d / name


def _sidecars(d: Path) -> None:
    """The captions-beside-videos layout: clip_001 onwards get a .txt, the official lists go."""
    for n, video in enumerate(_videos(d)[1:], 1):
        (d / video).with_suffix(".txt").write_text(f"caption {n}")
    (d / "prompts.txt").unlink()
    (d / "videos.txt").unlink()


# (case, damage -> the root to check or None for the folder, the entry's path, a word its problem must hold)
DAMAGED = [
    ("fewer captions than videos", lambda d: _lines(d, "prompts.txt", ["a", "b"]), "clip_005.mp4", "no-caption"),
    ("empty prompts.txt", lambda d: (d / "prompts.txt").write_text(""), "clip_000.mp4", "no-caption"),
    ("caption not UTF-8", lambda d: (d / "prompts.txt").write_bytes(
        b"ok\n\xff\xfe bad\n" + b"ok\n" * 4), "clip_001.mp4", "caption-encoding"),
    ("prompts.txt random bytes", lambda d: (d / "prompts.txt").write_bytes(os.urandom(4000)), "videos.txt",
     "list-mismatch"),
    ("blank caption line", lambda d: _lines(d, "prompts.txt", ["a", "", "c", "d", "e", "f"]), "clip_001.mp4",
     "empty-caption"),
    ("zero-byte video", lambda d: (d / _videos(d)[0]).write_bytes(b""), "clip_000.mp4", "empty"),
    ("text file named .mp4", lambda d: (d / _videos(d)[0]).write_text("hello"), "clip_000.mp4", "unreadable"),
    ("truncated video", lambda d: (d / _videos(d)[0]).write_bytes((d / _videos(d)[0]).read_bytes()[:300]),
     "clip_000.mp4", "unreadable"),
    ("missing video", lambda d: (d / _videos(d)[0]).unlink(), "clip_000.mp4", "missing"),
    ("a folder listed as video", lambda d: _lines(d, "videos.txt", ["videos", *_videos(d)[1:]]), "videos",
     "missing"),
    ("symlink loop", lambda d: (os.symlink("loop.mp4", d / "videos" / "loop.mp4"),
                                _lines(d, "videos.txt", ["videos/loop.mp4", *_videos(d)[1:]])), "loop.mp4", "missing"),
    ("a system file listed", lambda d: _lines(d, "videos.txt", ["/etc/hostname", *_videos(d)[1:]]), "/etc/hostname",
     "unreadable"),
    ("jsonl with broken rows", lambda d: _table(d, "data.jsonl", b'{"video": "videos/clip_000.mp4", "caption": "a"}\n'
                                                b'{broken\n[1, 2]\n'), "data.jsonl", "bad-row"),
    ("jsonl video not a string", lambda d: _table(d, "data.jsonl", b'{"video": 5, "caption": null}\n'), "5",
     "no-caption"),
    ("csv with a NUL byte", lambda d: _table(d, "data.csv", b'video,caption\n"videos/clip_000.mp4,"a\x00\n'),
     "clip_000.mp4,a\x00", "missing"),
    ("caption file is a folder", lambda d: (_sidecars(d), (d / "videos" / "clip_000.txt").mkdir()), "clip_000.mp4",
     "no-caption"),
    ("sidecar caption not UTF-8", lambda d: (_sidecars(d), (d / "videos" / "clip_000.txt").write_bytes(b"\xff\xfe")),
     "clip_000.mp4", "caption-encoding"),
]


def _check(root: Path, report: Path):
    return cli("data", "check", root, "--frames", "9", "--height", "32", "--width", "48", "--json", report)


@pytest.fixture
def damaged_data(synth_data, tmp_path):
    def make(damage) -> tuple[Path, Path]:
        d = tmp_path / "data"
        shutil.copytree(synth_data, d, symlinks=True)
        root = damage(d)
        return d, root if isinstance(root, Path) else d
    return make


@pytest.mark.parametrize("damage, entry, word", [c[1:] for c in DAMAGED], ids=[c[0] for c in DAMAGED])
def test_damaged_dataset_is_reported(damaged_data, tmp_path, damage, entry, word):
    folder, root = damaged_data(damage)
    before = snapshot(folder)
    r = _check(root, tmp_path / "report.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout and "internal error" not in r.stderr, r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    flagged = [p for e in report if e["path"].endswith(entry) for p in e["problems"]]
    assert any(p.startswith(word) or word in p for p in flagged), (entry, word, report)
    assert max(len(line) for line in r.stdout.splitlines()) < 2200
    assert_intact(before, folder)


@pytest.mark.parametrize("case", ["no videos at all", "csv without a video column", "root does not exist"])
def test_unusable_dataset_is_one_line(synth_data, tmp_path, case):
    d = tmp_path / "data"
    shutil.copytree(synth_data, d)
    root = d
    if case == "no videos at all":
        shutil.rmtree(d / "videos")
        (d / "prompts.txt").unlink()
        (d / "videos.txt").unlink()
    elif case == "csv without a video column":
        root = _table(d, "data.csv", b"file,text\nvideos/clip_000.mp4,a\n")
    else:
        root = d / "nowhere"
    r = _check(root, tmp_path / "report.json")
    assert r.returncode == 2, r.stderr[-3000:]
    line = error_line(r)
    assert root.name in line, line
    assert not (tmp_path / "report.json").exists()


def test_huge_caption_is_not_echoed(synth_data, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(synth_data, d)
    _lines(d, "prompts.txt", ["x" * 10_000_000, *(["ok"] * 5)])
    r = _check(d, tmp_path / "report.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout) + len(r.stderr) < 100_000


def test_bomb_image_as_first_frame_is_refused(tmp_path):
    """A PNG whose header claims 3.6 gigapixels: refused from its header, never decoded."""
    import struct
    import zlib


    from cogtune.data.video import load_image
    from cogtune.errors import CogtuneError

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    with pytest.raises(CogtuneError, match="too many pixels"):
        load_image(bomb, 32, 48)


def test_train_takes_a_clip_whose_name_is_not_utf8(synth_data, tiny_model, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(synth_data, d)
    odd = os.fsdecode(b"clip\xff.mp4")
    os.rename(d / "videos" / "clip_000.mp4", d / "videos" / odd)
    (d / "videos.txt").write_bytes((d / "videos.txt").read_bytes().replace(b"clip_000.mp4", b"clip\xff.mp4"))
    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    r = cli("train", quickstart, f"model.path={tiny_model('cogvideox-5b')}", f"data.root={d}",
            f"output_dir={tmp_path / 'run'}", "max_steps=1", "validation.every_steps=0", "validation.heldout_loss=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
