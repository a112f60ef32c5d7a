"""Per-dataset sampling, fps and crop (data.datasets[].sampling, target_fps, window, short_clips, crop) and tag
shuffling: a clip's cache key adds its own dataset's settings where they differ from data.*'s (which the video
fingerprint holds, as before), so changing a dataset's own setting re-encodes that dataset only, and a cache made
before these keys existed stays valid."""

from __future__ import annotations

from cogtune.config import load_config
from cogtune.models import load_spec
from cogtune.train.encode import prepare_data, video_fingerprint
from test_image_training import write_stills
from test_several_datasets import _split


def _config(model, root, cache, sampling="uniform", b_crop="random", **stills):
    tree = {"model": {"path": str(model)}, "output_dir": str(root / "out"), "mixed_precision": "no",
            "data": {"sampling": sampling, "cache_dir": str(cache), "datasets": [
                {"root": str(root / "a")},
                {"root": str(root / "b"), "sampling": "fps", "target_fps": 4, "short_clips": "pad_last",
                 "crop": b_crop},
                {"root": str(root / "stills"), "trigger": "sks", **stills}]}}
    return load_config(None, base=tree)


def test_each_dataset_caches_by_its_own_settings(tiny_model, synth_data, tmp_path):
    _split(synth_data, tmp_path)
    write_stills(tmp_path / "stills")
    spec = load_spec(tiny_model())
    cache = tmp_path / "cache"

    first = prepare_data(spec, _config(tiny_model(), tmp_path, cache), progress=False)
    settings = [dict(it.settings) for it in first.dataset.items]
    shape = {"frames": 9, "height": 32, "width": 48}
    assert settings[0] == shape  # data.*'s settings: the key of a single data.root clip, as before
    assert settings[3] == shape | {"sampling": "fps", "target_fps": 4, "short_clips": "pad_last", "crop": "random",
                                   "seed": 42}  # window: center like data.window
    assert settings[6] == shape | {"frames": 1}  # data.crop
    fingerprint = video_fingerprint(spec, _config(tiny_model(), tmp_path, cache))
    assert {k: fingerprint[k] for k in ("sampling", "target_fps", "window", "short_clips", "crop", "seed")} == {
        "sampling": "uniform", "target_fps": 8, "window": "center", "short_clips": "skip", "crop": "center",
        "seed": None}  # what it held before per-dataset settings
    assert first.report.videos_encoded == 9

    again = prepare_data(spec, _config(tiny_model(), tmp_path, cache, b_crop="center"), progress=False)
    assert (again.report.videos_encoded, again.report.videos_cached) == (3, 6)  # b's clips only
    images = prepare_data(spec, _config(tiny_model(), tmp_path, cache, b_crop="center", crop="random"),
                          progress=False)
    assert (images.report.videos_encoded, images.report.videos_cached) == (3, 6)  # the images' own crop
    head = prepare_data(spec, _config(tiny_model(), tmp_path, cache, sampling="head", b_crop="center"),
                        progress=False)
    assert head.report.videos_encoded == 9  # data.* is in every key: a change there encodes all again
    assert first.report.prompts_encoded == 9 and head.report.prompts_encoded == 0

    shuffled = prepare_data(spec, _config(tiny_model(), tmp_path, cache, sampling="head", b_crop="center",
                                          shuffle_tags=True, tag_variants=3), progress=False)
    orders = shuffled.dataset.tag_orders
    assert orders[:6] == [[]] * 6 and all(len(o) == 2 for o in orders[6:])  # "a painting, NAME": two orders
    assert all(o.startswith("sks, ") for o in orders[6]) and "sks, wide, a painting" in orders[7] + orders[6] + orders[8]
    # of each image's two orders one is its caption as written, cached already: 3 new encodings, no clip again
    assert shuffled.report.videos_encoded == 0 and shuffled.report.prompts_encoded == 3

    # training shows each step one of the cached orders, drawn from (seed, step, position): no encoder runs
    import torch

    from cogtune.train.encode import collate
    from cogtune.train.loop import show_tag_orders

    data = shuffled.dataset
    cached = [data.prompt(o)["prompt_embeds"] for o in orders[7]]
    picked = []
    for step in range(8):
        batch = collate([data[7]], torch.device("cpu"))
        show_tag_orders(batch, data, 42, step, 0)
        picked.append(next(j for j, c in enumerate(cached) if torch.equal(batch["prompt_embeds"][0], c)))
        video = collate([data[0]], torch.device("cpu"))
        own = video["prompt_embeds"].clone()
        show_tag_orders(video, data, 42, step, 0)
        assert torch.equal(video["prompt_embeds"], own)  # a clip without shuffled tags keeps its caption
    assert set(picked) == {0, 1}
    again = collate([data[7]], torch.device("cpu"))
    show_tag_orders(again, data, 42, 5, 0)
    assert torch.equal(again["prompt_embeds"][0], cached[picked[5]])  # the same step and position: the same order
