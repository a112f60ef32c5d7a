"""Battery: damaged model folders, LoRAs and sampling options through the real `cogtune` (generate, train, lora).

Every case is refused with exit 2 and one line naming the file or option at fault, before any weight is loaded
(no output file or folder appears), and the damaged inputs are left as they were.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from harness import assert_intact, assert_no_temp, assert_refused, cli, snapshot

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
PRESET_5B = Path(__file__).resolve().parents[2] / "configs" / "cogvideox-5b" / "lora_24gb.yaml"
TRANSFORMER = Path("transformer") / "diffusion_pytorch_model.safetensors"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _shard(model: Path) -> None:
    """Split the transformer into two shards with an index, then lose the second shard."""
    folder = model / "transformer"
    with safe_open(str(folder / TRANSFORMER.name), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    (folder / TRANSFORMER.name).unlink()
    keys = sorted(tensors)
    names = ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors")
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    for name, part in zip(names, halves):
        save_file({k: tensors[k] for k in part}, str(folder / name))
    weight_map = {k: names[i] for i, part in enumerate(halves) for k in part}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / names[1]).unlink()


# (case, damage to a copy of the tiny 5B folder, what the line must name)
DAMAGED_MODELS = [
    ("truncated transformer weights", lambda m: _truncate(m / TRANSFORMER), "diffusion_pytorch_model.safetensors"),
    ("empty transformer weights", lambda m: (m / TRANSFORMER).write_bytes(b""), "empty"),
    ("weights with garbage header", lambda m: (m / TRANSFORMER).write_bytes(struct.pack("<Q", 20) + b"{not json" * 3),
     "diffusion_pytorch_model.safetensors"),
    ("padded weights", lambda m: (m / TRANSFORMER).write_bytes((m / TRANSFORMER).read_bytes() + b"\0" * 64),
     "longer than its tensors"),
    ("pickle-only transformer", lambda m: (m / TRANSFORMER).rename(m / "transformer" / "diffusion_pytorch_model.bin"),
     "diffusion_pytorch_model.bin"),
    ("missing shard", _shard, "00002-of-00002"),
    ("no tokenizer folder", lambda m: shutil.rmtree(m / "tokenizer"), "tokenizer"),
    ("tokenizer without its model", lambda m: (m / "tokenizer" / "tokenizer.json").unlink(), "tokenizer"),
    ("no text-encoder weights", lambda m: (m / "text_encoder" / "model.safetensors").unlink(), "text_encoder"),
    ("transformer config not JSON", lambda m: (m / "transformer" / "config.json").write_text("{'a': 1"),
     "transformer/config.json"),
    ("vae config a list", lambda m: (m / "vae" / "config.json").write_text("[1, 2]"), "vae/config.json"),
    ("no model_index.json", lambda m: (m / "model_index.json").unlink(), "model_index.json"),
    ("model_index without a scheduler", lambda m: (m / "model_index.json").write_text(
        json.dumps({k: v for k, v in json.loads((m / "model_index.json").read_text()).items() if k != "scheduler"})),
     "scheduler"),
    ("scheduler config not UTF-8", lambda m: (m / "scheduler" / "scheduler_config.json").write_bytes(b"\xff\xfe{"),
     "scheduler_config.json"),
]


@pytest.fixture
def damaged(tiny_model, tmp_path):
    def make(damage) -> Path:
        model = tmp_path / "model"
        shutil.copytree(tiny_model("cogvideox-5b"), model)
        damage(model)
        return model
    return make


@pytest.mark.parametrize("damage, name", [c[1:] for c in DAMAGED_MODELS], ids=[c[0] for c in DAMAGED_MODELS])
def test_generate_refuses_a_damaged_model_folder(damaged, tmp_path, damage, name):
    model = damaged(damage)
    before = snapshot(model)
    r = cli("generate", "--model", model, "--prompt", "x", "--steps", "1", "--out", tmp_path / "v.mp4")
    assert_refused(r, name)
    assert not (tmp_path / "v.mp4").exists()
    assert_intact(before, model)


def test_train_refuses_a_damaged_model_before_writing(damaged, synth_data, tmp_path):
    model = damaged(DAMAGED_MODELS[0][1])
    r = cli("train", QUICKSTART, f"model.path={model}", f"data.root={synth_data}", f"output_dir={tmp_path / 'run'}")
    assert_refused(r, "diffusion_pytorch_model.safetensors")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variant", ["cogvideox1.5-5b", "cogvideox-5b-i2v", "cogvideox-2b"])
def test_a_named_variant_must_match_the_folder(tiny_model, synth_data, tmp_path, variant):
    r = cli("train", QUICKSTART, f"model.path={tiny_model('cogvideox-5b')}", f"model.variant={variant}",
            f"data.root={synth_data}", f"output_dir={tmp_path / 'run'}")
    assert_refused(r, f"model.variant={variant}", "is cogvideox-5b")
    assert not (tmp_path / "run").exists()


def test_a_5b_preset_on_a_2b_folder_is_refused(tiny_model, synth_data, tmp_path):
    r = cli("train", PRESET_5B, f"model.path={tiny_model('cogvideox-2b')}", f"data.root={synth_data}",
            f"output_dir={tmp_path / 'run'}")
    assert_refused(r, "cogvideox-2b")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("targets, name", [("[to_qq]", "to_qq"), ("[norm_final]", "LayerNorm")],
                         ids=["no such module", "a LayerNorm"])
def test_bad_target_modules_are_refused_before_caching(tiny_model, synth_data, tmp_path, targets, name):
    r = cli("train", QUICKSTART, f"model.path={tiny_model('cogvideox-5b')}", f"data.root={synth_data}",
            f"output_dir={tmp_path / 'run'}", f"lora.target_modules={targets}")
    assert_refused(r, "lora.target_modules", name)
    assert not (tmp_path / "run" / "cache").exists()


# --- LoRA files -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_file(tiny_model, tmp_path_factory):
    """A real LoRA of the tiny 5B transformer, saved by cogtune's own writer (B made non-zero so it acts)."""
    from diffusers import CogVideoXTransformer3DModel

    from cogtune.train.lora import add_lora, save_lora

    root = tmp_path_factory.mktemp("lora")
    transformer = CogVideoXTransformer3DModel.from_pretrained(str(tiny_model("cogvideox-5b")), subfolder="transformer")
    add_lora(transformer, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    return save_lora(transformer, root / "good", {"variant": "cogvideox-5b"})


def _rewrite(src: Path, dst: Path, change=None, metadata_change=None) -> Path:
    with safe_open(str(src), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    if change:
        change(tensors)
    if metadata_change:
        metadata_change(metadata)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata)
    return dst


def _first_b(tensors, value):
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key][0, 0] = value


