"""memory.block_offload: frozen block weights point at host copies outside their block's forward, the adapters
never move, the gradients are those of the resident model (with and without checkpointing), and once a step's order
has been seen every block finds its weights prefetched, with never more than two blocks' copies held."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from cogtune.train.lora import add_lora
from cogtune.train.block_offload import block_offload
from cogtune.train.memory import every_kth_checkpointing


def _model(tiny_model, device="cpu"):
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel.from_pretrained(str(tiny_model("cogvideox-5b") / "transformer"))
    add_lora(model, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"], 0.0)
    with torch.no_grad():  # give the zero-initialised B matrices values, so every adapter gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.to(device).train()


def _inputs(model):
    c, device = model.config, next(model.parameters()).device
    gen = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 3, c.in_channels, 4, 6, generator=gen).to(device),
                encoder_hidden_states=torch.randn(1, 8, c.text_embed_dim, generator=gen).to(device),
                timestep=torch.tensor([500], device=device), return_dict=False)


def assert_same_gradient(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    """Equal up to reduction order. The host copies live at other addresses, and CPU matmul kernels pick their
    vectorised reduction order by alignment, so the same arithmetic may round differently in the last bits (seen:
    1.5e-11 on values ~1e-4). 16 fp32 ulps of the tensor's scale covers that; a wrong or stale block's weights, or a
    read of the poisoned host copies (NaN), is off by orders of magnitude more."""
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(got, want, rtol=16 * eps, atol=16 * eps * float(want.abs().max()), msg=msg)


def _grads(model, check=None):
    out = model(**_inputs(model))[0]
    if check:
        check()
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_equal_the_resident_model(tiny_model, checkpointing):
    plain, offloaded = _model(tiny_model), _model(tiny_model)
    if checkpointing:
        every_kth_checkpointing(plain, 1)
        every_kth_checkpointing(offloaded, 1)
    adapters = {n: p for n, p in offloaded.named_parameters() if p.requires_grad}
    before = {n: p.data_ptr() for n, p in offloaded.named_parameters()}
    assert len(block_offload(offloaded, torch.device("cpu")).blocks) == len(offloaded.transformer_blocks)
    # the offloaded parameters now point at host copies: every frozen Linear weight and bias of every block
    host = {n: p.data for n, p in offloaded.named_parameters() if p.data_ptr() != before[n]}
    linears = {f"{n}.{k}" for n, m in offloaded.named_modules() if isinstance(m, torch.nn.Linear)
               and n.startswith("transformer_blocks.") for k, p in m.named_parameters(recurse=False)
               if not p.requires_grad}
    assert host.keys() == linears and len(linears) > 0

    def on_device() -> set[str]:  # the blocks whose frozen weights do not point at their host copies
        return {n.split(".")[1] for n, p in offloaded.named_parameters() if n in host
                and p.data.data_ptr() != host[n].data_ptr()}

    def after_forward():
        assert on_device() == set()
        if not checkpointing:  # backward must use what the forward saw, never read the host copies: poison them
            for name in host:
                host[name].fill_(float("nan"))

    want, got = _grads(plain), _grads(offloaded, after_forward)
    assert want.keys() == got.keys() and len(want) > 0
    for name in want:
        assert_same_gradient(got[name], want[name], name)
    # a checkpoint's recompute stops before the block's forward ends: the first block may still be resident, no other
    assert on_device() <= ({"0"} if checkpointing else set())
    assert len(offloaded.transformer_blocks) > 1
    assert all(p is adapters[n] for n, p in offloaded.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the side-stream copies need CUDA"))])
@pytest.mark.parametrize("every", [None, 1, 2])
def test_prefetch_serves_every_onload_once_the_order_is_known(tiny_model, device, every):
    plain, offloaded = _model(tiny_model, device), _model(tiny_model, device)
    if every:
        every_kth_checkpointing(plain, every)
        every_kth_checkpointing(offloaded, every)
    hooks = block_offload(offloaded, torch.device(device))
    blocks = len(hooks.blocks)
    held = []
    for block in offloaded.transformer_blocks:  # runs after block_offload's own pre-hook
        block.register_forward_pre_hook(lambda module, args: held.append(len(hooks.on_device())))
    # onloads per step: every block's forward, and the recompute of each checkpointed block
    onloads = blocks + (len(range(0, blocks, every)) if every else 0)
    want = _grads(plain)
    for step in range(4):
        before = hooks.sync_copies + hooks.ready
        got = _grads(offloaded)
        assert hooks.sync_copies + hooks.ready - before == onloads
        for name in want:  # prefetched weights are the right block's
            assert_same_gradient(got[name], want[name], f"step {step}: {name}")
        if step == 1:
            copies = hooks.sync_copies
    assert hooks.sync_copies == copies  # steps 2 and 3: no onload had to wait for a copy
    assert held and max(held) <= 2


def test_without_prefetch_every_onload_copies(tiny_model):
    model = _model(tiny_model)
    hooks = block_offload(model, torch.device("cpu"), prefetch=False)
    for _ in range(3):
        _grads(model)
    assert hooks.ready == 0 and hooks.sync_copies == 3 * len(hooks.blocks)


def test_offloaded_weights_never_visit_the_device(tiny_model):
    """The trainer offloads before it moves the transformer, and the move sends every weight to the device except
    the offloaded ones (watched through a TorchFunctionMode that records each tensor `.to(device)` call)."""
    from torch.overrides import TorchFunctionMode

    from cogtune.models.cogvideox import CogVideoXSpec

    class Moves(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.moved = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.to and any(isinstance(a, torch.device) for a in (*args[1:], *kwargs.values())):
                self.moved.add(args[0].data_ptr())
            return func(*args, **kwargs)

    spec = CogVideoXSpec.load(tiny_model("cogvideox-5b"))
    add_lora(spec.transformer, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"], 0.0)
    spec.cast(torch.bfloat16)
    hooks = block_offload(spec.transformer, torch.device("cpu"))
    kept = {id(p) for p in hooks.host_params()}
    params = list(spec.transformer.parameters())
    assert 0 < len(kept) < len(params)
    with Moves() as watch:
        spec.to(torch.device("cpu"), keep_on_host=hooks.host_params())
    for p in params:
        assert (p.data_ptr() in watch.moved) == (id(p) not in kept)
    assert all(p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16) for p in params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_while_moving_is_the_resident_weights_only(tiny_model):
    from cogtune.models.cogvideox import CogVideoXSpec

    spec = CogVideoXSpec.load(tiny_model("cogvideox-5b"))
    add_lora(spec.transformer, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"], 0.0)
    spec.cast(torch.bfloat16)
    hooks = block_offload(spec.transformer, torch.device("cuda"))
    kept = {id(p) for p in hooks.host_params()}
    assert all(p.is_pinned() for p in hooks.host_params())
    resident = sum(p.numel() * p.element_size() for p in spec.transformer.parameters() if id(p) not in kept)
    resident += sum(b.numel() * b.element_size() for b in spec.transformer.buffers())
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    spec.to(torch.device("cuda"), keep_on_host=hooks.host_params())
    assert torch.cuda.max_memory_allocated() - base <= resident + 512 * len(list(spec.transformer.parameters()))
