"""An exponential moving average of the trained parameters, in fp32, saved and resumed exactly.

From `start_step` on, every `every` steps: ema = decay * ema + (1 - decay) * weights; at its first update the
average starts as the weights themselves. `swapped_in` puts the average into the model for a while (validation,
the export of lora_ema/ or transformer_ema/) and puts the trained weights back after.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import CogtuneError

FILE = "ema.safetensors"


class EMA:
    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float, start_step: int = 0, every: int = 1,
                 on_host: bool = False):
        self.params, self.decay, self.start_step, self.every = named_params, decay, start_step, every
        self.device = torch.device("cpu") if on_host else None
        self.shadow: dict[str, torch.Tensor] = {}  # empty until the first update

    def due(self, step: int) -> bool:
        return step >= self.start_step and (step - self.start_step) % self.every == 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step number `step` (1-based)."""
        if not self.due(step):
            return
        for name, p in self.params.items():
            value = p.detach().to(self.device or p.device, torch.float32)
            if name not in self.shadow:
                self.shadow[name] = value.clone()
            else:
                self.shadow[name].lerp_(value, 1.0 - self.decay)  # ema + (1 - decay) * (w - ema)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}

    def load(self, path: Path) -> None:
        file = Path(path) / FILE
        if not file.is_file():  # a checkpoint from before the average started, or of a run without one
            self.shadow = {}
            return
        state = load_file(str(file))
        foreign = sorted(set(state) - set(self.params))
        if foreign:
            raise CogtuneError(f"resume: {file} averages parameters this model does not train (e.g. {foreign[0]})")
        self.shadow = {n: t.to(self.device or self.params[n].device) for n, t in state.items()}

    @contextmanager
    def swapped_in(self):
        """The averaged weights in the model (in its dtype) for the duration; the trained ones back after. Yields
        False (and changes nothing) before the first update."""
        if not self.shadow:
            yield False
            return
        with torch.no_grad():
            kept = {n: p.detach().clone() for n, p in self.params.items() if n in self.shadow}
            for n, value in self.shadow.items():
                self.params[n].copy_(value)
        try:
            yield True
        finally:
            with torch.no_grad():
                for n, value in kept.items():
                    self.params[n].copy_(value)