BAD_LORAS = [
    ("NaN weight", dict(change=lambda t: _first_b(t, float("nan"))), "NaN"),
    ("inf weight", dict(change=lambda t: _first_b(t, float("inf"))), "inf"),
    ("metadata not JSON", dict(metadata_change=lambda m: m.update(lora_adapter_metadata="{broken")), "JSON"),
    ("alpha of NaN in metadata", dict(metadata_change=lambda m: m.update(lora_adapter_metadata=json.dumps(
        {**json.loads(m["lora_adapter_metadata"]), "transformer.lora_alpha": float("nan")}))), "alpha"),
    ("integer weights", dict(change=lambda t: t.update({k: t[k].to(torch.int32) for k in t if "lora_A" in k})),
     "int32"),
]


def _lora_commands(bad: Path, model: Path, tmp_path: Path) -> dict[str, tuple]:
    return {"generate": ("generate", "--model", model, "--prompt", "x", "--steps", "1", "--lora", bad,
                         "--out", tmp_path / "v.mp4"),
            "convert": ("lora", "convert", bad, tmp_path / "comfy.safetensors", "--to", "comfyui"),
            "merge": ("lora", "merge", "--model", model, "--lora", bad, tmp_path / "merged")}


# every damage through `lora convert`; the NaN file also through generate and merge (the same reader guards all three)
CASES = [(c, "convert") for c in BAD_LORAS] + [(BAD_LORAS[0], "generate"), (BAD_LORAS[0], "merge")]


