"""A SAT checkpoint laid out from a diffusers transformer, following CogVideo's SAT model names as the official
converters read them (q/k/v fused into query_key_value, the two adaLN linears interleaved into one 12-chunk
`adaLN_modulations.N.1`, ...)."""

from __future__ import annotations

import torch

P = "model.diffusion_model."


def to_sat(sd: dict[str, torch.Tensor], layers: int, rope: bool) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        b, L = f"transformer_blocks.{i}.", f"{P}transformer.layers.{i}."
        for wb in ("weight", "bias"):
            out[f"{L}attention.query_key_value.{wb}"] = torch.cat([sd[f"{b}attn1.to_{x}.{wb}"] for x in "qkv"])
            out[f"{L}attention.dense.{wb}"] = sd[f"{b}attn1.to_out.0.{wb}"]
            out[f"{L}mlp.dense_h_to_4h.{wb}"] = sd[f"{b}ff.net.0.proj.{wb}"]
            out[f"{L}mlp.dense_4h_to_h.{wb}"] = sd[f"{b}ff.net.2.{wb}"]
            out[f"{L}input_layernorm.{wb}"] = sd[f"{b}norm1.norm.{wb}"]
            out[f"{L}post_attention_layernorm.{wb}"] = sd[f"{b}norm2.norm.{wb}"]
            out[f"{P}mixins.adaln_layer.query_layernorm_list.{i}.{wb}"] = sd[f"{b}attn1.norm_q.{wb}"]
            out[f"{P}mixins.adaln_layer.key_layernorm_list.{i}.{wb}"] = sd[f"{b}attn1.norm_k.{wb}"]
            n1, n2 = sd[f"{b}norm1.linear.{wb}"].chunk(6), sd[f"{b}norm2.linear.{wb}"].chunk(6)
            # SAT order: shift/scale/gate msa, shift/scale/gate mlp, then the same six for the text tokens
            out[f"{P}mixins.adaln_layer.adaLN_modulations.{i}.1.{wb}"] = torch.cat(n1[:3] + n2[:3] + n1[3:] + n2[3:])
    top = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "ofs_embed.0": "ofs_embedding.linear_1", "ofs_embed.2": "ofs_embedding.linear_2",
           "mixins.patch_embed.proj": "patch_embed.proj", "mixins.patch_embed.text_proj": "patch_embed.text_proj",
           "transformer.final_layernorm": "norm_final", "mixins.final_layer.norm_final": "norm_out.norm",
           "mixins.final_layer.linear": "proj_out", "mixins.final_layer.adaLN_modulation.1": "norm_out.linear"}
    for sat_name, name in top.items():
        for wb in ("weight", "bias"):
            if f"{name}.{wb}" in sd:
                out[f"{P}{sat_name}.{wb}"] = sd[f"{name}.{wb}"]
    if "patch_embed.pos_embedding" in sd:  # 5B-I2V's learned table
        out[f"{P}mixins.pos_embed.pos_embedding"] = sd["patch_embed.pos_embedding"]
    elif rope:
        out[f"{P}mixins.pos_embed.freqs_sin"] = torch.randn(4, 8)  # RoPE tables: recomputed, dropped
    else:
        out[f"{P}mixins.pos_embed.pos_embedding"] = torch.randn(1, 300, 32)  # 2B sin-cos table: recomputed, dropped
    out["first_stage_model.encoder.conv_in.weight"] = torch.randn(2)  # not the transformer: ignored
    return out



def write_z3(sat: dict[str, torch.Tensor], folder, world: int, buffers: tuple[str, ...] = ()) -> None:
    """SAT's ZeRO-3 files written by hand (the layout sat_zero3_train.py gets from a real engine): per rank
    `z3_rank_RR_model_states.pt` = {'module': {'module.' + name: ceil(numel / world) elements, zero-padded, with
    `ds_shape`}}, buffers whole."""
    import math

    folder.mkdir(parents=True)
    for rank in range(world):
        module = {}
        for name, t in sat.items():
            if name in buffers:
                module[f"module.{name}"] = t
                continue
            part = math.ceil(t.numel() / world)
            piece = torch.zeros(part, dtype=t.dtype)
            flat = t.reshape(-1)[rank * part:(rank + 1) * part]
            piece[:flat.numel()] = flat
            piece.ds_shape = t.shape
            module[f"module.{name}"] = piece
        torch.save({"module": module}, folder / f"z3_rank_{rank:02d}_model_states.pt")


def run_sat_zero3(sat: dict[str, torch.Tensor], root, buffers: tuple[str, ...] = ()):
    """(SAT save folder, reference tensors) of tests/helpers/sat_zero3_train.py on 2 CPU ranks from `sat`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from helpers.zero import free_port

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(sat, root / "tensors.pt")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(Path(__file__).parent / "sat_zero3_train.py"), "--tensors",
           str(root / "tensors.pt"), "--buffers", ",".join(buffers), "--save", str(root / "save"), "--ref",
           str(root / "ref.safetensors")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "save", load_file(str(root / "ref.safetensors"))
