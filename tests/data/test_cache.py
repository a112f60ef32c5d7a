"""cogtune.data.cache with real parts: real H.264 clips decoded by PyAV, the tiny CogVideoX VAE and T5 as encoders,
real safetensors files on disk. Counting wrappers only count calls."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cogtune.data.cache import CacheError, CacheItem, CachedClips, LatentCache, fingerprint_files

SIZE = {"frames": 9, "height": 32, "width": 48}


def read_clip(item: CacheItem) -> torch.Tensor:
    """The first `frames` frames, resized: [F, 3, H, W] in [-1, 1]."""
    s = item.settings
    frames = []
    with av.open(str(item.video)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == s["frames"]:
                break
    if len(frames) < s["frames"]:
        raise ValueError(f"{item.video} has {len(frames)} frames, {s['frames']} needed")
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(s["height"], s["width"]), mode="bilinear", antialias=True, align_corners=False)
    return x / 127.5 - 1.0


class Counting:
    """Calls `fn` and remembers each call's argument."""

    def __init__(self, fn, fail_after: int | None = None) -> None:
        self.fn, self.calls, self.fail_after = fn, [], fail_after

    def __call__(self, arg):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C here
        self.calls.append(arg)
        return self.fn(arg)


@pytest.fixture(scope="module")
def spec(tiny_model):
    from cogtune.models.cogvideox import CogVideoXSpec

    return CogVideoXSpec.load(tiny_model("cogvideox-5b"))


def dataset_items(root: Path, **settings) -> list[CacheItem]:
    captions = (root / "prompts.txt").read_text().splitlines()
    videos = (root / "videos.txt").read_text().splitlines()
    return [CacheItem(root / v, c, SIZE | settings) for v, c in zip(videos, captions)]


def make_cache(root: Path, spec, frames_mode: str = "head") -> LatentCache:
    model = Path(spec.model_path)
    video_fp = {"variant": spec.variant_name, "vae": fingerprint_files([model / "vae"]), "sampling": frames_mode}
    text_fp = {"encoder": fingerprint_files([model / "text_encoder", model / "tokenizer"]), "max_length": 226}
    return LatentCache(root, video_fp, text_fp)


def build(cache: LatentCache, items, spec, loader=None, **kw):
    load = loader or Counting(read_clip)
    enc_v, enc_p = Counting(spec.encode_videos), Counting(spec.encode_prompts)
    report = cache.build(items, load, enc_v, enc_p, progress=False, **kw)
    return report, load, enc_v, [c for call in enc_p.calls for c in call]


@pytest.fixture
def data(synth_data, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synth_data, root)  # a private copy: tests change files
    return root


def test_build_load_and_second_build_encodes_nothing(data, tmp_path, spec) -> None:
    items = dataset_items(data)
    cache = make_cache(tmp_path / "cache", spec)
    report, load, enc_v, captions = build(cache, items, spec)
    unique = list(dict.fromkeys(it.caption for it in items))
    assert (report.videos_encoded, report.prompts_encoded, report.failed) == (6, len(unique), [])
    assert len(load.calls) == len(enc_v.calls) == 6 and sorted(captions) == sorted(unique)
    for item in items:  # what is stored is what the encoder gave
        want = spec.encode_videos(read_clip(item).unsqueeze(0))
        got = cache.load(item)
        assert set(got) == {"latent_mean", "latent_logvar"}
        assert all(torch.equal(got[k], want[k][0]) for k in want)
        assert torch.equal(cache.prompt(item.caption)["prompt_embeds"], spec.encode_prompts([item.caption])["prompt_embeds"][0])
    assert cache.check(items).ready == list(range(6))
    sample = CachedClips(cache, items)[2]
    assert sample["prompt_embeds"].shape == (226, 32) and sample["latent_mean"].shape == (16, 3, 4, 6)

    report, load, enc_v, captions = build(make_cache(tmp_path / "cache", spec), items, spec)
    assert (report.videos_cached, report.prompts_cached) == (6, len(unique))
    assert (load.calls, enc_v.calls, captions, report.videos_encoded, report.prompts_encoded) == ([], [], [], 0, 0)


