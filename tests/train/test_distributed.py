"""Scale out and never lose work: 2 real processes (torchrun, gloo, DeepSpeed on CPU) against 1, exact resume,
checkpoints that survive a kill, and a clear error instead of a silent fresh start.

Why 2-process and 1-process loss curves can be compared at all: sample i of a global batch draws its latents,
timestep and noise from a generator keyed by (seed, step, position in the global batch), and the bucket sampler
deals the same global batches whatever the world size. So 2 processes × batch 1 and 1 process × batch 1 × 2
accumulation steps see the same clips with the same noise; only the order of floating-point reductions differs
(an all-reduce of two half-gradients vs. an accumulated sum), worth ~1e-7 relative per step. After three AdamW steps at
lr 1e-3 that stays far below the 1e-4 relative tolerance used here, while a wrong batch split or wrong noise would
change the losses by percents.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cogtune.train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
HELPERS = Path(__file__).parents[1] / "helpers"


@pytest.fixture(scope="module")
def config(tiny_model, synth_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tree = {
        "model": {"path": str(tiny_model("cogvideox-5b"))},
        "data": {"root": str(synth_data), "frames": 9, "height": 32, "width": 48},
        "lora": {"rank": 8, "alpha": 8},
        "optimizer": {"lr": 1e-3},
        "max_steps": 3,
        "mixed_precision": "no",
        "validation": {"heldout_loss": False},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def cogtune(*args, nproc: int = 1, timeout: int = 300, script: list[str] | None = None):
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    head = script or [sys.executable, "-m", "cogtune"]
    cmd = [*head, "train", *map(str, args)] + (["--nproc", str(nproc)] if nproc > 1 else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def tiny_base(config: Path) -> str:
    return yaml.safe_load(config.read_text())["model"]["path"]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r}


def assert_ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


_reference: dict[str, dict[int, float]] = {}


def reference(config, tmp_path_factory, method: str) -> dict[int, float]:
    """1 process, batch 1, 2 accumulation steps: the same global batch as 2 processes × batch 1."""
    if method not in _reference:
        out = tmp_path_factory.mktemp(f"ref-{method}")
        assert_ok(cogtune(config, f"method={method}", "gradient_accumulation_steps=2", f"output_dir={out}"))
        _reference[method] = losses(out)
    return _reference[method]


_uninterrupted: dict[tuple, dict[int, float]] = {}


def uninterrupted(config, tmp_path_factory, *overrides: str, nproc: int = 1) -> dict[int, float]:
    """The losses of a run with these overrides, trained in one go (shared by the resume tests)."""
    key = (*overrides, nproc)
    if key not in _uninterrupted:
        out = tmp_path_factory.mktemp("straight")
        assert_ok(cogtune(config, *overrides, f"output_dir={out}", nproc=nproc))
        _uninterrupted[key] = losses(out)
    return _uninterrupted[key]


@pytest.mark.parametrize("strategy,method", [("ddp", "lora"), ("zero2", "sft"), ("zero3", "sft"), ("fsdp2", "sft")])
def test_two_processes_match_one(config, tmp_path, tmp_path_factory, strategy, method):
    ref = reference(config, tmp_path_factory, method)
    extra = ["checkpoint.every_steps=3"] if strategy == "fsdp2" else []  # a sharded checkpoint of the final weights
    proc = cogtune(config, f"method={method}", f"distributed.strategy={strategy}", f"output_dir={tmp_path}", *extra,
                   nproc=2)
    assert_ok(proc)
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3] == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), (strategy, step, got, ref)
    # the final export works under every strategy and holds the whole model
    if method == "sft":
        from diffusers import CogVideoXTransformer3DModel

        model = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "transformer"))
        base = CogVideoXTransformer3DModel.from_pretrained(yaml.safe_load(config.read_text())["model"]["path"],
                                                           subfolder="transformer")
        changed = [n for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
        assert len(changed) > 0.5 * len(list(base.parameters())), "the exported weights are not the trained ones"
        if strategy == "fsdp2":  # `cogtune convert fsdp` of the step-3 checkpoint gives the step-3 export, exactly
            from cogtune.export.fsdp import convert_fsdp

            convert_fsdp(tmp_path / "checkpoint-3", tmp_path / "converted", tiny_base(config), quiet=True)
            converted = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "converted"))
            for (name, p), (_, q) in zip(converted.state_dict().items(), model.state_dict().items()):
                assert torch.equal(p, q), name
    else:
        assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_one_process_without_a_launcher(config, tmp_path, tmp_path_factory):
    """`cogtune train` alone (no torchrun, no RANK/WORLD_SIZE) runs a DeepSpeed strategy as a group of one: the
    single-GPU SFT case of ZeRO-2 with optimizer offload. Same global batch as the reference, so the same losses."""
    ref = reference(config, tmp_path_factory, "sft")
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & os.environ.keys()
    proc = cogtune(config, "method=sft", "gradient_accumulation_steps=2", "distributed.strategy=zero2_offload",
                   f"output_dir={tmp_path}")
    assert_ok(proc)
    got = losses(tmp_path)
    assert sorted(got) == sorted(ref) and all(got[s] == pytest.approx(ref[s], rel=1e-4) for s in ref), (got, ref)
    assert (tmp_path / "transformer" / "config.json").is_file()


@pytest.mark.parametrize("strategy,nproc", [("auto", 1), ("zero2", 2), ("fsdp2", 2)])
def test_exact_resume(config, tmp_path, tmp_path_factory, strategy, nproc):
    method = "lora" if nproc == 1 else "sft"
    common = [config, f"method={method}", f"distributed.strategy={strategy}", "max_steps=6"]
    straight = uninterrupted(config, tmp_path_factory, *common[1:], nproc=nproc)
    assert_ok(cogtune(*common, "max_steps=3", "checkpoint.every_steps=3", f"output_dir={tmp_path / 'split'}",
                      nproc=nproc))
    ckpt = tmp_path / "split" / "checkpoint-3"
    assert (ckpt / "trainer_state.json").is_file()
    if strategy == "fsdp2":  # each rank wrote its own shard
        assert sorted(p.name for p in (ckpt / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    if nproc == 1:  # a LoRA checkpoint holds the adapters, not the frozen base
        assert (ckpt / "trainable.safetensors").is_file() and not list(ckpt.glob("model*.safetensors"))
        assert all("lora_" in k for k in load_file(str(ckpt / "trainable.safetensors")))
    assert_ok(cogtune(*common, "resume=latest", f"output_dir={tmp_path / 'split'}", nproc=nproc))
    split = losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 7))
    for step in range(1, 7):
        assert split[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), (step, straight, split)


def test_kill_during_checkpoint_write_keeps_previous(config, tmp_path, tmp_path_factory):
    out = tmp_path / "run"
    killer = [sys.executable, str(HELPERS / "kill_in_checkpoint.py"), "4"]
    proc = cogtune(config, "max_steps=6", "checkpoint.every_steps=2", f"output_dir={out}", script=killer)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / ".checkpoint-4.tmp").is_dir()  # the write really was cut short
    from cogtune.train.checkpoint import checkpoints

    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"]
    assert_ok(cogtune(config, "max_steps=6", "checkpoint.every_steps=2", "resume=latest", f"output_dir={out}"))
    resumed = losses(out)
    want = uninterrupted(config, tmp_path_factory, "method=lora", "distributed.strategy=auto", "max_steps=6")
    for step in (3, 4, 5, 6):
        assert resumed[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(config, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cogtune", "train", str(config), "max_steps=100000",
                             f"output_dir={tmp_path}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    metrics = tmp_path / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file() or len(read_metrics(metrics)) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    from cogtune.train.checkpoint import checkpoints

    saved = checkpoints(tmp_path)
    assert len(saved) == 1 and "stopped at step" in stdout
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert state["step"] == int(saved[0].name.split("-")[1]) >= 3


def test_resume_errors_are_one_line(config, tmp_path, capsys):
    from cogtune.cli import main

    assert main(["train", str(config), "resume=/no/such/checkpoint", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/no/such/checkpoint" in err
    assert main(["train", str(config), "resume=latest", f"output_dir={tmp_path}"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    # a checkpoint from another config cannot continue this one
    assert main(["train", str(config), "max_steps=2", "checkpoint.every_steps=2", f"output_dir={tmp_path}"]) == 0
    capsys.readouterr()
    assert main(["train", str(config), "lora.rank=4", "resume=latest", f"output_dir={tmp_path}"]) == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and "lora.rank" in err
    assert "model " not in out.out  # refused before any loading: no run summary


def test_a_fresh_run_never_mixes_with_an_earlier_one(config, tmp_path, capsys):
    """Without resume, an output_dir holding an earlier run is refused (a later resume: latest would continue the
    earlier run's newest checkpoint); overwrite=true deletes that run first."""
    from cogtune.cli import main
    from cogtune.train.checkpoint import checkpoints

    out = f"output_dir={tmp_path}"
    assert main(["train", str(config), "max_steps=4", "checkpoint.every_steps=2", out]) == 0
    lora = (tmp_path / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", str(config), "max_steps=2", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resume=latest" in err and "overwrite=true" in err
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == lora
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert main(["train", str(config), "max_steps=2", "checkpoint.every_steps=2", "overwrite=true", out]) == 0
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2"]
    assert sorted(losses(tmp_path)) == [1, 2]


def _poison_one_clip(cache_root: Path) -> str:
    """Make one cached clip's latents non-finite; returns the clip's source path as stored in the entry."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    entry = sorted((cache_root / "videos").rglob("*.safetensors"))[0]
    with safe_open(str(entry), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    tensors["latent_mean"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(entry), metadata=meta)
    return meta["cogtune.source"]


def test_planted_nan_stops_with_the_clip_named_or_is_skipped(tiny_model, synth_data, tmp_path, capsys):
    from conftest import tiny_train_config
    from cogtune.errors import CogtuneError
    from cogtune.train.loop import train

    cache = tmp_path / "cache"
    cfg = tiny_train_config(tiny_model("cogvideox-5b"), synth_data, tmp_path / "a", max_steps=12, data__cache_dir=cache)
    train(cfg)  # fills the cache
    source = _poison_one_clip(cache)
    clip = Path(source).name
    with pytest.raises(CogtuneError) as info:
        train(cfg.model_copy(update={"output_dir": tmp_path / "b"}))
    message = str(info.value)
    assert "non-finite loss" in message and clip in message and "\n" not in message
    result = train(cfg.model_copy(update={"output_dir": tmp_path / "c", "on_nonfinite": "skip_step"}))
    assert result.steps == 12
    rows = [r for r in read_metrics(tmp_path / "c" / "logs" / "metrics.jsonl") if "loss" in r]
    assert any(r.get("skipped") for r in rows)
    lora = load_file(str(result.lora_path))
    assert all(torch.isfinite(v).all() for v in lora.values())
