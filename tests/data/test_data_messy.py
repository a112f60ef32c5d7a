"""Messy real-world datasets: links, folders and Windows paths in lists, rows without a video, unwritable outputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cogtune.data.check import check_dataset, keyword, run_check
from cogtune.data.sources import read_dataset
from cogtune.data.synth import write_synth_dataset
from cogtune.data.video import probe, write_mp4
from cogtune.errors import CogtuneError


def clip(path: Path, n: int = 12, level: int = 90) -> Path:
    return write_mp4(np.full((n, 32, 48, 3), level, np.uint8), path, fps=8)


def test_captioned_folder_broken_link_is_missing(tmp_path: Path) -> None:
    clip(tmp_path / "a.mp4")
    (tmp_path / "b.mp4").symlink_to(tmp_path / "deleted.mp4")  # the target is gone
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"clip {name}", encoding="utf-8")
    reports = check_dataset(tmp_path, frames=9, height=32, width=48, workers=1)
    assert [(r.path, [keyword(p) for p in r.problems]) for r in reports] == [("a.mp4", []), ("b.mp4", ["missing"])]
    assert not reports[1].usable


def test_listed_folder_and_windows_separators(tmp_path: Path) -> None:
    clip(tmp_path / "v" / "a.mp4")
    (tmp_path / "videos.txt").write_text("v\\a.mp4\nv/\nv/a.mp4\n", encoding="utf-8")
    (tmp_path / "prompts.txt").write_text("one\ntwo\nthree\n", encoding="utf-8")
    backslash, folder, good = read_dataset(tmp_path).samples
    assert good.ok
    assert "write / instead of \\" in backslash.problems[0]  # v/a.mp4 exists: say how to list it
    assert "is a folder, not a file" in folder.problems[0]


def test_row_without_a_video_is_named_by_its_line(tmp_path: Path) -> None:
    clip(tmp_path / "a.mp4")
    (tmp_path / "metadata.csv").write_text("video,caption\na.mp4,one\n,two\n", encoding="utf-8")
    reports = check_dataset(tmp_path, frames=9, height=32, width=48, workers=1)
    table = tmp_path.resolve() / "metadata.csv"
    assert [r.path for r in reports] == ["a.mp4", f"line 3 of {table}"]  # not the dataset folder
    assert [keyword(p) for p in reports[1].problems] == ["missing"]


def test_synth_into_a_path_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    with pytest.raises(CogtuneError, match=r"cannot create .*notes\.txt/data/videos"):
        write_synth_dataset(tmp_path / "notes.txt" / "data", clips=1)


def test_empty_video_file_is_one_plain_line(tmp_path: Path) -> None:
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"\x00not a video" * 40)
    with pytest.raises(CogtuneError, match=r"zero\.mp4: the file is empty \(0 bytes\)"):
        probe(tmp_path / "zero.mp4")
    with pytest.raises(CogtuneError) as info:
        probe(tmp_path / "junk.mp4")
    assert "Errno" not in str(info.value) and str(info.value).count("junk.mp4") == 1  # no errno, path once


def check_args(*argv: str) -> argparse.Namespace:
    from cogtune.cli import build_parser  # the real command line: it tells `data check` what the model implies

    return build_parser().parse_args(["data", "check", *argv, "--workers", "1"])


def test_check_json_target_is_refused_before_the_scan(tmp_path: Path) -> None:
    clip(tmp_path / "a.mp4")
    (tmp_path / "a.txt").write_text("one", encoding="utf-8")
    (tmp_path / "reports").mkdir()
    with pytest.raises(CogtuneError, match="is a folder; give a file name"):
        run_check(check_args(str(tmp_path), "--json", str(tmp_path / "reports")))
    with pytest.raises(CogtuneError, match=r"cannot write --json .*a\.txt/r\.json"):  # under a file
        run_check(check_args(str(tmp_path), "--json", str(tmp_path / "a.txt" / "r.json")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "a.txt", "reports"]  # nothing half-written


def test_check_config_takes_fps_and_frame_counts_from_the_variant(tmp_path: Path) -> None:
    """Training falls back to the variant's fps (8 for 1.0) and its 8N+1 counts; `data check --config` must too."""
    clip(tmp_path / "a.mp4", n=20)  # 20 frames at 8 fps
    (tmp_path / "a.txt").write_text("one", encoding="utf-8")
    config, report = tmp_path / "run.yaml", tmp_path / "report.json"
    model = {"path": str(tmp_path / "no-model-here"), "variant": "cogvideox-5b"}
    cases = (({"frames": 25, "sampling": "head", "short_clips": "smaller"}, 17, 17 / 20),  # largest 8N+1 <= 20
             ({"frames": 9, "sampling": "fps"}, 9, 9 / 20))  # 8 fps clip at the variant's 8 fps: 9 of 20 frames
    for data, used, span in cases:
        config.write_text(yaml.safe_dump({"model": model, "data": {"root": str(tmp_path), "height": 32,
                                                                   "width": 48, **data}}))
        assert run_check(check_args("--config", str(config), "--json", str(report))) == 0
        row = json.loads(report.read_text(encoding="utf-8"))[0]
        assert (row["used_frames"], row["span"]) == (used, pytest.approx(span)), data


def test_csv_caption_cut_by_an_unquoted_comma_is_a_bad_row(tmp_path: Path) -> None:
    clip(tmp_path / "a.mp4")
    (tmp_path / "metadata.csv").write_text('video,caption\na.mp4,a red car, driving fast\n"a.mp4","a red car, '
                                           'driving fast"\n', encoding="utf-8")
    unquoted, quoted = read_dataset(tmp_path).samples
    assert quoted.ok and quoted.caption == "a red car, driving fast"
    assert [keyword(p) for p in unquoted.problems] == ["bad-row"] and "' driving fast'" in unquoted.problems[0]


def test_unreadable_conditioning_image_is_reported(tmp_path: Path) -> None:
    from PIL import Image

    clip(tmp_path / "a.mp4")
    clip(tmp_path / "b.mp4", level=150)
    Image.new("RGB", (48, 32), (200, 10, 10)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)  # a PNG signature, then nothing
    for name, lines in (("videos", "a.mp4\nb.mp4\n"), ("prompts", "one\ntwo\n"), ("images", "good.png\nbad.png\n")):
        (tmp_path / f"{name}.txt").write_text(lines, encoding="utf-8")
    good, bad = check_dataset(tmp_path, frames=9, height=32, width=48, workers=1)
    assert good.ok and [keyword(p) for p in bad.problems] == ["bad-image"] and not bad.usable
    assert "bad.png" in bad.problems[0]
