"""Per-step metrics: one JSON object a line in `logs/metrics.jsonl`, mirrored to TensorBoard.

metrics.jsonl gets every row. TensorBoard gets every row too, except that per-step rows arriving less than
`tensorboard_interval_s` after the last one mirrored are left out there: a TensorBoard scalar costs ~40 us of Python,
which is a visible share of a fast step, and TensorBoard keeps only a 1000-point sample of each curve anyway.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

PER_STEP = frozenset({"loss", "lr", "elapsed_s", "grad_norm", "skipped"})


class MetricsLog:
    def __init__(self, log_dir: str | Path, enabled: bool = True, tensorboard_interval_s: float = 0.1,
                 flush_interval_s: float = 1.0):
        self.enabled = enabled
        self.dir = Path(log_dir)
        self.tb_interval, self.flush_interval = tensorboard_interval_s, flush_interval_s
        self._last_tb = self._last_flush = float("-inf")
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    @property
    def tensorboard(self) -> SummaryWriter | None:
        return self._tb if self.enabled else None

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        if now - self._last_flush >= self.flush_interval:
            self._jsonl.flush()
            self._last_flush = now
        if now - self._last_tb >= self.tb_interval or not PER_STEP.issuperset(values):
            self._last_tb = now
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled and not self._jsonl.closed:
            self._jsonl.close()
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
