"""Memory switches that every variant supports, applied to the transformer before training starts."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math

import torch
from torch.utils.checkpoint import checkpoint

from ..config import OPTIMIZERS, switch_conflicts
from ..errors import CogtuneError



def encoder_dtype(cfg, device: torch.device) -> torch.dtype:
    """The dtype the text encoder and the VAE encode in (memory.encoder_dtype; auto: bf16 on a bf16-capable CUDA
    device with mixed precision; T5-family text encoders overflow in fp16, so an fp16 run still encodes in bf16)."""
    cuda = device.type == "cuda"
    choice = cfg.memory.resolved_encoder_dtype(cfg.mixed_precision, cuda, cuda and torch.cuda.is_bf16_supported())
    return torch.bfloat16 if choice == "bf16" else torch.float32


def every_kth_checkpointing(transformer, k: int, offload: bool = False) -> None:
    """Checkpoint blocks 0, k, 2k, ... only: memory between none and all, at a share of the recompute cost.
    With `offload`, what a checkpointed block keeps for backward (its tensor inputs) waits on the host."""
    from ..models import repeated_blocks

    transformer.enable_gradient_checkpointing()
    index = {id(block): i for i, block in enumerate(repeated_blocks(transformer))}

    def maybe_checkpoint(block, *args):
        if index.get(id(block), 0) % k:
            return block(*args)
        if offload:
            return offloaded_checkpoint(block, *args)
        return checkpoint(block, *args, use_reentrant=False)

    transformer._gradient_checkpointing_func = maybe_checkpoint


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of `t`: pinned and written asynchronously from CUDA; a clone on the CPU (so the offload logic
    runs the same there, saving nothing)."""
    t = t.detach()
    if t.device.type == "cuda":
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
    return t.clone()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device copy of host tensor `t` (queued on the compute stream from pinned memory; a clone on the CPU)."""
    return t.to(device, non_blocking=True) if device.type == "cuda" else t.clone()


def offloaded_checkpoint(block, *args):
    """A non-reentrant checkpoint whose recompute reads the block's tensor inputs from host copies.

    torch's checkpoint holds its inputs by reference until backward. Here the inputs reach the checkpointed
    function through a holder that gives them up after the first call, so once the forward moves on only the host
    copies remain (the gradient still flows through the autograd graph of the first call, which the recompute only
    refills). The copies are `to_host`'s."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    host = [to_host(a) if isinstance(a, torch.Tensor) else a for a in args]
    wants_grad = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
    holder = [args]

    def run():
        if holder:
            return block(*holder.pop())
        # the recompute must save what the first call saved, which depends on which inputs required grad
        return block(*(to_device(a, device).requires_grad_(g) if isinstance(a, torch.Tensor) else a
                       for a, g in zip(host, wants_grad)))

    return checkpoint(run, use_reentrant=False)


def fp8_storage(transformer, compute_dtype: torch.dtype, skip: tuple[str, ...] | None = None) -> None:
    """Frozen Linear weights stored in float8_e4m3fn and upcast per layer for compute; LoRA layers, norms and
    embeddings keep their dtype. Only sensible for frozen weights (LoRA), and with gradient checkpointing: without
    it, backward keeps the upcast copies alive (see the planner's notes)."""
    from diffusers.hooks import apply_layerwise_casting

    if skip is None:  # the model's own list (ModelFacts.fp8_skip)
        from ..models import facts_of_transformer

        skip = facts_of_transformer(transformer).fp8_skip
    apply_layerwise_casting(transformer, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                            skip_modules_pattern=skip)


NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # QLoRA's: 64 weights share a scale; 256 scales share an 8-bit quantiser