@pytest.mark.parametrize("case, command", CASES, ids=[f"{c[0]}-{cmd}" for c, cmd in CASES])
def test_a_bad_lora_is_refused(lora_file, tiny_model, tmp_path, case, command):
    _, damage, name = case
    bad = _rewrite(lora_file, tmp_path / "bad" / "pytorch_lora_weights.safetensors", **damage)
    before = snapshot(bad.parent)
    r = cli(*_lora_commands(bad, tiny_model("cogvideox-5b"), tmp_path)[command])
    assert_refused(r, name, "pytorch_lora_weights.safetensors")
    assert not any((tmp_path / p).exists() for p in ("v.mp4", "comfy.safetensors", "merged"))
    assert_intact(before, bad.parent)
    assert_no_temp(tmp_path)


def test_a_truncated_lora_is_refused(lora_file, tiny_model, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(lora_file.read_bytes()[:-100])
    r = cli("generate", "--model", tiny_model("cogvideox-5b"), "--prompt", "x", "--steps", "1", "--lora", bad,
            "--out", tmp_path / "v.mp4")
    assert_refused(r, "cut.safetensors")
    assert not (tmp_path / "v.mp4").exists()


def test_a_lora_of_another_variant_is_refused_before_loading(tiny_model, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    from cogtune.train.lora import add_lora, save_lora

    transformer = CogVideoXTransformer3DModel.from_pretrained(str(tiny_model("cogvideox-2b")), subfolder="transformer")
    add_lora(transformer, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    lora = save_lora(transformer, tmp_path / "lora2b", {"variant": "cogvideox-2b"})
    r = cli("generate", "--model", tiny_model("cogvideox-5b"), "--prompt", "x", "--steps", "1", "--lora", lora,
            "--out", tmp_path / "v.mp4")
    assert_refused(r, "pytorch_lora_weights.safetensors")
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("alpha", ["nan", "0", "-4", "inf"])
def test_lora_convert_alpha_must_be_a_positive_finite_number(lora_file, tmp_path, alpha):
    r = cli("lora", "convert", lora_file, tmp_path / "out.safetensors", "--to", "comfyui", "--alpha", alpha)
    assert_refused(r, "--alpha")
    assert not (tmp_path / "out.safetensors").exists()


# --- sampling options: refused while the command line is read, before the model loads ----------------------------

def _bomb_png(path: Path) -> Path:
    """A PNG whose header claims 60000x60000 pixels (3.6 gigapixels) in a file of a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


OPTIONS = [
    ("10000 steps", ["--steps", "10000"], "--steps"),
    ("70-bit seed", ["--seed", str(2**70)], "--seed"),
    ("negative seed", ["--seed", "-1"], "--seed"),
    ("huge guidance", ["--guidance-scale", "1e9"], "--guidance-scale"),
    ("NaN adapter weight", ["--lora", "some/lora.safetensors:nan"], "--lora"),
    ("a million frames", ["--frames", "1000000"], "--frames"),
]


@pytest.mark.parametrize("extra, name", [c[1:] for c in OPTIONS], ids=[c[0] for c in OPTIONS])
def test_sampling_options_have_ranges(tiny_model, tmp_path, extra, name):
    r = cli("generate", "--model", tiny_model("cogvideox-5b"), "--prompt", "x", "--out", tmp_path / "v.mp4", *extra)
    assert_refused(r, name)
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("image", ["bomb", "text"])
def test_a_first_frame_that_is_no_safe_image_is_refused(tiny_model, tmp_path, image):
    path = _bomb_png(tmp_path / "bomb.png") if image == "bomb" else tmp_path / "notes.png"
    if image == "text":
        path.write_text("not an image")
    r = cli("generate", "--model", tiny_model("cogvideox-5b-i2v"), "--prompt", "x", "--steps", "1",
            "--image", path, "--out", tmp_path / "v.mp4")
    assert_refused(r, "--image", path.name)
    assert not (tmp_path / "v.mp4").exists()
