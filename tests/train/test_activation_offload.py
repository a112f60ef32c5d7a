"""The offloaded checkpoint gives the gradients of the plain forward, and lets go of the block's inputs."""

from __future__ import annotations

import gc
import weakref

import torch

from cogtune.train.memory import offloaded_checkpoint


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x, y, scale):
        return torch.tanh(self.a(x)) * scale + self.b(y), y * 2


def _grads(fn, seed=0):
    torch.manual_seed(seed)
    blocks = torch.nn.ModuleList([Block() for _ in range(3)])
    x0 = torch.randn(4, 8, requires_grad=True)
    x, y = x0 * 1.0, torch.randn(4, 8)
    for block in blocks:
        x, y = fn(block, x, y, 0.5)
    (x.square().sum() + y.sum()).backward()
    return [p.grad.clone() for p in blocks.parameters()] + [x0.grad.clone()]


def test_gradients_equal_the_plain_forward():
    plain = _grads(lambda block, *a: block(*a))
    offloaded = _grads(offloaded_checkpoint)
    for a, b in zip(plain, offloaded, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inputs_are_released_after_the_forward():
    from torch.utils.checkpoint import checkpoint

    def survivor(fn):
        block = Block()
        x = torch.randn(4, 8, requires_grad=True) * 1.0  # a non-leaf, as a block's input is
        ref = weakref.ref(x)
        out, _ = fn(block, x, torch.randn(4, 8), 0.5)
        del x
        gc.collect()
        alive = ref() is not None
        out.sum().backward()  # the recompute still works
        assert all(p.grad is not None for p in block.parameters())
        return alive

    assert survivor(lambda block, *a: checkpoint(block, *a, use_reentrant=False))  # torch keeps it
    assert not survivor(offloaded_checkpoint)
