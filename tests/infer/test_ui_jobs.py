"""What `cogtune ui` may open and what a job leaves behind, without a browser: the folders' listing, refusals,
one base load for many adapter switches, cancel, unique names and the records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cogtune.errors import CogtuneError
from cogtune.infer.ui_jobs import Cancelled, Pick, Request, Studio, adapter_name
from cogtune.infer.ui_library import LORA_FILE, Library


@pytest.fixture
def folders(ui_folders, tmp_path):
    """The shared folders plus a run with a checkpoint, a loose LoRA file and files that are no LoRA."""
    models, loras = ui_folders
    mine = tmp_path / "loras"
    shutil.copytree(loras, mine)
    run = mine / "run1"
    (run / "checkpoint-4").mkdir()
    shutil.copy(run / "lora" / LORA_FILE, run / "checkpoint-4" / LORA_FILE)
    shutil.copy(run / "lora" / LORA_FILE, run / "lora" / "lora_comfyui.safetensors")  # the same adapter again
    (run / "checkpoint-4" / "model.safetensors").write_bytes(b"x")  # accelerate's state, not an adapter
    shutil.copy(run / "lora" / LORA_FILE, mine / "loose.safetensors")
    return models, mine


def test_library_lists_models_and_adapters_under_its_roots_only(folders, tmp_path):
    models, loras = folders
    lib = Library([models], [loras])
    assert lib.models() == [models / "i2v", models / "t2v"]  # not their transformer/ or vae/ folders
    assert [lib.label(p) for p in lib.loras()] == ["loras/loose.safetensors", "loras/run1/checkpoint-4",
                                                   "loras/run1/lora", "loras/run2/lora"]
    assert lib.model(str(models / "t2v")) == models / "t2v" == lib.model("models/t2v")
    outside = tmp_path / "elsewhere"
    shutil.copytree(models / "t2v", outside)
    (loras / "link").symlink_to(outside, target_is_directory=True)  # a link out of the root is not followed
    for bad in (str(outside), str(loras / "link"), "../models/t2v", "", str(models)):
        with pytest.raises(CogtuneError, match="choose a model|not one this UI serves"):
            lib.model(bad)
    with pytest.raises(CogtuneError, match="--loras-dir"):
        lib.lora(str(loras / "run1" / "checkpoint-4" / "model.safetensors"))
    with pytest.raises(CogtuneError, match="--models-dir .*: no such folder"):
        Library([tmp_path / "missing"])


@pytest.mark.parametrize("path, name", [("runs/style/lora/" + LORA_FILE, "style"),
                                        ("runs/style/checkpoint-250/" + LORA_FILE, "style-250"),
                                        ("downloads/my lora v2.safetensors", "my_lora_v2")])
def test_adapter_names_come_from_the_run(path, name):
    assert adapter_name(Path(path)) == name


def test_jobs_switch_adapters_on_one_base_and_record_everything(folders, tmp_path):
    models, loras = folders
    studio = Studio(Library([models], [loras]), tmp_path / "out", {"dtype": "fp32"})
    a, b = loras / "run1" / "lora" / LORA_FILE, loras / "run2" / "lora" / LORA_FILE
    base = Request(models / "t2v", "a red circle", steps=2, seed=1)
    first = studio.run(Request(**{**base.__dict__, "adapters": [Pick(a, 0.5)]}))
    second = studio.run(Request(**{**base.__dict__, "adapters": [Pick(a, 1.0, "x"), Pick(b, 0.3)]}))
    plain = studio.run(base)
    assert studio.loads == 1 and len(studio._loaded) == 2  # one base model, each adapter file read once
    records = [first, second, plain]
    assert len({r["video"] for r in records}) == 3  # same settings, never the same name
    assert [r["adapters"] for r in records][1][1]["name"] == "run2" and second["adapters"][0]["weight"] == 1.0
    on_disk = [json.loads((studio.out_dir / (r["video"][:-4] + ".json")).read_text()) for r in records]
    assert on_disk == records
    assert "--lora " + f"{a}:0.5@run1" in first["command"] and "--seed 1 --steps 2" in first["command"]
    (studio.out_dir / "broken.json").write_text("{not json")
    (studio.out_dir / "other.json").write_text('{"a": 1}')
    assert [r["video"] for r in studio.history()] == [r["video"] for r in sorted(
        records, key=lambda r: r["created"], reverse=True)]


def test_cancel_leaves_nothing_and_refusals_name_the_field(folders, tmp_path):
    models, loras = folders
    studio = Studio(Library([models], [loras]), tmp_path / "out", {"dtype": "fp32"})
    seen = []

    def progress(done, total, text):
        seen.append((done, total, text))
        if done == 2:
            assert studio.cancel()
    with pytest.raises(Cancelled, match="cancelled at step 3 of 20"):
        studio.run(Request(models / "t2v", "x", steps=20, seed=0), progress)
    assert list(studio.out_dir.iterdir()) == [] and not studio.cancel()
    assert seen[0][2] == "loading the model" and "about" in seen[1][2] and seen[1][2].endswith("s left")

    a = loras / "run1" / "lora" / LORA_FILE
    for req, expect in [
        (Request(models / "t2v", "x", adapters=[Pick(a), Pick(a)]), "chosen twice"),
        (Request(models / "t2v", "x", adapters=[Pick(a, 1, "n"), Pick(loras / "loose.safetensors", 1, "n")]),
         "named 'n'"),
        (Request(models / "t2v", "x", compare=True), "compare needs at least one adapter"),
        (Request(models / "t2v", "x", adapters=[Pick(a, float("nan"))]), "not a finite number"),
        (Request(models / "t2v", "x", frames=10), "--frames: cogvideox-5b takes 8N\\+1"),
        (Request(models / "i2v", "x"), "image-to-video"),
    ]:
        with pytest.raises(CogtuneError, match=expect):
            studio.run(req)
    assert list(studio.out_dir.iterdir()) == []