def test_changed_settings_and_captions_reencode_only_what_they_touch(data, tmp_path, spec) -> None:
    items = dataset_items(data)
    build(make_cache(tmp_path / "cache", spec), items, spec)

    longer = dataset_items(data, frames=17)
    report, load, _, captions = build(make_cache(tmp_path / "cache", spec), longer, spec)
    assert (report.videos_encoded, report.prompts_encoded, captions) == (6, 0, [])
    assert make_cache(tmp_path / "cache", spec).load(longer[0])["latent_mean"].shape[1] == 5  # 17 frames -> 5

    # a build-wide setting is in the video fingerprint: it re-encodes latents, never text
    report, _, _, captions = build(make_cache(tmp_path / "cache", spec, frames_mode="uniform"), items, spec)
    assert (report.videos_encoded, captions) == (6, [])

    edited = list(items)
    edited[3] = CacheItem(items[3].video, "a pink star moving up on a black background", items[3].settings)
    report, load, enc_v, captions = build(make_cache(tmp_path / "cache", spec), edited, spec)
    assert captions == ["a pink star moving up on a black background"]
    assert (report.prompts_encoded, report.videos_encoded, load.calls) == (1, 0, [])

    # a new file at the same path (size/mtime change) re-encodes that clip only
    os.utime(items[1].video, ns=(time.time_ns(), time.time_ns() + 10**9))
    report, load, _, captions = build(make_cache(tmp_path / "cache", spec), items, spec)
    assert [it.video for it in load.calls] == [items[1].video] and captions == []


def test_interrupted_build_resumes_with_only_the_missing_entries(data, tmp_path, spec) -> None:
    items = dataset_items(data)
    cache = make_cache(tmp_path / "cache", spec)
    with pytest.raises(KeyboardInterrupt):
        build(cache, items, spec, loader=Counting(read_clip, fail_after=2))
    done = [i for i, it in enumerate(items) if cache.video_path(it).is_file()]
    assert len(done) == 2
    # a writer killed mid-file leaves a hidden temp file beside the entry it was writing: never counted
    victim = cache.video_path(items[[i for i in range(6) if i not in done][0]])
    victim.parent.mkdir(parents=True, exist_ok=True)
    stale = victim.with_name(f".{victim.name}.999.deadbeef.tmp")
    stale.write_bytes(cache.video_path(items[done[0]]).read_bytes()[:100])
    assert len(cache.check(items).ready) == 2

    report, load, _, captions = build(cache, items, spec)
    assert sorted(items.index(it) for it in load.calls) == [i for i in range(6) if i not in done]
    assert (report.videos_encoded, report.videos_cached, captions) == (4, 2, [])
    assert cache.check(items).ready == list(range(6)) and not stale.exists()
    assert all(cache.load(it)["latent_mean"].shape == (16, 3, 4, 6) for it in items)


@pytest.mark.slow
def test_build_killed_by_sigkill_resumes(data, tmp_path, spec) -> None:
    items = dataset_items(data)
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_cache import build, dataset_items, make_cache, read_clip
        from cogtune.models.cogvideox import CogVideoXSpec
        from pathlib import Path
        spec = CogVideoXSpec.load({spec.model_path!r})
        def slow(item):
            time.sleep(0.5)
            return read_clip(item)
        cache = make_cache(Path({str(tmp_path / 'cache')!r}), spec)
        build(cache, dataset_items(Path({str(data)!r})), spec, loader=slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    cache = make_cache(tmp_path / "cache", spec)
    deadline = time.time() + 120
    while sum(cache.video_path(it).is_file() for it in items) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sum(cache.video_path(it).is_file() for it in items)
    assert 2 <= done < 6
    report, load, _, _ = build(cache, items, spec)
    assert len(load.calls) == report.videos_encoded == 6 - done and report.videos_cached == done
    assert cache.check(items).ready == list(range(6))


def test_truncated_entry_is_detected_and_reencoded(data, tmp_path, spec) -> None:
    items = dataset_items(data)
    cache = make_cache(tmp_path / "cache", spec)
    build(cache, items, spec)
    path = cache.video_path(items[4])
    whole = cache.load(items[4])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CacheError, match="corrupt"):
        cache.load(items[4])
    assert cache.check(items).problems.keys() == {4}
    report, load, _, _ = build(cache, items, spec)
    assert load.calls == [items[4]] and report.repaired == [str(path)] and report.videos_encoded == 1
    assert all(torch.equal(cache.load(items[4])[k], whole[k]) for k in whole)


def test_two_ranks_encode_disjoint_shares_that_cover_everything(data, tmp_path, spec) -> None:
    items = dataset_items(data)
    cache = make_cache(tmp_path / "cache", spec)
    runs = [build(cache, items, spec, rank=r, world_size=2) for r in range(2)]
    loaded = [{str(it.video) for it in load.calls} for _, load, _, _ in runs]
    prompted = [set(captions) for _, _, _, captions in runs]
    assert not loaded[0] & loaded[1] and loaded[0] | loaded[1] == {str(it.video) for it in items}
    assert all(loaded) and not prompted[0] & prompted[1]
    assert prompted[0] | prompted[1] == {it.caption for it in items}
    assert sum(r.videos_total for r, *_ in runs) == 6
    assert cache.check(items).ready == list(range(6))  # every rank reads every entry
    report, load, _, captions = build(cache, items, spec)
    assert (report.videos_encoded, load.calls, captions) == (0, [], [])


