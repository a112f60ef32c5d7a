"""save_transformer_folder / ShardWriter / verify_transformer_folder on a tiny CogVideoX transformer, real files."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file

from cogtune.errors import CogtuneError
from cogtune.export.shards import (INDEX_NAME, WEIGHTS_NAME, ShardWriter, TensorSpec, read_safetensors_header,
                                   save_transformer_folder, verify_transformer_folder)
from cogtune.models.tiny import tiny_configs


@pytest.fixture(scope="module")
def transformer(tiny_model):
    return CogVideoXTransformer3DModel.from_pretrained(tiny_model("cogvideox-5b") / "transformer").eval()


def run(model: CogVideoXTransformer3DModel) -> torch.Tensor:
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 3, cfg.in_channels, 4, 6, generator=gen),
                     encoder_hidden_states=torch.randn(1, 226, cfg.text_embed_dim, generator=gen),
                     timestep=torch.tensor([500]), return_dict=False)[0]


def test_sharded_folder_matches_diffusers_and_loads(transformer, tmp_path):
    out = save_transformer_folder(transformer, None, tmp_path / "ours", max_shard_size="20KB")
    transformer.save_pretrained(tmp_path / "diffusers", max_shard_size="20KB")

    ours = sorted(p.name for p in out.iterdir())
    assert ours == sorted(p.name for p in (tmp_path / "diffusers").iterdir())
    shards = [n for n in ours if n.endswith(".safetensors")]
    assert len(shards) > 3 and shards[0] == "diffusion_pytorch_model-00001-of-%05d.safetensors" % len(shards)
    assert (out / INDEX_NAME).read_text() == (tmp_path / "diffusers" / INDEX_NAME).read_text()  # byte for byte
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "diffusers/config.json").read_text())
    for name in shards:
        assert read_safetensors_header(out / name)["__metadata__"] == {"format": "pt"}
        ours_t, theirs = load_file(out / name), load_file(tmp_path / "diffusers" / name)
        assert ours_t.keys() == theirs.keys() and all(torch.equal(ours_t[k], theirs[k]) for k in ours_t)

    loaded = CogVideoXTransformer3DModel.from_pretrained(out).eval()
    assert all(torch.equal(t, transformer.state_dict()[k]) for k, t in loaded.state_dict().items())
    # diffusers' sharded load path itself moves outputs by ~1e-7 (same weights); ours loads exactly like its own save
    assert torch.equal(run(loaded), run(CogVideoXTransformer3DModel.from_pretrained(tmp_path / "diffusers").eval()))
    torch.testing.assert_close(run(loaded), run(transformer), rtol=0, atol=1e-5)


def test_single_file_from_state_dict_and_config(transformer, tmp_path):
    config = tiny_configs("cogvideox-5b")["transformer"]
    out = save_transformer_folder(transformer.state_dict(), config, tmp_path / "single")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", WEIGHTS_NAME]
    with safe_open(out / WEIGHTS_NAME, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((out / "config.json").read_text())["_class_name"] == "CogVideoXTransformer3DModel"
    assert torch.equal(run(CogVideoXTransformer3DModel.from_pretrained(out).eval()), run(transformer))


def test_dtype_conversion(transformer, tmp_path):
    out = save_transformer_folder(transformer, None, tmp_path / "bf16", dtype="bf16", max_shard_size="30KB")
    header = {}
    for name in (p for p in out.iterdir() if p.suffix == ".safetensors"):
        header.update({k: v for k, v in read_safetensors_header(name).items() if k != "__metadata__"})
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in transformer.state_dict().values())
    loaded = CogVideoXTransformer3DModel.from_pretrained(out, torch_dtype=torch.bfloat16)
    for k, t in transformer.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], t.to(torch.bfloat16)), k


def test_refuses_non_empty_output_and_overwrites_atomically(transformer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(CogtuneError, match="not empty.*--overwrite") as err:
        save_transformer_folder(transformer, None, out)
    assert "\n" not in str(err.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    save_transformer_folder(transformer, None, out, max_shard_size="20KB", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / INDEX_NAME).is_file()
    save_transformer_folder(transformer, None, out, overwrite=True)  # sharded -> single file: no stale shards left
    assert sorted(p.name for p in out.iterdir()) == ["config.json", WEIGHTS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left beside it

    bad = {"x": torch.zeros(2, dtype=torch.complex64)}  # fails while writing: nothing appears, nothing is left
    with pytest.raises(CogtuneError, match="complex64"):
        save_transformer_folder(bad, {"_class_name": "CogVideoXTransformer3DModel"}, tmp_path / "never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_shard_writer_takes_pieces_in_any_order(tmp_path):
    a, b = torch.randn(5, 7), torch.arange(6, dtype=torch.int64)
    specs = {"a": TensorSpec((5, 7), torch.float16), "b": TensorSpec((6,), torch.int64)}
    with ShardWriter(tmp_path, specs, max_shard_size=64) as w:
        w.write("a", a.reshape(-1)[20:], 20)
        w.write("b", b)
        w.write("a", a.reshape(-1)[:20], 0)
    got = {k: v for f in tmp_path.glob("*.safetensors") for k, v in load_file(f).items()}
    assert torch.equal(got["a"], a.half()) and torch.equal(got["b"], b)

    w = ShardWriter(tmp_path / "partial", specs)
    w.write("a", a.reshape(-1)[:10], 0)
    with pytest.raises(RuntimeError, match="not written"):
        w.close()


def test_verify_names_the_problem(transformer, tmp_path):
    out = save_transformer_folder(transformer, None, tmp_path / "m", max_shard_size="20KB")
    shapes = {k: tuple(t.shape) for k, t in transformer.state_dict().items()}
    verify_transformer_folder(out, shapes)
    with pytest.raises(CogtuneError, match="1 keys missing.*extra.weight"):
        verify_transformer_folder(out, {**shapes, "extra.weight": (1,)})
    with pytest.raises(CogtuneError, match="1 unexpected keys.*proj_out.bias"):
        verify_transformer_folder(out, {k: s for k, s in shapes.items() if k != "proj_out.bias"})
    with pytest.raises(CogtuneError, match=r"1 shapes differ.*proj_out.weight: found \[64, 32\], expected \[64, 33\]"):
        verify_transformer_folder(out, {**shapes, "proj_out.weight": (64, 33)})


def test_output_below_a_file_is_one_line(transformer, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(CogtuneError, match="a_file is a file, not a folder") as err:
        save_transformer_folder(transformer, None, tmp_path / "a_file" / "out")
    assert "\n" not in str(err.value) and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_an_output_overlapping_an_input_is_refused(tmp_path):
    from cogtune.errors import CogtuneError
    from cogtune.export.shards import refuse_overlap

    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    for out in (model, model / "transformer", tmp_path):  # the input itself, inside it, or around it
        with pytest.raises(CogtuneError, match="overlaps --base"):
            refuse_overlap(out, **{"--base": model})
    refuse_overlap(tmp_path / "merged", **{"--base": model})  # beside it: fine
    refuse_overlap(model / "converted", inside_ok=True, **{"--base": model})  # e.g. checkpoint-N/transformer
    with pytest.raises(CogtuneError, match="overlaps --base"):
        refuse_overlap(tmp_path, inside_ok=True, **{"--base": model})
