"""Stored bytes, weight error and CPU step time of one frozen Linear in bf16, torchao NF4 and bitsandbytes NF4.

    python benchmarks/nf4_storage.py [--dim 3072] [--tokens 256] [--repeats 5] [--variant cogvideox-5b --layers 2]

A dim x dim Linear (3072: the width of the 5B transformers) with N(0, 0.02) weights; a step is forward + backward
to the input (the frozen base under a LoRA adapter), bf16. Prints one row per backend: bytes per parameter of what
is stored (data + block scales), the weight error relative to the weights' RMS, and ms per step; the last line is
`nf4_bytes_ratio=X.XX` (torchao NF4 / bf16). With --variant: the same for the trainer's path on a transformer of
the variant's real widths with --layers blocks (LoRA rank 64 on the attention, bf16, checkpointing, 9 frames at
64×64 px): bytes of all frozen weights and s/step, bf16 vs memory.nf4_weights. Machine-dependent figures belong in
BENCHMARKS.md, not in tests.
"""

from __future__ import annotations

import argparse
import time

import torch


def stored_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):  # a tensor subclass: the sum of its inner tensors
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, n)) for n in names)
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)  # bitsandbytes keeps its scales beside the data
    if state is not None:
        total += sum(x.numel() * x.element_size() for x in (state.absmax, getattr(state.state2, "absmax", None),
                                                          getattr(state, "offset", None)) if torch.is_tensor(x))
    return total


def step_ms(layer, x: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        xi = x.detach().requires_grad_(True)
        layer(xi).float().pow(2).mean().backward()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def transformer_step(variant: str, layers: int, nf4: bool, repeats: int) -> tuple[int, float]:
    import copy

    from diffusers import CogVideoXTransformer3DModel

    from cogtune.models import facts_of_transformer
    from cogtune.models.variants import real_configs
    from cogtune.train.lora import add_lora
    from cogtune.train.memory import every_kth_checkpointing, nf4_storage

    cfg = real_configs(variant)["transformer"] | {"num_layers": layers, "sample_frames": 9, "sample_height": 8,
                                                  "sample_width": 8}
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel.from_config(cfg)
    add_lora(model, 64, 64, ["to_q", "to_k", "to_v", "to_out.0"])
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)
    every_kth_checkpointing(model, 1)
    model.train()
    if nf4:
        nf4_storage(model, torch.device("cpu"), facts_of_transformer(model).fp8_skip)
    frozen = sum(stored_bytes(p) for p in model.parameters() if not p.requires_grad)
    c = model.config
    inputs = dict(hidden_states=torch.randn(1, 3, c.in_channels, 8, 8),
                  encoder_hidden_states=torch.randn(1, c.max_text_seq_length, c.text_embed_dim),
                  timestep=torch.tensor([500]), return_dict=False)
    if c.use_rotary_positional_embeddings:  # the grid of 3 latent frames × 4 × 4 patches
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(c.attention_head_dim, ((0, 0), (4, 4)), (4, 4), 3)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**copy.copy(inputs))[0]
        out.float().pow(2).mean().backward()
        best = min(best, time.perf_counter() - t0)
    return frozen, best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=3072)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variant", default=None)
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args()
    if a.variant:
        (b16, t16), (b4, t4) = (transformer_step(a.variant, a.layers, q, a.repeats) for q in (False, True))
        print(f"{a.variant}, {a.layers} blocks: frozen weights bf16 {b16 / 2**20:.1f} MiB, nf4 {b4 / 2**20:.1f} MiB; "
              f"s/step bf16 {t16:.3f}, nf4 {t4:.3f}")
        print(f"nf4_frozen_ratio={b4 / b16:.2f} nf4_step_ratio={t4 / t16:.2f}")
        return
    torch.manual_seed(0)
    w = (torch.randn(a.dim, a.dim) * 0.02).to(torch.bfloat16)
    x = torch.randn(a.tokens, a.dim, dtype=torch.bfloat16)
    base = torch.nn.Linear(a.dim, a.dim, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    base.weight.data.copy_(w)
    rms = w.float().pow(2).mean().sqrt()
    rows = [("bf16", stored_bytes(base.weight), 0.0, step_ms(base, x, a.repeats))]

    from torchao.quantization import to_nf4

    ao = torch.nn.Linear(a.dim, a.dim, bias=False, dtype=torch.bfloat16)
    ao.weight = torch.nn.Parameter(to_nf4(w), requires_grad=False)
    err = (ao.weight.get_original_weight().float() - w.float()).pow(2).mean().sqrt() / rms
    rows.append(("torchao nf4", stored_bytes(ao.weight), err.item(), step_ms(ao, x, a.repeats)))
    try:
        import bitsandbytes as bnb

        bl = bnb.nn.Linear4bit(a.dim, a.dim, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                               compress_statistics=True)
        bl.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
        bl = bl.to("cpu")  # quantises
        deq = bnb.functional.dequantize_4bit(bl.weight.data, bl.weight.quant_state)
        err = (deq.float() - w.float()).pow(2).mean().sqrt() / rms
        rows.append(("bitsandbytes nf4", stored_bytes(bl.weight), err.item(), step_ms(bl, x, a.repeats)))
    except Exception as e:  # noqa: BLE001 - report, do not hide, a backend that does not run here
        print(f"bitsandbytes nf4: {type(e).__name__}: {e}".splitlines()[0])
    n = a.dim * a.dim
    print(f"{'backend':18} {'bytes/param':>11} {'rel. RMS error':>14} {'ms/step':>8}")
    for name, b, e, ms in rows:
        print(f"{name:18} {b / n:11.4f} {e:14.4f} {ms:8.1f}")
    print(f"nf4_bytes_ratio={rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
