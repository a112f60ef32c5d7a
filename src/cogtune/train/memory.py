"""Memory switches that every variant supports, applied to the transformer before training starts."""

from __future__ import annotations

import importlib
import logging

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import CogtuneError

log = logging.getLogger("cogtune")
FP8_SKIP = ("patch_embed", "norm", "lora_", "proj_out", "pos_embedding", "time_embedding", "ofs_embedding")


def every_kth_checkpointing(transformer, k: int) -> None:
    """Checkpoint blocks 0, k, 2k, ... only: memory between none and all, at a share of the recompute cost."""
    transformer.enable_gradient_checkpointing()
    index = {id(block): i for i, block in enumerate(transformer.transformer_blocks)}

    def maybe_checkpoint(block, *args):
        if index.get(id(block), 0) % k == 0:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    transformer._gradient_checkpointing_func = maybe_checkpoint


def fp8_storage(transformer, compute_dtype: torch.dtype) -> None:
    """Frozen Linear weights stored in float8_e4m3fn and upcast per layer for compute; LoRA layers, norms and
    embeddings keep their dtype. Only sensible for frozen weights (LoRA), and with gradient checkpointing: without
    it, backward keeps the upcast copies alive (see the planner's notes)."""
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(transformer, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                            skip_modules_pattern=FP8_SKIP)


def block_offload(transformer, device: torch.device) -> None:
    if device.type != "cuda":
        log.warning("memory.block_offload needs a CUDA device; ignored on %s", device.type)
        return
    transformer.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                     offload_type="block_level", num_blocks_per_group=1, use_stream=True)


OPTIMIZERS = {  # name: (module, class, pip package)
    "adamw": ("torch.optim", "AdamW", "torch"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "came": ("came_pytorch", "CAME", "came-pytorch"),
}


def make_optimizer(params, o) -> torch.optim.Optimizer:
    module, cls, package = OPTIMIZERS[o.name]
    try:
        optimizer_cls = getattr(importlib.import_module(module), cls)
    except ImportError:
        raise CogtuneError(f"optimizer.name={o.name} needs the {package} package: pip install {package}") from None
    if o.name == "came":  # CAME takes three betas
        return optimizer_cls(params, lr=o.lr, weight_decay=o.weight_decay, betas=(*o.betas, 0.9999))
    return optimizer_cls(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
