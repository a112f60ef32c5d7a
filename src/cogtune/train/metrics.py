"""Per-step metrics: one JSON object a line in `logs/metrics.jsonl`, mirrored to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class MetricsLog:
    def __init__(self, log_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(log_dir)
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
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