def test_bad_clips_are_reported_and_skipped(data, tmp_path, spec) -> None:
    (data / "videos" / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    items = dataset_items(data)
    items += [CacheItem(data / "videos" / "broken.mp4", "broken", SIZE), CacheItem(data / "nope.mp4", "gone", SIZE)]
    cache = make_cache(tmp_path / "cache", spec)
    report, load, _, _ = build(cache, items, spec)
    assert report.videos_encoded == 6 and {src for src, _ in report.failed} == {str(items[6].video),
                                                                                  str(items[7].video)}
    check = cache.check(items)
    assert check.ready == list(range(6)) and set(check.problems) == {6, 7}
    assert "failed:" in check.problems[6] and "source" in check.problems[7]
    with pytest.raises(CacheError, match="could not be cached"):
        cache.load(items[6])
    # the loader's failure is remembered for this source and these settings
    report, load, _, _ = build(cache, items, spec)
    assert load.calls == [] and len(report.failed) == 2
    report, load, _, _ = build(cache, items, spec, retry_failed=True)
    assert load.calls == [items[6]]


def test_i2v_entries_hold_the_first_frame_latents(synth_data, tmp_path, tiny_model) -> None:
    from cogtune.models.cogvideox import CogVideoXSpec

    spec = CogVideoXSpec.load(tiny_model("cogvideox-5b-i2v"))
    items = dataset_items(synth_data)[:2]
    cache = make_cache(tmp_path / "cache", spec)
    build(cache, items, spec)
    got, want = cache.load(items[0]), spec.encode_videos(read_clip(items[0]).unsqueeze(0))
    assert {"latent_mean", "image_mean", "image_logvar"} <= set(got) == set(want)  # whatever the encoder returns
    assert all(torch.equal(got[k], want[k][0]) for k in want) and got["image_mean"].shape == (16, 1, 4, 6)


def test_fingerprint_files(tmp_path, tiny_model) -> None:
    vae = Path(tiny_model("cogvideox-5b")) / "vae"
    copy = tmp_path / "elsewhere" / "vae"
    shutil.copytree(vae, copy)
    assert fingerprint_files([vae]) == fingerprint_files([copy])  # location and mtime do not count
    weights = copy / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert fingerprint_files([vae]) != fingerprint_files([copy])
    big = tmp_path / "big.bin"  # above 1 MiB only samples are read: a change inside the first one is seen
    big.write_bytes(bytes(4 << 20))
    before = fingerprint_files([big])
    with open(big, "r+b") as f:
        f.seek(10)
        f.write(b"x")
    assert fingerprint_files([big]) != before


def test_cache_folder_that_is_a_file_is_one_clear_error(data, tmp_path, spec) -> None:
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(CacheError, match=r"cannot create the cache folder .*cache.*data\.cache_dir"):
        build(make_cache(tmp_path / "cache", spec), dataset_items(data), spec)


def test_a_clip_that_fails_to_decode_is_reported_once_in_plain_words(data, tmp_path, spec, caplog) -> None:
    """Its header promises 40 frames but the file was cut short: planning accepts it, decoding fails."""
    from cogtune.errors import CogtuneError
    from cogtune.train.encode import prepare_data
    from conftest import tiny_train_config

    def gone(item: CacheItem) -> torch.Tensor:
        raise CogtuneError(f"{item.video} decodes to 3 frames")

    first = data / "videos" / "clip_000.mp4"
    report, _, _, _ = build(make_cache(tmp_path / "c1", spec), [CacheItem(first, "x", SIZE)], spec, loader=gone)
    assert report.failed == [(str(first), f"{first} decodes to 3 frames")]

    cut = data / "videos" / "cut.mp4"
    with av.open(str(cut), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for img in np.random.default_rng(0).integers(0, 256, (40, 64, 96, 3), dtype=np.uint8):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 2 // 3])
    with open(data / "videos.txt", "a") as f:
        f.write("videos/cut.mp4\n")
    with open(data / "prompts.txt", "a") as f:
        f.write("a clip cut short\n")
    cfg = tiny_train_config(spec.model_path, data, tmp_path / "run")
    with caplog.at_level("WARNING", logger="cogtune"):
        prepared = prepare_data(spec, cfg, progress=False)
    assert len(prepared.dataset) == 6 and [s.split(":")[0] for s in prepared.skipped] == ["videos/cut.mp4"]
    assert [r.levelname for r in caplog.records if "cut.mp4" in r.getMessage()] == ["WARNING"]  # once, not twice
    assert "Error:" not in prepared.skipped[0]  # the user's words, no exception class name
