"""`logging.report_to: [tensorboard, wandb]`: the W&B run (offline mode, as WANDB_MODE asks) gets the scalars
metrics.jsonl gets and the validation videos; a resumed run continues the same W&B run; no login is one line."""

from __future__ import annotations

import pytest

from cogtune.errors import CogtuneError
from cogtune.train.loop import train
from cogtune.train.metrics import read_metrics
from conftest import tiny_train_config

pytest.importorskip("wandb")
pytestmark = pytest.mark.slow


def test_the_wandb_run_has_every_logged_scalar_and_the_videos(tiny_model, synth_data, tmp_path, monkeypatch):
    from helpers.wandb_log import history

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    common = dict(logging__report_to="[tensorboard,wandb]", logging__wandb_name="tiny", checkpoint__every_steps=2,
                  validation__prompts="[a red circle]", validation__every_steps=2, validation__inference_steps=2)
    train(tiny_train_config(tiny_model(), synth_data, out, max_steps=2, **common))
    train(tiny_train_config(tiny_model(), synth_data, out, max_steps=4, resume="latest", **common))
    runs = sorted((out / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    run_id = (out / "logs" / "wandb_id").read_text().strip()
    assert len(runs) == 2 and all(r.stem == f"run-{run_id}" for r in runs)  # the resume continued the same run
    rows = [row for r in runs for row in history(r)]
    logged = {(m["step"], k): v for m in read_metrics(out / "logs" / "metrics.jsonl") for k, v in m.items()
              if k != "step" and isinstance(v, (int, float))}
    sent = {(row["_step"], k): v for row in rows for k, v in row.items() if not k.startswith(("_", "validation/"))}
    assert sent == logged and {k for _, k in logged} >= {"loss", "lr"}
    # W&B flattens a media value into <key>/_type, <key>/path, ... in the row
    videos = [(row["validation/video_00/_type"], row["validation/video_00/path"]) for row in rows
              if "validation/video_00/_type" in row]
    assert len(videos) == 2 and all(kind == "video-file" for kind, _ in videos)  # at steps 2 and 4
    assert all((r.parent / "files" / path).is_file() for r, (_, path) in zip(runs, videos))


def test_wandb_without_a_login_is_one_line_before_loading(tiny_model, synth_data, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(CogtuneError, match="W&B has no login here: run `wandb login`.*WANDB_MODE=offline"):
        train(tiny_train_config(tiny_model(), synth_data, tmp_path / "run", logging__report_to="[wandb]"))
    assert not (tmp_path / "run" / "logs").exists()
