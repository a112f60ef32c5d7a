"""`data check` on a dataset of broken and odd files, all made here with PyAV (no mocks)."""

from __future__ import annotations

import argparse
import json
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from cogtune.cli import build_parser
from cogtune.data.check import check_dataset, keyword, run_check
from cogtune.data.video import write_mp4

H, W = 48, 64


def noise(n: int, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def encode(path: Path, n: int = 12, codec: str = "libx264", pix_fmt: str = "yuv420p", h: int = H, w: int = W,
           pts_ms: list[int] | None = None, rotation: int = 0, options: dict | None = None) -> Path:
    with av.open(str(path), "w", format="mp4", options=options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, img in enumerate(noise(n, h, w, seed=n + h)):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# listed path -> (caption bytes, the problem keyword expected, or None for a clip that must be ok)
EXPECTED: dict[str, tuple[bytes, str | None]] = {
    "v/ok1.mp4": (b"a good clip", None),
    "v/ok2.mp4": (b"another good clip", None),
    "v/truncated.mp4": (b"cut in half, index at the end", "unreadable"),
    "v/truncated_faststart.mp4": (b"cut in half, index at the start", "truncated"),
    "v/zero.mp4": (b"zero bytes", "unreadable"),
    "v/text.mp4": (b"a text file renamed", "unreadable"),
    "v/audio.mp4": (b"sound only", "audio-only"),
    "v/one_frame.mp4": (b"a single frame", "too-short"),
    "v/vfr.mp4": (b"irregular timestamps", "vfr"),
    "v/rotated.mp4": (b"phone video", "rotated"),
    "v/ten_bit.mp4": (b"10-bit", "pixel-format"),
    "v/yuv444.mp4": (b"4:4:4", "pixel-format"),
    "v/odd.mp4": (b"65x47", "odd-size"),
    "v/latin1.mp4": (b"caf\xe9 au lait", "caption-encoding"),
    "v/empty_caption.mp4": (b"", "empty-caption"),
    "v/missing.mp4": (b"not on disk", "missing"),
    "v/ok1.mp4 ": (b"listed twice", "duplicate"),  # trailing space: the same file on a second line
    "v/copy_of_ok2.mp4": (b"same bytes as ok2", "duplicate"),
    "v/no_caption.mp4": (b"", "no-caption"),  # the last line of videos.txt, one past prompts.txt
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("check")
    v = root / "v"
    v.mkdir()
    for name in ("ok1", "latin1", "empty_caption", "no_caption"):
        write_mp4(noise(17, seed=len(name)), v / f"{name}.mp4", fps=8)
    write_mp4(noise(13, seed=2), v / "ok2.mp4", fps=8)
    shutil.copy(v / "ok2.mp4", v / "copy_of_ok2.mp4")
    for name, options in (("truncated", {}), ("truncated_faststart", {"movflags": "faststart"})):
        data = encode(v / f"{name}.mp4", n=30, options=options).read_bytes()
        (v / f"{name}.mp4").write_bytes(data[: len(data) // 2])
    (v / "zero.mp4").write_bytes(b"")
    (v / "text.mp4").write_text("this is not a video\n")
    audio_only(v / "audio.mp4")
    write_mp4(noise(1), v / "one_frame.mp4", fps=8)
    encode(v / "vfr.mp4", n=12, pts_ms=[0, 125, 250, 300, 700, 800, 1200, 1250, 1375, 1500, 1900, 2000])
    encode(v / "rotated.mp4", rotation=90)
    encode(v / "ten_bit.mp4", pix_fmt="yuv420p10le")
    encode(v / "yuv444.mp4", pix_fmt="yuv444p")
    encode(v / "odd.mp4", codec="mpeg4", h=47, w=65)
    listed = list(EXPECTED)
    (root / "videos.txt").write_text("".join(p.strip() + "\n" for p in listed))
    (root / "prompts.txt").write_bytes(b"".join(cap + b"\n" for cap, _ in list(EXPECTED.values())[:-1]))
    return root


def test_every_problem_is_reported(dataset: Path) -> None:
    reports = check_dataset(dataset, frames=9, height=32, width=32, mode="head", workers=2)
    assert [keyword(p) for p in reports[0].problems] == ["list-mismatch"] and reports[0].path.endswith("videos.txt")
    clips = reports[1:]
    assert [r.path for r in clips] == [p.strip() for p in EXPECTED]
    for r, (listed, (_, expected)) in zip(clips, EXPECTED.items()):
        kinds = {keyword(p) for p in r.problems}
        if expected is None:
            assert r.ok and r.usable and not r.problems, (listed, r.problems)
        else:
            assert not r.ok and expected in kinds, (listed, r.problems)
    by_path = {r.path: r for r in reversed(clips)}  # the first listing of ok1.mp4 wins
    assert by_path["v/ok1.mp4"].span == pytest.approx(9 / 17) and by_path["v/ok2.mp4"].span == pytest.approx(9 / 13)
    assert by_path["v/ok1.mp4"].used_frames == 9 and by_path["v/ok1.mp4"].frames == 17
    assert {keyword(p) for p in by_path["v/odd.mp4"].problems} == {"odd-size"}  # mpeg4 yuv420p: nothing else
    assert {keyword(p) for p in by_path["v/rotated.mp4"].problems} == {"rotated"}
    assert by_path["v/vfr.mp4"].usable and by_path["v/ten_bit.mp4"].usable  # odd files still load
    assert not by_path["v/one_frame.mp4"].usable and "1 frames but 9" in by_path["v/one_frame.mp4"].problems[0]
    first, second = [r for r in clips if r.path == "v/ok1.mp4"]
    assert first.ok and "the same file as v/ok1.mp4 (line 1 of" in second.problems[0]  # the later one is flagged
    assert "identical content to v/ok2.mp4" in by_path["v/copy_of_ok2.mp4"].problems[0]


def test_policy_decode_and_upscale(dataset: Path) -> None:
    reports = {r.path: r for r in reversed(check_dataset(dataset, frames=9, height=32, width=32,
                                                         short_policy="loop", decode=True, workers=2))}
    assert reports["v/one_frame.mp4"].ok and reports["v/one_frame.mp4"].span == 1.0  # loop fills 9 frames
    assert "truncated" in {keyword(p) for p in reports["v/truncated_faststart.mp4"].problems}
    assert reports["v/ok1.mp4"].ok and reports["v/ok1.mp4"].span == 1.0  # uniform covers the whole clip
    big = {r.path: r for r in reversed(check_dataset(dataset, frames=9, height=480, width=720, workers=2))}
    assert [keyword(p) for p in big["v/ok1.mp4"].problems] == ["upscaled"] and big["v/ok1.mp4"].usable


def cli(*argv: str) -> argparse.Namespace:
    return build_parser("data").parse_args(["data", "check", *argv])


def test_cli_table_json_and_exit_codes(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "reports" / "check.json"
    args = cli(str(dataset), "--frames", "9", "--height", "32", "--width", "32", "--sampling", "head",
               "--json", str(out), "--workers", "2")
    assert run_check(args) == 0
    text = capsys.readouterr().out
    assert f"{len(EXPECTED)} clips: 2 ok, {len(EXPECTED) - 2} with problems" in text
    assert "v/ten_bit.mp4" in text and "- pixel-format: yuv420p10le" in text
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert [sorted(r)[:0] or {"path", "ok", "problems", "span"} <= set(r) for r in rows] == [True] * len(rows)
    assert [r["path"] for r in rows[1:]] == [p.strip() for p in EXPECTED]
    assert rows[1]["ok"] is True and rows[1]["span"] == pytest.approx(9 / 17) and rows[3]["ok"] is False
    assert [p.name for p in out.parent.iterdir()] == ["check.json"]  # no temporary file left

    strict = cli(str(dataset), "--frames", "9", "--height", "32", "--width", "32", "--strict", "--workers", "2")
    with pytest.raises(SystemExit) as exit_info:
        strict.func(strict)
    assert exit_info.value.code == 1
    good = tmp_path / "good"
    good.mkdir()
    write_mp4(noise(17), good / "a.mp4", fps=8)
    (good / "a.txt").write_text("fine", encoding="utf-8")  # captioned-folder layout
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "unused"}, "data": {
        "root": str(good), "frames": 9, "height": 32, "width": 32, "sampling": "head"}}))
    args = cli("--config", str(config), "--strict", "--json", str(tmp_path / "good.json"))
    assert args.func(args) is None  # no problems: exit 0 even with --strict
    assert json.loads((tmp_path / "good.json").read_text())[0]["span"] == pytest.approx(9 / 17)
    assert "1 clips: 1 ok, 0 with problems" in capsys.readouterr().out
    # frame buckets from the config: a 17-frame clip too short for 33 frames still fills the 17 bucket
    config.write_text(yaml.safe_dump({"model": {"path": "unused"}, "data": {
        "root": str(good), "frames": 33, "height": 32, "width": 32, "buckets": {"frames": [17]}}}))
    args = cli("--config", str(config), "--json", str(tmp_path / "buckets.json"))
    assert run_check(args) == 0
    assert json.loads((tmp_path / "buckets.json").read_text())[0]["used_frames"] == 17
    assert run_check(cli(str(good), "--frames", "33", "--height", "32", "--width", "32")) == 0
    assert "too-short: clip has 17 frames but 33" in capsys.readouterr().out


def test_segments_of_one_file_are_samples_of_their_own(synth_data: Path, tmp_path: Path) -> None:
    from cogtune.data.video import probe

    video = synth_data / (synth_data / "videos.txt").read_text().split()[0]
    info = probe(video)
    table = tmp_path / "metadata.csv"
    table.write_text("video,caption,start,end\n"
                     f"{video},first second,0,1\n{video},second second,1,2\n{video},first again,0,1\n"
                     f"{video},the whole clip,,\n")
    reports = [r for r in check_dataset(table, frames=5, height=32, width=32, workers=2) if r.video]
    kinds = [[keyword(p) for p in r.problems] for r in reports]
    assert "duplicate" not in kinds[0] + kinds[1] + kinds[3] and "duplicate" in kinds[2]
    # a segment shows its own frames: those with start <= i / fps < end
    assert [r.frames for r in reports] == [round(info.fps), round(info.fps), round(info.fps), info.frames]
