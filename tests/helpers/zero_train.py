"""Train a tiny CogVideoX transformer for a few steps under plain accelerate + DeepSpeed ZeRO and save a checkpoint.

Run under `torchrun --nproc_per_node N` with DS_ACCELERATOR=cpu (the tests do). It uses no cogtune training code:
the model is the transformer of a tiny pipeline folder, wrapped by `Accelerator(deepspeed_plugin=DeepSpeedPlugin(...))`.

Writes:
  OUT/                       `accelerator.save_state(OUT)`: latest, pytorch_model/zero_pp_rank_*..., zero_to_fp32.py
  REF (a .safetensors file)  the fp32 weights this process sees after training, gathered from the ZeRO partitions:
                             trainable params from DeepSpeed's fp32 master copy, frozen params and buffers as held
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="tiny pipeline folder (its transformer/ is trained)")
    p.add_argument("--out", required=True, help="accelerate save_state folder")
    p.add_argument("--ref", required=True, help="reference fp32 weights (.safetensors)")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--precision", choices=("bf16", "no"), default="bf16")
    p.add_argument("--freeze", default="norm_final", help="freeze params whose name starts with this ('' = none)")
    return p.parse_args()


def transformer_inputs(cfg: dict, batch: int, gen: torch.Generator) -> dict:
    """Random inputs of the right shapes for the tiny transformer (latent frames 3, 4x6 latent pixels)."""
    frames = 4 if cfg.get("patch_size_t") else 3
    inputs = {
        "hidden_states": torch.randn(batch, frames, cfg["in_channels"], 4, 6, generator=gen),
        "encoder_hidden_states": torch.randn(batch, cfg["max_text_seq_length"], cfg["text_embed_dim"], generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
    }
    if cfg.get("ofs_embed_dim"):
        inputs["ofs"] = torch.full((batch,), 2.0)
    return inputs


def main() -> None:
    args = parse_args()
    import deepspeed
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, set_seed
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import save_file

    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = {
        "train_batch_size": 1 * 1 * world,  # micro x accumulation x world: explicit, see DESIGN.md
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.stage},
        "bf16": {"enabled": args.precision == "bf16"},
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
    }
    accelerator = Accelerator(mixed_precision=args.precision,
                              deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config))
    set_seed(0)
    model = CogVideoXTransformer3DModel.from_pretrained(Path(args.model) / "transformer")
    if args.freeze:
        for name, param in model.named_parameters():
            if name.startswith(args.freeze):
                param.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)

    cfg = accelerator.unwrap_model(model).config
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(1000 + accelerator.process_index)
    for _ in range(args.steps):
        inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in transformer_inputs(cfg, 1, gen).items()}
        out = model(**inputs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), torch.randn(out.shape, generator=gen))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    accelerator.save_state(args.out)

    # The reference: DeepSpeed's fp32 master weights for trainable params (a collective call on every rank), the
    # parameters themselves for frozen ones, and the persistent buffers as the module holds them.
    module = accelerator.unwrap_model(model)
    ref: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            full = deepspeed.utils.safe_get_full_fp32_param(param)
        else:
            with deepspeed.zero.GatheredParameters([param], enabled=args.stage == 3):
                full = param.detach().clone()
        ref[name] = full.float().contiguous().clone()
    persistent = set(module.state_dict().keys())
    for name, buf in module.named_buffers():
        if name in persistent:
            ref[name] = buf.detach().float().contiguous().clone()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(ref, args.ref, metadata={"format": "pt"})
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
