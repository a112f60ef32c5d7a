"""Per-step metrics: one JSON object a line in `logs/metrics.jsonl`, mirrored to TensorBoard and/or W&B
(`logging.report_to`).

metrics.jsonl gets every row. TensorBoard gets every row too, except that per-step rows arriving less than
`tensorboard_interval_s` after the last one mirrored are left out there: a TensorBoard scalar costs ~40 us of Python,
which is a visible share of a fast step, and TensorBoard keeps only a 1000-point sample of each curve anyway.
W&B gets every row (it batches them itself) and the validation videos.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import CogtuneError

PER_STEP = frozenset({"loss", "lr", "elapsed_s", "grad_norm", "skipped"})
WANDB_OFFLINE = ("offline", "disabled", "dryrun")


def check_reporting(report_to: Sequence[str]) -> None:
    """Refuse, before any weight loads, a reporter that cannot start: one line saying what to do."""
    if "wandb" not in report_to:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise CogtuneError("logging.report_to has wandb, which is not installed: pip install wandb "
                           "(or drop wandb from logging.report_to)") from None
    if os.environ.get("WANDB_MODE", "").lower() in WANDB_OFFLINE or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")):
        raise CogtuneError("logging.report_to has wandb but W&B has no login here: run `wandb login` first, or set "
                           "WANDB_MODE=offline to keep the run in logs/wandb/ (upload it later with `wandb sync`)")


class MetricsLog:
    def __init__(self, log_dir: str | Path, enabled: bool = True, tensorboard_interval_s: float = 0.1,
                 flush_interval_s: float = 1.0, report_to: Sequence[str] = ("tensorboard",),
                 wandb_init: dict | None = None):
        self.enabled = enabled
        self.dir = Path(log_dir)
        self.tb_interval, self.flush_interval = tensorboard_interval_s, flush_interval_s
        self._last_tb = self._last_flush = float("-inf")
        self._tb = self._wandb = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
            if "tensorboard" in report_to:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            if "wandb" in report_to:
                self._wandb = self._start_wandb(wandb_init or {})

    def _start_wandb(self, init: dict):
        import wandb

        id_file = self.dir / "wandb_id"  # a resumed run continues the same W&B run
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        return wandb.init(id=run_id, resume="allow", dir=str(self.dir), **init,
                          settings=wandb.Settings(console="off", silent=True))

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        if now - self._last_flush >= self.flush_interval:
            self._jsonl.flush()
            self._last_flush = now
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self._tb is not None and (now - self._last_tb >= self.tb_interval or not PER_STEP.issuperset(values)):
            self._last_tb = now
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def validation_media(self, step: int, sheet: np.ndarray, videos: Sequence[Path]) -> None:
        """The contact sheet (HWC uint8) and the videos of one validation round."""
        if self._tb is not None:
            self._tb.add_image("validation/contact_sheet", sheet, step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            media = {"validation/contact_sheet": wandb.Image(sheet)}
            media |= {f"validation/video_{i:02d}": wandb.Video(str(v), format="mp4") for i, v in enumerate(videos)}
            self._wandb.log(media, step=step)

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.enabled and not self._jsonl.closed:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
