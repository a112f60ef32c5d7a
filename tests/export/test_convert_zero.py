"""convert_zero on real DeepSpeed ZeRO-1/2/3 checkpoints written by plain accelerate + DeepSpeed under torchrun.

tests/helpers/zero_train.py trains a tiny transformer 2 steps on 2 CPU ranks, calls `accelerator.save_state` (the
official CogVideoX trainer's `checkpoint-N/` layout) and saves the fp32 master weights DeepSpeed itself reports
(`safe_get_full_fp32_param`): the converted folder must equal them exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from PIL import Image
from safetensors.torch import load_file

from cogtune.cli import build_parser
from cogtune.errors import CogtuneError
from cogtune.export.shards import TensorSpec
from cogtune.export.to_diffusers import name_prefix as _name_prefix
from cogtune.export.zero import convert_zero, load_checkpoint_file, locate_tag_folder

slow_multiproc = [pytest.mark.slow, pytest.mark.multiproc]

from helpers.zero import CASES


def generate(pipeline_dir: Path, transformer) -> torch.Tensor:
    cls = getattr(diffusers, json.loads((pipeline_dir / "model_index.json").read_text())["_class_name"])
    pipe = cls.from_pretrained(pipeline_dir, transformer=transformer)
    extra = {"image": Image.new("RGB", (48, 32), "red")} if "ImageToVideo" in cls.__name__ else {}
    out = pipe(prompt="a red circle moving left", num_inference_steps=2, num_frames=9, height=32, width=48,
               guidance_scale=1.0, output_type="pt", generator=torch.Generator().manual_seed(0), **extra).frames
    return out


@pytest.mark.parametrize("case", [pytest.param(c, marks=slow_multiproc) for c in CASES])
def test_convert_equals_deepspeed_master_weights(zero_checkpoint, case, tmp_path, capsys):
    ckpt, ref, pipeline_dir = zero_checkpoint(case)
    assert (ckpt / "latest").read_text().strip() == "pytorch_model"  # accelerate's save_state layout

    out = convert_zero(ckpt, tmp_path / "transformer", pipeline_dir, max_shard_size="20KB")
    printed = capsys.readouterr().out
    assert f"ZeRO-{CASES[case][0]} checkpoint" in printed and "parameters, float32" in printed
    shards = sorted(out.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 2 and (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (out / "config.json").read_bytes() == (pipeline_dir / "transformer" / "config.json").read_bytes()

    got = {k: v for f in shards for k, v in load_file(f).items()}
    assert got.keys() == ref.keys()
    for k, t in ref.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], t), k

    base = load_file(pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(got["proj_out.weight"], base["proj_out.weight"].float())  # it trained
    if CASES[case][1] == "bf16":  # the master weights, not the bf16 copy the module computed with
        assert not torch.equal(got["proj_out.weight"], got["proj_out.weight"].bfloat16().float())
    frozen = base["norm_final.weight"]  # frozen by the helper: stored in the training dtype, unchanged
    assert torch.equal(got["norm_final.weight"], frozen.bfloat16().float() if CASES[case][1] == "bf16" else frozen)

    model = CogVideoXTransformer3DModel.from_pretrained(out)
    frames = generate(pipeline_dir, model)
    assert frames.shape[:2] == (1, 9) and torch.isfinite(frames).all()


@pytest.mark.slow
@pytest.mark.multiproc
def test_layouts_dtype_and_cli(zero_checkpoint, tmp_path):
    ckpt, ref, pipeline_dir = zero_checkpoint("zero2-bf16")
    # DeepSpeed's own layout: latest -> global_step2/
    ds = tmp_path / "ds"
    shutil.copytree(ckpt / "pytorch_model", ds / "global_step2")
    (ds / "latest").write_text("global_step2")
    a = convert_zero(ds, tmp_path / "a", pipeline_dir / "transformer", quiet=True)  # base = a transformer folder
    b = convert_zero(ckpt / "pytorch_model", tmp_path / "b", pipeline_dir, dtype="bf16", quiet=True)  # the tag folder
    got_a = load_file(a / "diffusion_pytorch_model.safetensors")
    got_b = load_file(b / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(got_a[k], ref[k]) for k in ref)
    assert all(got_b[k].dtype == torch.bfloat16 and torch.equal(got_b[k], ref[k].bfloat16()) for k in ref)

    parser = build_parser("convert")
    args = parser.parse_args(["convert", "zero", str(ckpt), str(tmp_path / "c"), "--base", str(pipeline_dir),
                              "--dtype", "fp16", "--max-shard-size", "30KB"])
    args.func(args)
    got_c = {k: v for f in (tmp_path / "c").glob("*.safetensors") for k, v in load_file(f).items()}
    assert all(got_c[k].dtype == torch.float16 and torch.equal(got_c[k], ref[k].half()) for k in ref)
    with pytest.raises(CogtuneError, match="not empty"):  # an existing result is never overwritten silently
        args.func(args)


def one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(CogtuneError, match=match) as err:
        convert_zero(*args, quiet=True, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.slow
@pytest.mark.multiproc
def test_errors_are_one_line(zero_checkpoint, tiny_model, tmp_path):
    ckpt, _, pipeline_dir = zero_checkpoint("zero2-bf16")
    broken = tmp_path / "checkpoint-2"
    shutil.copytree(ckpt, broken)
    out = tmp_path / "out"

    one_line_error("training output folder.*checkpoint-2", tmp_path, out, pipeline_dir)
    (broken / "latest").unlink()
    msg = one_line_error("no 'latest' file", broken, out, pipeline_dir)
    assert "pytorch_model" in msg
    (broken / "latest").write_text("pytorch_model")

    next((broken / "pytorch_model").glob("*zero_pp_rank_1_*optim_states.pt")).unlink()
    one_line_error(r"ranks 0\.\.1.*rank\(s\) 1 are missing", broken, out, pipeline_dir)

    msg = one_line_error("does not fit the base model", ckpt, out, tiny_model("cogvideox1.5-5b"))
    assert "patch_embed.proj" in msg and "--base" in msg
    one_line_error("no transformer/config.json", ckpt, out, tmp_path / "nowhere")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written anywhere


def test_wrapper_prefixes_are_stripped():
    expected = {k: TensorSpec((1,), torch.float32) for k in ("proj_out.weight", "norm_out.linear.bias")}
    assert _name_prefix(["proj_out.weight", "norm_out.linear.bias"], expected) == ""
    assert _name_prefix(["module.transformer.proj_out.weight", "module.transformer.x"], expected) == "module.transformer."
    assert _name_prefix(["_orig_mod.proj_out.weight", "other.norm_out.linear.bias"], expected) == ""  # not common


def test_pickles_load_weights_only_unless_trusted(tmp_path, caplog):
    from fractions import Fraction  # not on torch's weights-only allowlist nor ours

    from cogtune import pickles

    torch.save({"t": torch.ones(2)}, tmp_path / "plain.pt")
    assert torch.equal(load_checkpoint_file(tmp_path / "plain.pt")["t"], torch.ones(2))
    assert not caplog.records
    torch.save({"odd": Fraction(1, 3)}, tmp_path / "odd.pt")
    with pytest.raises(CogtuneError, match="odd.pt pickles fractions.Fraction.*pass --unsafe-pickle"):
        load_checkpoint_file(tmp_path / "odd.pt")
    with pickles.trusting(True):
        assert load_checkpoint_file(tmp_path / "odd.pt")["odd"] == Fraction(1, 3)
    (warning,) = caplog.records
    assert "fractions.Fraction" in warning.getMessage() and "--unsafe-pickle" in warning.getMessage()
    (tmp_path / "cut.pt").write_bytes((tmp_path / "plain.pt").read_bytes()[:100])
    with pytest.raises(CogtuneError, match="cut.pt.*damaged or incomplete") as err:
        load_checkpoint_file(tmp_path / "cut.pt")
    assert "\n" not in str(err.value)


def test_a_file_is_not_taken_for_a_missing_folder(tmp_path):
    ckpt = tmp_path / "mp_rank_00_model_states.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(CogtuneError, match="is a file: pass the checkpoint folder"):
        locate_tag_folder(ckpt)
