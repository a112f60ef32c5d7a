"""`cogtune convert sat LORA OUT --merge-into MODEL`: a SAT LoRA fused into the transformer at SAT's scale.

SAT's LoraMixin (sat/model/finetune/lora2.py) adds (lora_alpha / r) B A with lora_alpha 1 by default; for the fused
query_key_value, matrix_A.i / matrix_B.i (i = 0, 1, 2) act on the q, k, v thirds of the output. The expected weights
are computed here in float64 straight from the SAT matrices and the base safetensors file, without cogtune or peft.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from safetensors.torch import load_file

from cogtune.cli import build_parser
from cogtune.errors import CogtuneError
from helpers.sat import P, to_sat

RANK, LAYERS = 4, 2


def sat_lora(hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(LAYERS):
        L = f"{P}transformer.layers.{i}.attention."
        for j in range(3):
            out[f"{L}query_key_value.matrix_A.{j}"] = torch.randn(RANK, hidden, generator=gen)
            out[f"{L}query_key_value.matrix_B.{j}"] = torch.randn(hidden, RANK, generator=gen)
        out[f"{L}dense.matrix_A.0"] = torch.randn(RANK, hidden, generator=gen)
        out[f"{L}dense.matrix_B.0"] = torch.randn(hidden, RANK, generator=gen)
    return out


def expected(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """W + scale B A in float64, the qkv deltas stacked as SAT's fused query_key_value holds them."""
    out = {k: v.double() for k, v in base.items()}
    for i in range(LAYERS):
        L, b = f"{P}transformer.layers.{i}.attention.", f"transformer_blocks.{i}.attn1."
        qkv = torch.cat([lora[f"{L}query_key_value.matrix_B.{j}"].double() @ lora[f"{L}query_key_value.matrix_A.{j}"]
                         .double() for j in range(3)])
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{b}{name}.weight"] += scale * qkv.chunk(3)[j]
        out[f"{b}to_out.0.weight"] += scale * (lora[f"{L}dense.matrix_B.0"].double() @
                                               lora[f"{L}dense.matrix_A.0"].double())
    return out


def cli(*argv):
    args = build_parser(argv[0]).parse_args([*map(str, argv)])
    args.func(args)


@pytest.mark.parametrize("alpha", [None, 8.0])
def test_merged_weights_are_w_plus_scaled_ba(tiny_model, tmp_path, capsys, alpha):
    model = tiny_model("cogvideox-5b")
    base = load_file(str(model / "transformer" / "diffusion_pytorch_model.safetensors"))
    hidden = base["transformer_blocks.0.attn1.to_q.weight"].shape[1]
    lora = sat_lora(hidden)
    (tmp_path / "sat" / "1").mkdir(parents=True)
    torch.save({"module": lora}, tmp_path / "sat" / "1" / "mp_rank_00_model_states.pt")
    (tmp_path / "sat" / "latest").write_text("1")
    flag = ["--alpha", alpha] if alpha else []
    cli("convert", "sat", tmp_path / "sat", tmp_path / "merged", "--merge-into", model, "--dtype", "fp32", *flag)
    assert f"scale 1/{RANK}" in capsys.readouterr().out or alpha

    merged = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "merged")).state_dict()
    want = expected(base, lora, (alpha or 1.0) / RANK)  # SAT's lora_alpha / r, lora_alpha 1 unless given
    assert merged.keys() == base.keys()
    for k, w in want.items():
        # fp32 fuse of W + s·B·A (rank 4 sums): a few ulp of the largest term
        torch.testing.assert_close(merged[k].double(), w, rtol=1e-6, atol=1e-5, msg=k)
    delta = (merged["transformer_blocks.1.attn1.to_v.weight"] - base["transformer_blocks.1.attn1.to_v.weight"]).abs()
    assert delta.max() > 0.1  # the LoRA moved the weights far past the tolerance
    assert torch.equal(merged["transformer_blocks.0.ff.net.2.weight"], base["transformer_blocks.0.ff.net.2.weight"])
    info = json.loads((tmp_path / "merged" / "cogtune_merge.json").read_text())
    assert info["loras"][0]["path"].endswith("mp_rank_00_model_states.pt")

    # the two-step path gives the same bytes
    cli("convert", "sat", tmp_path / "sat", tmp_path / "lora", "--variant", "cogvideox-5b", *flag)
    cli("lora", "merge", "--model", model, "--lora", tmp_path / "lora", tmp_path / "two", "--dtype", "fp32")
    two = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "two")).state_dict()
    assert all(torch.equal(two[k], merged[k]) for k in merged)


def test_merge_refusals(tiny_model, tmp_path):
    model = tiny_model("cogvideox-5b")
    t = CogVideoXTransformer3DModel.from_pretrained(str(model / "transformer"))
    (tmp_path / "full" / "1").mkdir(parents=True)
    torch.save({"module": to_sat(t.state_dict(), t.config.num_layers, True)},
               tmp_path / "full" / "1" / "mp_rank_00_model_states.pt")
    with pytest.raises(CogtuneError, match="--merge-into fuses a LoRA, but .* is a full SAT checkpoint"):
        cli("convert", "sat", tmp_path / "full" / "1", tmp_path / "out", "--merge-into", model)
    lora = sat_lora(t.config.num_attention_heads * t.config.attention_head_dim)
    torch.save({"module": lora}, tmp_path / "lora.pt")
    with pytest.raises(CogtuneError, match="the LoRA was trained on cogvideox-5b, model .* is cogvideox-5b-i2v"):
        cli("convert", "sat", tmp_path / "lora.pt", tmp_path / "out", "--merge-into", tiny_model("cogvideox-5b-i2v"),
            "--variant", "cogvideox-5b")
    assert not (tmp_path / "out").exists()
