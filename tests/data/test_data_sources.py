"""Dataset sources: the official lists, CSV/JSONL tables and captioned folders, on real H.264 files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cogtune.data.sources import load_dataset, read_dataset
from cogtune.data.video import write_mp4
from cogtune.errors import CogtuneError

CLIPS = {  # path relative to the dataset root -> caption (non-ASCII on purpose)
    "videos/a.mp4": "a red circle moving left, café style",
    "videos/sub/b.mp4": "über \"quoted\" square — moving up",
    "videos/sub/deeper/c.mp4": "猫 on a 🎬 set",
}


def make_clips(root: Path) -> None:
    for n, rel in enumerate(CLIPS):
        write_mp4(np.full((6, 32, 32, 3), 40 * n, np.uint8), root / rel, fps=8)


def pairs(samples) -> list[tuple[Path, str]]:
    return sorted((s.video, s.caption) for s in samples)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_clips(tmp_path)
    return tmp_path


def test_three_formats_give_the_same_pairs(root: Path) -> None:
    expected = sorted(((root / rel).resolve(), cap) for rel, cap in CLIPS.items())
    (root / "prompts.txt").write_text("".join(c + "\n" for c in CLIPS.values()), encoding="utf-8")
    (root / "videos.txt").write_text("".join(v + "\n" for v in CLIPS), encoding="utf-8")
    rows = [{"video": v, "caption": c} for v, c in CLIPS.items()]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    with open(root / "metadata.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, ["video", "caption"])
        w.writeheader()
        w.writerows(rows)
    for rel, cap in CLIPS.items():  # captioned folder: clip.txt beside clip.mp4, searched recursively
        (root / rel).with_suffix(".txt").write_text(cap + "\n", encoding="utf-8")

    official = load_dataset(root / "videos.txt")
    assert pairs(official) == expected and [s.listed for s in official] == list(CLIPS)
    assert pairs(load_dataset(root / "metadata.csv")) == expected
    assert pairs(load_dataset(root / "metadata.jsonl")) == expected
    folder = load_dataset(root / "videos")
    assert pairs(folder) == expected and [s.listed for s in folder] == ["a.mp4", "sub/b.mp4", "sub/deeper/c.mp4"]
    assert all(s.ok and s.start is None for s in official + folder)
    with pytest.raises(CogtuneError, match=r"holds prompts\.txt \+ videos\.txt and metadata\.csv and metadata\.jsonl"):
        load_dataset(root)  # several layouts in one folder: the user has to say which
    (root / "prompts.txt").unlink()
    (root / "metadata.csv").unlink()
    assert pairs(load_dataset(root)) == expected  # a folder with exactly one metadata table


def test_csv_start_end_and_row_problems(root: Path) -> None:
    table = root / "clips.csv"
    table.write_bytes(
        "video,caption,start,end,image\n"
        "videos/a.mp4,\"two, lines\nof caption\",1.5,3,\n"
        "videos/sub/b.mp4,plain,, 2 ,\n"
        "videos/sub/deeper/c.mp4,bad times,abc,1,\n".encode()
        + b"videos/a.mp4,caf\xe9 in latin-1,2,1,\n"
        + b"videos/missing.mp4,,0,1,nope.png\n"
    )
    s = load_dataset(table, strict=False)
    assert [(x.start, x.end) for x in s[:2]] == [(1.5, 3.0), (None, 2.0)]
    assert s[0].caption == "two, lines\nof caption" and s[0].ok and s[1].ok
    assert [p.split(":")[0] for p in s[2].problems] == ["bad-time"] and "'abc' is not a number" in s[2].problems[0]
    assert sorted(p.split(":")[0] for p in s[3].problems) == ["bad-time", "caption-encoding"]
    assert "line 6 of" in s[3].problems[0] and "line 2 of" in s[0].where  # rows named by their first line
    assert sorted(p.split(":")[0] for p in s[4].problems) == ["empty-caption", "missing", "missing-image"]
    first_problem = r"line 5 of .*start 'abc' is not a number of seconds; write e.g. 2.5 \(and 5 more problems\)"
    with pytest.raises(CogtuneError, match=first_problem):
        load_dataset(table)
    (root / "nohead.csv").write_text("videos/a.mp4,hello\n", encoding="utf-8")
    with pytest.raises(CogtuneError, match=r"nohead\.csv needs a header row with columns 'video' and 'caption'"):
        load_dataset(root / "nohead.csv")
    (root / "t.jsonl").write_text('{"file_name": "videos/a.mp4", "text": "hi", "start": 0.5}\nnot json\n')
    listing = read_dataset(root / "t.jsonl")
    assert [(x.caption, x.start) for x in listing.samples] == [("hi", 0.5)]
    assert listing.problems[0].startswith("bad-row:") and "line 2" in listing.problems[0]


def test_non_utf8_captions_strict_and_lenient(root: Path) -> None:
    (root / "videos.txt").write_text("".join(v + "\n" for v in CLIPS), encoding="utf-8")
    (root / "prompts.txt").write_bytes(b"fine\ncaf\xe9 latin-1\nalso fine\n")
    with pytest.raises(CogtuneError, match=r"prompts\.txt line 2 is not valid UTF-8 \(byte 4\); save the file as"):
        load_dataset(root)
    lenient = load_dataset(root, strict=False)
    assert [bool(s.problems) for s in lenient] == [False, True, False]
    assert lenient[1].problems[0].startswith("caption-encoding:") and lenient[0].caption == "fine"

    folder = root / "videos"
    for rel in CLIPS:
        (root / rel).with_suffix(".txt").write_text("ok", encoding="utf-8")
    (folder / "sub" / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(CogtuneError, match=r"b\.txt is not valid UTF-8 \(byte 1\); save the file as UTF-8"):
        load_dataset(folder)
    assert [s.problems[0].split(":")[0] if s.problems else "" for s in load_dataset(folder, strict=False)] == \
        ["", "caption-encoding", ""]


def test_lenient_collects_per_clip_problems(root: Path) -> None:
    (root / "videos.txt").write_text("videos/a.mp4\nvideos/nope.mp4\nvideos/sub/b.mp4\nvideos/sub/deeper/c.mp4\n")
    (root / "prompts.txt").write_text("one\n\nthree\n", encoding="utf-8")
    with pytest.raises(CogtuneError, match=r"prompts\.txt has 3 lines but .*videos\.txt has 4"):
        load_dataset(root)
    listing = read_dataset(root)
    assert [p.split(":")[0] for p in listing.problems] == ["list-mismatch"]
    samples = load_dataset(root, strict=False)  # dataset-level problems are logged, samples kept
    codes = [[p.split(":")[0] for p in s.problems] for s in samples]
    assert codes == [[], ["empty-caption", "missing"], [], ["no-caption"]]
    assert "nope.mp4 listed on line 2 of" in samples[1].problems[1]

    folder = root / "videos"
    (folder / "a.txt").write_text("a caption", encoding="utf-8")
    (folder / "sub" / "b.txt").write_text("  \n", encoding="utf-8")
    codes = [[p.split(":")[0] for p in s.problems] for s in load_dataset(folder, strict=False)]
    assert codes == [[], ["empty-caption"], ["no-caption"]]
    with pytest.raises(CogtuneError, match=r"b\.txt is empty.*\(and 1 more problems\)"):
        load_dataset(folder)


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(CogtuneError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(CogtuneError, match="not a dataset folder cogtune recognises"):
        load_dataset(tmp_path)
    with pytest.raises(CogtuneError, match=r"notes\.md is not a dataset file"):
        load_dataset(tmp_path / "notes.md")


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_csv_with_semicolons_or_tabs(root: Path, delimiter: str) -> None:
    """Excel in comma-decimal locales writes ';', some tools write tabs: the header line tells which."""
    expected = sorted(((root / rel).resolve(), cap) for rel, cap in CLIPS.items())
    with open(root / "metadata.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, ["video", "caption"], delimiter=delimiter)
        w.writeheader()
        w.writerows({"video": v, "caption": c} for v, c in CLIPS.items())  # one caption holds a comma
    samples = load_dataset(root / "metadata.csv")
    assert pairs(samples) == expected and all(s.ok for s in samples)


def test_jsonl_captions_that_are_lists_are_joined_or_refused(root: Path) -> None:
    videos = list(CLIPS)
    rows = [{"video": videos[0], "caption": ["a red circle", " moving left ", ""]},  # tags: joined with ", "
            {"video": videos[1], "caption": {"en": "a square"}},
            {"video": videos[2], "caption": ["a cat", 3]}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    samples = load_dataset(root / "metadata.jsonl", strict=False)
    assert samples[0].ok and samples[0].caption == "a red circle, moving left"
    assert [p.split(":")[0] for p in samples[1].problems] == ["bad-row"] and "dict of fields" in samples[1].problems[0]
    assert [p.split(":")[0] for p in samples[2].problems] == ["bad-row"] and "non-text values" in samples[2].problems[0]
