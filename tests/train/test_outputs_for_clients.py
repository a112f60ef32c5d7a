"""What a LoRA run leaves for its users: the diffusers file and the ComfyUI core file side by side (final and in every
checkpoint-N), a model card huggingface_hub reads, metadata without local paths, and a config.yaml `train` takes
back as it is."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from diffusers import CogVideoXPipeline
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file

from cogtune.config import TrainConfig, load_config
from cogtune.errors import CogtuneError
from cogtune.export.lora_formats import COMFY_NAME, WEIGHT_NAME, resolve_lora_path
from cogtune.train.loop import train
from conftest import tiny_train_config
from helpers.lora import run_transformer, transformer_inputs

COMFY_BLOCK = {"attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.to_out.0": "attn_out"}  # ComfyUI core's
# own CogVideoX module names (comfy/ldm/cogvideo/model.py), written out here apart from the code under test


@pytest.fixture(scope="module")
def run(tiny_model, synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clients") / "run"
    cfg = tiny_train_config(tiny_model(), synth_data, out, checkpoint__every_steps=2, lora__alpha=4)
    result = train(cfg)
    return cfg, result, out


def _comfy_key(diffusers_key: str) -> str:
    m = re.fullmatch(r"transformer\.transformer_blocks\.(\d+)\.(.+)\.lora_([AB])\.weight", diffusers_key)
    return f"diffusion_model.blocks.{m[1]}.{COMFY_BLOCK[m[2]]}.lora_{'down' if m[3] == 'A' else 'up'}.weight"


@pytest.mark.parametrize("where", ["lora", "checkpoint-2", "checkpoint-4"])
def test_every_output_holds_both_files_with_the_same_weights(run, where):
    cfg, result, out = run
    folder = out / where
    diffusers, comfy = load_file(str(folder / WEIGHT_NAME)), load_file(str(folder / COMFY_NAME))
    assert set(comfy) == {_comfy_key(k) for k in diffusers} | {
        _comfy_key(k).replace(".lora_down.weight", ".alpha") for k in diffusers if ".lora_A." in k}
    assert all(torch.equal(comfy[_comfy_key(k)], v) for k, v in diffusers.items())
    # ComfyUI scales by alpha / rank with rank = lora_down.shape[0]: the trained alpha must be in every .alpha
    assert {v.item() for k, v in comfy.items() if k.endswith(".alpha")} == {cfg.lora.alpha}
    assert resolve_lora_path(folder) == folder / WEIGHT_NAME  # `--lora FOLDER` takes the diffusers file


def test_a_checkpoint_is_its_own_trainable_state_as_a_lora(run):
    _, _, out = run
    ckpt = out / "checkpoint-2"
    lora = load_file(str(ckpt / WEIGHT_NAME))
    trainable = load_file(str(ckpt / "trainable.safetensors"))  # what resume reads, in peft's names
    assert {f"transformer.{k.replace('.default.', '.')}" for k in trainable} == set(lora)
    assert all(torch.equal(lora[f"transformer.{k.replace('.default.', '.')}"], v) for k, v in trainable.items())


def test_diffusers_loads_a_folder_holding_both_files(run, tiny_model):
    """load_lora_weights(folder) without weight_name guesses among the folder's files: it must pick the diffusers
    one, and give the same transformer as naming the file."""
    _, _, out = run
    pipe = CogVideoXPipeline.from_pretrained(str(tiny_model()))
    inputs = transformer_inputs(pipe.transformer.config)
    base = run_transformer(pipe.transformer, inputs)
    pipe.load_lora_weights(str(out / "checkpoint-4"), adapter_name="guessed")
    guessed = run_transformer(pipe.transformer, inputs)
    pipe.delete_adapters("guessed")
    pipe.load_lora_weights(str(out / "checkpoint-4"), weight_name=WEIGHT_NAME, adapter_name="named")
    named = run_transformer(pipe.transformer, inputs)
    assert not torch.equal(guessed, base)
    torch.testing.assert_close(guessed, named, rtol=0, atol=0)  # the same file through the same code: identical


def test_metadata_and_card_hold_no_local_paths(run, tiny_model):
    cfg, _, out = run
    local = str(out.parents[1])  # the pytest temp root both the model and the run live under
    with safe_open(str(out / "lora" / WEIGHT_NAME), framework="pt") as f:
        meta = f.metadata()
    assert not [k for k, v in meta.items() if local in v or v.startswith("/")]
    assert meta["cogtune.base_model"] == tiny_model().name and len(meta["cogtune.base_model_fingerprint"]) == 32
    card = ModelCard.load(out / "lora" / "README.md")
    assert local not in card.content and "cogvideox-5b" in card.data.tags and card.data.library_name == "diffusers"
    assert card.data.base_model is None  # a tiny random model is no published one
    assert WEIGHT_NAME in card.text and COMFY_NAME in card.text and f"{cfg.lora.rank} / {cfg.lora.alpha:g}" in card.text


def test_the_saved_config_is_taken_back_as_it_is(run, tmp_path):
    cfg, _, out = run
    again = load_config(out / "config.yaml")
    assert again.model_dump() == cfg.model_dump()
    old = yaml.safe_load((out / "config.yaml").read_text()) | {"world_size": 1}  # what earlier runs wrote
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(CogtuneError, match="world_size is what earlier cogtune runs recorded.*delete that line"):
        load_config(tmp_path / "old.yaml")


def test_unknown_keys_name_the_override_and_the_key_meant(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: /m}\ndata: {root: /d}\n")
    with pytest.raises(CogtuneError) as e:
        load_config(path, ["lr=1e-4"])
    assert str(e.value).startswith("override lr=1e-4: unknown key 'lr': did you mean optimizer.lr?")
    path.write_text("model: {path: /m}\ndata: {root: /d, frame: 9}\n")
    with pytest.raises(CogtuneError, match=r"run.yaml: unknown key 'data.frame': did you mean data.frames\?"):
        load_config(path)


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    return set().union(*[_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
                         for k, v in tree.items()])


def test_help_keys_lists_every_key_with_its_default():
    out = subprocess.run([sys.executable, "-m", "cogtune", "train", "--help-keys"], capture_output=True, text=True,
                         check=True).stdout
    listed = dict(re.findall(r"^(\S+)\s+.*, default (.*)$", out, re.M))
    # buckets default to None (off): an empty section shows the keys inside it with their defaults
    defaults = TrainConfig.model_validate({"model": {"path": "m"}, "data": {"root": "d", "buckets": {}}}).model_dump()
    want = _leaves(defaults) - {"data.datasets"}  # a list of sections: its entries' keys are data.datasets[].key
    assert {k for k in listed if "[]" not in k} == want
    entry = TrainConfig.model_validate({"model": {"path": "m"}, "data": {"datasets": [{"root": "d", "buckets": {}}]}})
    assert {k for k in listed if "[]" in k} == {f"data.datasets[].{k}" for k in
                                                _leaves(entry.model_dump()["data"]["datasets"][0])}
    for key in want - {"model.path", "data.root"}:
        node = defaults
        for part in key.split("."):
            node = node[part]
        assert listed[key] == repr(node), key


def test_version_names_cogtune_and_its_libraries():
    from importlib.metadata import version

    import cogtune

    out = subprocess.run([sys.executable, "-m", "cogtune", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith(f"cogtune {cogtune.__version__} (") and f"diffusers {version('diffusers')}" in out.stdout