def nf4_block_sizes(numel: int) -> tuple[int, int] | None:
    """(block, scaler block) for a weight of `numel` elements, or None where NF4 cannot store it. A weight with
    fewer than 256 blocks (tiny test models) takes the largest scaler block that divides its block count."""
    if numel % NF4_BLOCK:
        return None
    return NF4_BLOCK, math.gcd(numel // NF4_BLOCK, NF4_SCALER_BLOCK)


def nf4_storage(transformer, device: torch.device, skip: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Frozen Linear weights (those whose module name matches no pattern of `skip`) become torchao NF4 tensors on
    `device`, quantised there one at a time (the full-size transformer never sits on the device). F.linear on
    an NF4 weight dequantises it to the input's dtype and saves only the NF4 tensor for backward, which returns no
    weight gradient; biases keep their dtype. Returns the new parameters (already on `device`)."""
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its optional CUDA kernels' load failures are noise here
    from torchao.quantization import to_nf4

    done, names = [], []
    for name, module in transformer.named_modules():
        w = getattr(module, "weight", None)
        if type(module) is not torch.nn.Linear or w is None or w.requires_grad or any(s in name for s in skip):
            continue
        sizes = nf4_block_sizes(w.numel())
        if sizes is None:
            continue
        module.weight = torch.nn.Parameter(to_nf4(w.detach().to(device).contiguous(), *sizes), requires_grad=False)
        done.append(module.weight)
        names.append(f"{name}.weight")
    # DDP broadcasts every parameter from rank 0 at start: each rank quantised the same base weights the same way,
    # so the NF4 ones are left out of it (no copy of the base over the wire)
    transformer._ddp_params_and_buffers_to_ignore = [*getattr(transformer, "_ddp_params_and_buffers_to_ignore", ()),
                                                     *names]
    return done


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by a hook the moment that parameter's gradient is complete; the gradient
    is freed right after, so the gradients of the whole model never exist at once.

    `step()` and `zero_grad()` are no-ops. The param groups and the state are the per-parameter optimizers' own
    objects, so LR schedulers, `state_dict()` and `load_state_dict()` (checkpoints) work as for one optimizer."""

    def __init__(self, params, make_one):
        params = list(params)
        self.inner = [make_one([p]) for p in params]
        super().__init__([opt.param_groups[0] for opt in self.inner], self.inner[0].defaults)
        self._link()
        for p, opt in zip(params, self.inner):
            p.register_post_accumulate_grad_hook(lambda p, opt=opt: _step_and_free(opt))

    def _link(self) -> None:
        for opt, group in zip(self.inner, self.param_groups):
            opt.param_groups, opt.state = [group], self.state

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._link()  # loading replaced the group dicts and the state


def _step_and_free(opt: torch.optim.Optimizer) -> None:
    opt.step()
    opt.zero_grad(set_to_none=True)


def check_switches(cfg, world: int) -> None:
    """Refuse switch combinations that cannot work, before anything is loaded or cached."""
    m = cfg.memory
    why = switch_conflicts(lora=cfg.method == "lora", checkpointing=m.gradient_checkpointing,
                           activation_offload=m.activation_offload, fp8_weights=m.fp8_weights,
                           block_offload=m.block_offload, optimizer_in_backward=m.optimizer_in_backward, world=world,
                           strategy=cfg.distributed.strategy, accumulation=cfg.gradient_accumulation_steps,
                           clipping=bool(cfg.optimizer.max_grad_norm), fp16=cfg.mixed_precision == "fp16",
                           nf4_weights=m.nf4_weights)
    if why:
        raise CogtuneError(why[0])
    if m.nf4_weights and importlib.util.find_spec("torchao") is None:
        raise CogtuneError("memory.nf4_weights needs the torchao package: pip install 'cogtune[nf4]' (or torchao)")


def make_optimizer(params, o, in_backward: bool = False) -> torch.optim.Optimizer:
    if in_backward:
        return OptimizerInBackward(params, lambda one: make_optimizer(one, o))
    module, cls, package, _ = OPTIMIZERS[o.name]
    try:
        optimizer_cls = getattr(importlib.import_module(module), cls)
    except ImportError:
        raise CogtuneError(f"optimizer.name={o.name} needs the {package} package: pip install {package}") from None
    if o.name == "came":  # CAME takes three betas
        return optimizer_cls(params, lr=o.lr, weight_decay=o.weight_decay, betas=(*o.betas, 0.9999))
    return optimizer_cls(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
