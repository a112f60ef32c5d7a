"""{output_dir}/loss.png: the training loss, the fixed-point loss (held-out or on training clips) and the learning
rate against the step, redrawn at each checkpoint and at the end of a run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .metrics import read_metrics

log = logging.getLogger("cogtune")
FIXED = ("heldout_loss", "train_fixed_loss")


def loss_figure(rows: list[dict]):
    """The matplotlib Figure of these metrics rows (no global pyplot state: safe beside training threads)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    trained = [r for r in rows if "loss" in r and not r.get("skipped")]
    ax.plot([r["step"] for r in trained], [r["loss"] for r in trained], lw=1, color="tab:blue", label="loss")
    for key, colour in zip(FIXED, ("tab:red", "tab:orange")):
        points = [r for r in rows if key in r]
        if points:
            ax.plot([r["step"] for r in points], [r[key] for r in points], "o-", color=colour, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles = ax.get_lines()
    lr = [r for r in trained if "lr" in r]
    if lr:
        ax2 = ax.twinx()
        handles += ax2.plot([r["step"] for r in lr], [r["lr"] for r in lr], lw=1, ls="--", color="tab:gray",
                            label="lr")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.legend(handles=handles, loc="upper right")
    ax.grid(alpha=0.3)
    return fig


def write_loss_plot(metrics: str | Path, out: str | Path) -> Path | None:
    """Draw `metrics` (metrics.jsonl) into `out`, written under a temporary name first; a plot that fails only
    logs a warning (it must never stop a run)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        loss_figure(read_metrics(metrics)).savefig(tmp)
        os.replace(tmp, out)
        return out
    except Exception as e:  # noqa: BLE001 (a picture is not worth a run)
        tmp.unlink(missing_ok=True)
        log.warning("could not draw %s: %s", out, e)
        return None
