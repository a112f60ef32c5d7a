"""I2V datasets that list their own conditioning images (images.txt / an `image` column): the image, resized and
cropped like the frames, is what conditions training; without a list, the first selected frame does."""

from __future__ import annotations

import shutil

import torch
from PIL import Image

from cogtune.models import load_spec
from cogtune.train.encode import prepare_data
from conftest import tiny_train_config

VARIANT = "cogvideox-5b-i2v"
COLOURS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 0), (0, 200, 200), (200, 0, 200)]


def _with_images(synth_data, root, colours):
    shutil.copytree(synth_data, root, ignore=shutil.ignore_patterns(".cogtune_cache"))
    (root / "images").mkdir(exist_ok=True)
    names = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (90, 50), colour).save(root / "images" / f"{i}.png")  # another aspect than the clips
        names.append(f"images/{i}.png")
    (root / "images.txt").write_text("\n".join(names) + "\n")
    return root


def _prepare(tiny_model, root, out):
    cfg = tiny_train_config(tiny_model(VARIANT), root, out)
    spec = load_spec(cfg.model.path, cfg.model.variant)
    return spec, cfg, prepare_data(spec, cfg, progress=False)


def _by_path(data):
    return {data.dataset.listed[i]: data.dataset[i] for i in range(len(data.dataset))}


def test_listed_images_condition_training(tiny_model, synth_data, tmp_path):
    root = _with_images(synth_data, tmp_path / "data", COLOURS)
    spec, cfg, data = _prepare(tiny_model, root, tmp_path / "run")
    videos = (root / "videos.txt").read_text().split()
    items = _by_path(data)
    assert len(items) == len(COLOURS)
    for n, listed in enumerate(videos):
        item = items[listed]
        # a solid colour stays that colour through any resize and crop: c / 127.5 - 1 everywhere
        want = torch.tensor(COLOURS[n], dtype=torch.float32).div(127.5).sub(1).view(3, 1, 1)
        pixels = item["image_pixels"]
        assert pixels.shape == (3, cfg.data.height, cfg.data.width)
        torch.testing.assert_close(pixels, want.expand_as(pixels), atol=1e-5, rtol=0)
        with torch.no_grad():  # the cached latents are the stock VAE's encoding of that image
            dist = spec.vae.encode(pixels[None, :, None]).latent_dist
        torch.testing.assert_close(item["image_mean"], dist.mean[0], atol=1e-5, rtol=1e-5)


def test_first_frame_without_a_list_and_image_change_re_encodes(tiny_model, synth_data, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(synth_data, plain, ignore=shutil.ignore_patterns(".cogtune_cache"))
    _, _, data = _prepare(tiny_model, plain, tmp_path / "run0")
    first = _by_path(data)
    listed = next(iter(first))
    pixels = first[listed]["image_pixels"]
    assert pixels.amax() - pixels.amin() > 0.5  # a frame of the clip (a moving shape), not a solid colour

    root = _with_images(synth_data, tmp_path / "data", COLOURS)
    _, _, data = _prepare(tiny_model, root, tmp_path / "run1")
    before = _by_path(data)
    assert not torch.equal(before[listed]["image_pixels"], first[listed]["image_pixels"])
    Image.new("RGB", (90, 50), (255, 255, 255)).save(root / "images" / "0.png")  # the user swaps one image
    _, _, data = _prepare(tiny_model, root, tmp_path / "run2")
    assert data.report.videos_encoded == 1  # only the clip whose image changed
    after = _by_path(data)
    videos = (root / "videos.txt").read_text().split()
    torch.testing.assert_close(after[videos[0]]["image_pixels"], torch.ones_like(after[videos[0]]["image_pixels"]))
    torch.testing.assert_close(after[videos[1]]["image_pixels"], before[videos[1]]["image_pixels"])


def test_unreadable_image_skips_the_clip_with_its_reason(tiny_model, synth_data, tmp_path):
    root = _with_images(synth_data, tmp_path / "data", COLOURS)
    (root / "images" / "2.png").write_bytes(b"not a png")
    _, _, data = _prepare(tiny_model, root, tmp_path / "run")
    assert len(data.dataset) == len(COLOURS) - 1
    assert any("2.png" in line and "not a readable image" in line for line in data.skipped), data.skipped


def test_a_t2v_run_ignores_the_image_list(tiny_model, synth_data, tmp_path):
    """images.txt is optional and for I2V models: a text-to-video run trains every clip, also those whose listed
    image is missing or broken, and an I2V run skips exactly those."""
    root = _with_images(synth_data, tmp_path / "data", COLOURS)
    (root / "images" / "1.png").unlink()
    (root / "images" / "2.png").write_bytes(b"not a png")
    cfg = tiny_train_config(tiny_model("cogvideox-5b"), root, tmp_path / "t2v")
    data = prepare_data(load_spec(cfg.model.path), cfg, progress=False)
    assert len(data.dataset) == len(COLOURS) and not data.skipped
    assert all("image_pixels" not in data.dataset[i] for i in range(len(data.dataset)))
    _, _, i2v = _prepare(tiny_model, root, tmp_path / "i2v")
    videos = (root / "videos.txt").read_text().split()
    assert sorted(s.split(":")[0] for s in i2v.skipped) == sorted([videos[1], videos[2]])
