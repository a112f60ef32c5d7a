"""memory.block_offload: the frozen Linear weights of each transformer block live in pinned host memory and are
copied to the accelerator for the block's forward (and its checkpoint recompute), the next block's copy overlapping
this block's compute."""

from __future__ import annotations

import logging

import torch

from .memory import to_device, to_host

log = logging.getLogger("cogtune")


def _host_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A pinned host copy for a CUDA run whether `t` is still on the host (offload before the move: the weights never
    visit the device) or already on the device; a clone otherwise."""
    return t.pin_memory() if device.type == "cuda" and t.device.type == "cpu" else to_host(t)


class BlockOffload:
    """Forward hooks that swap each block's frozen Linear weights between host copies and device copies.

    A block's pre-hook points its parameters at device copies; its forward hook points them back at the host
    copies. Trainable parameters (LoRA) never move, so their gradients and optimizer state stay where they are. A
    Linear's backward uses the weight view autograd saved (the device copy), which keeps that copy alive until the
    block's backward; a checkpointed block's recompute runs the hooks again, so its weights come back for it.

    Prefetch: while a block computes, the block expected next is already being copied, on a side stream on CUDA
    (on other devices the copy is made at the same point, synchronously, so the logic runs the same). The order is
    learned: the block that followed the last two onloaded blocks in the previous step is expected after them again
    (the first step guesses the next index). Forward, checkpoint recompute in reverse, every-k-th checkpointing and
    validation each give a fixed order, so once a step's order has been seen every onload finds its copy made. A wrong guess
    costs a wasted copy, freed at the next onload. At most two blocks' copies are held by these hooks at once: the
    block computing and the one prefetched (the planner counts both)."""

    def __init__(self, transformer, device: torch.device, prefetch: bool = True):
        self.device = device
        self.stream = torch.cuda.Stream(device) if prefetch and device.type == "cuda" else None
        self.prefetch = prefetch
        self.blocks: list[tuple[list[torch.nn.Parameter], list[torch.Tensor]]] = []
        self.resident: int | None = None  # the block whose parameters point at device copies now
        self.ahead: dict[int, tuple[list[torch.Tensor], object]] = {}  # prefetched block -> (copies, ready event)
        self.follows: dict[tuple, int] = {}  # (block before, block) -> the block onloaded after them last time
        self.recent: tuple = (None, None)
        self.sync_copies = self.ready = 0  # onloads that had to copy / found their copy made (or kept resident)
        from ..models import repeated_blocks

        for block in repeated_blocks(transformer):
            # Linear weights only: a Linear's backward uses the transposed view it saved (the device copy), but a
            # norm's reads its weight parameter again, which by then points at the host copy. Norms are a small share.
            frozen = [p for m in block.modules() if isinstance(m, torch.nn.Linear)
                      for p in m.parameters(recurse=False) if not p.requires_grad]
            if not frozen:
                continue
            host = [_host_copy(p.data, device) for p in frozen]
            for p, h in zip(frozen, host):
                p.data = h
            index = len(self.blocks)
            self.blocks.append((frozen, host))
            block.register_forward_pre_hook(lambda module, args, i=index: self.onload(i))
            block.register_forward_hook(lambda module, args, output, i=index: self.after_forward(i))
        if device.type == "cuda":  # the host copies were written on the compute stream; the side stream reads them
            torch.cuda.synchronize(device)

    def host_params(self) -> list[torch.nn.Parameter]:
        """The parameters whose weights live on the host between their block's forwards."""
        return [p for frozen, _ in self.blocks for p in frozen]

    def on_device(self) -> set[int]:
        """The blocks whose device copies these hooks hold (computing or prefetched)."""
        return set(self.ahead) | ({self.resident} if self.resident is not None else set())

    def _copy(self, i: int) -> tuple[list[torch.Tensor], object]:
        host = self.blocks[i][1]
        if self.stream is None:
            return [to_device(h, self.device) for h in host], None
        with torch.cuda.stream(self.stream):
            copies = [h.to(self.device, non_blocking=True) for h in host]
            return copies, self.stream.record_event()

    def _point(self, i: int, tensors: list[torch.Tensor]) -> None:
        for p, t in zip(self.blocks[i][0], tensors):
            p.data = t

    def _expected_after(self, i: int) -> int | None:
        guess = self.follows.get(self.recent, i + 1)
        return guess if 0 <= guess < len(self.blocks) else None

    def onload(self, i: int) -> None:
        if self.recent[1] is not None:
            self.follows[self.recent] = i
        self.recent = (self.recent[1], i)
        if self.resident == i:  # kept from its forward for the recompute that comes right after
            self.ready += 1
        else:
            self.offload()
            if i in self.ahead:
                tensors, ready = self.ahead.pop(i)
                self.ready += 1
            else:
                tensors, ready = self._copy(i)
                self.sync_copies += 1
            if ready is not None:  # the compute stream waits for the copy; the allocator learns the new user
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(ready)
                for t in tensors:
                    t.record_stream(compute)
            self._point(i, tensors)
            self.resident = i
        self.ahead.clear()  # wrong guesses
        nxt = self._expected_after(i)
        if self.prefetch and nxt is not None and nxt != i:
            self.ahead[nxt] = self._copy(nxt)

    def after_forward(self, i: int) -> None:
        if self._expected_after(i) != i:  # a checkpoint recompute of this very block comes next: keep it
            self.offload()

    def offload(self) -> None:
        if self.resident is not None:
            self._point(self.resident, self.blocks[self.resident][1])
            self.resident = None


def block_offload(transformer, device: torch.device, prefetch: bool = True) -> BlockOffload:
    """Install BlockOffload on `transformer`'s blocks (see there); on a CPU it only copies, saving nothing."""
    if device.type != "cuda":
        log.warning("memory.block_offload saves accelerator memory only; on %s it just copies", device.type)
    return BlockOffload(transformer, device, prefetch)
