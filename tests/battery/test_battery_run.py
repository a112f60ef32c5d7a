"""A run through the real `cogtune train` never loses finished work: live-run lock, signals at chosen phases, damaged
checkpoints, and a final save onto a full, size-limited or read-only disk."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import (assert_intact, assert_no_temp, assert_refused, cli, in_readonly, in_small_fs, needs_unshare,
                     sigterm, snapshot, start, wait_for)

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
LORA = "lora/pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model, synth_data):
    """A config for the tiny model and a finished 2-step run with checkpoint-1 and checkpoint-2 (shared, read-only)."""
    root = tmp_path_factory.mktemp("run")
    tree = yaml.safe_load(QUICKSTART.read_text())
    tree["model"]["path"], tree["data"]["root"] = str(tiny_model()), str(synth_data)
    tree["max_steps"], tree["validation"] = 2, {"heldout_loss": False}
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(tree))
    done = root / "done"
    r = cli("train", config, f"output_dir={done}", "checkpoint.every_steps=1", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return config, done


def train(config, out, *overrides, **kw):
    return cli("train", config, f"output_dir={out}", *overrides, cwd=Path(config).parent, **kw)


def copy_run(done: Path, to: Path, checkpoints=True) -> Path:
    shutil.copytree(done, to, ignore=None if checkpoints else shutil.ignore_patterns("checkpoint-*"))
    return to


def test_finished_run_leaves_no_lock(base):
    _, done = base
    assert (done / LORA).is_file() and (done / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (done / ".cogtune.lock").exists()
    assert_no_temp(done)


@pytest.fixture
def live(tmp_path):
    """A live process (its pid in the lock) standing in for the run that holds a folder."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("overrides", [["overwrite=true"], ["resume=latest"], ["resume=auto"], []],
                         ids=["overwrite", "resume-latest", "resume-auto", "plain"])
def test_live_folder_is_refused_before_anything_changes(base, tmp_path, live, overrides):
    config, done = base
    out = copy_run(done, tmp_path / "out")
    (out / ".cogtune.lock").write_text(json.dumps({"pid": live, "host": socket.gethostname(), "started": 0}))
    before = snapshot(out)
    r = train(config, out, *overrides)
    assert_refused(r, str(out), f"pid {live}", socket.gethostname())
    assert_intact(before, out)
    assert set(snapshot(out)) == set(before), "a refused run must not add files"


def test_lock_of_another_host_is_refused(base, tmp_path):
    config, done = base
    out = copy_run(done, tmp_path / "out")
    (out / ".cogtune.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere-node-7", "started": 0}))
    before = snapshot(out)
    assert_refused(train(config, out, "overwrite=true"), "elsewhere-node-7", ".cogtune.lock")
    assert_intact(before, out)


def test_unreadable_lock_is_refused(base, tmp_path):
    config, done = base
    out = copy_run(done, tmp_path / "out")
    (out / ".cogtune.lock").write_text("{not json")
    before = snapshot(out)
    assert_refused(train(config, out, "overwrite=true"), ".cogtune.lock", "delete")
    assert_intact(before, out)


def test_output_dir_that_is_a_file(base, tmp_path):
    config, _ = base
    f = tmp_path / "notafolder"
    f.write_text("mine")
    line = assert_refused(train(config, f), "output_dir", "is a file")
    assert str(f) in line and f.read_text() == "mine"


def test_resume_auto_without_checkpoint_keeps_earlier_outputs(base, tmp_path):
    config, done = base
    out = copy_run(done, tmp_path / "out", checkpoints=False)
    before = snapshot(out)
    assert_refused(train(config, out, "resume=auto"), str(out), "earlier run", "overwrite=true")
    assert_intact(before, out)


DAMAGE = [
    ("truncated weights", "trainable.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-100])),
    ("garbage weights", "trainable.safetensors", lambda p: p.write_bytes(b"\x00garbage" * 50)),
    ("state not JSON", "trainer_state.json", lambda p: p.write_text("{step: 2")),
    ("state with wrong fields", "trainer_state.json", lambda p: p.write_text('{"step": "two", "sampler": 1}')),
]


@pytest.mark.parametrize("name,damage", [c[1:] for c in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_damaged_checkpoint_names_the_file_and_the_earlier_ones(base, tmp_path, name, damage):
    config, done = base
    out = copy_run(done, tmp_path / "out")
    damage(out / "checkpoint-2" / name)
    before = snapshot(out)
    line = assert_refused(train(config, out, "resume=latest"), f"checkpoint-2/{name}", "checkpoint-1")
    assert "earlier checkpoint" in line
    assert_intact(before, out)


def test_stale_lock_is_taken_over_and_overwrite_keeps_lock_and_cache(base, tmp_path):
    config, done = base
    out = copy_run(done, tmp_path / "out")
    (out / "cache").mkdir()
    (out / "cache" / "entry").write_text("hours of encoding")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".cogtune.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    r = train(config, out, "overwrite=true", "max_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stale lock" in r.stderr
    assert (out / "cache" / "entry").read_text() == "hours of encoding"
    assert not (out / "checkpoint-2").exists() and (out / LORA).is_file()
    assert not (out / ".cogtune.lock").exists()


def test_sigterm_while_caching_keeps_what_is_cached(base, tmp_path):
    config, _ = base
    data = tmp_path / "data"
    assert cli("data", "synth", data, "--clips", "40").returncode == 0
    out = tmp_path / "out"
    proc = start("train", config, f"output_dir={out}", f"data.root={data}", cwd=tmp_path)
    videos = data / ".cogtune_cache"
    wait_for(lambda: any(p.suffix == ".safetensors" for p in videos.rglob("videos/**/*")), proc=proc)
    # a second command on the live folder is refused and changes nothing
    before = snapshot(out)
    assert_refused(train(config, out, "overwrite=true"), str(out), f"pid {proc.pid}")
    assert_intact(before, out)
    code, stdout, stderr = sigterm(proc)
    assert code == 0, stderr[-3000:]
    assert "stopped before any new step" in stdout and "Traceback" not in stderr
    cached = [p for p in videos.rglob("videos/**/*.safetensors")]
    assert 0 < len(cached) < 40
    assert not list(out.glob("checkpoint-*")) and not (out / "lora").exists()
    assert not (out / ".cogtune.lock").exists()
    assert_no_temp(out)
    assert_no_temp(videos)


VALIDATION = ["validation.prompts=['a red ball']", "validation.inference_steps=40", "validation.frames=25",
              "validation.every_steps=1"]


def test_sigterm_in_validation_saves_a_checkpoint_then_the_final_outputs(base, tmp_path):
    config, _ = base
    out = tmp_path / "out"
    proc = start("train", config, f"output_dir={out}", "max_steps=2", *VALIDATION, cwd=tmp_path)
    wait_for(lambda: (out / "validation" / "step-1").is_dir(), proc=proc)
    code, stdout, stderr = sigterm(proc)
    assert code == 0, stderr[-3000:]
    assert "stopped at step 1" in stdout and "resume=latest" in stdout and "Traceback" not in stderr
    assert (out / "checkpoint-1" / "trainer_state.json").is_file() and not (out / "lora").exists()
    assert_no_temp(out)
    # continued: a signal during the final validation videos still saves the LoRA
    proc = start("train", config, f"output_dir={out}", "max_steps=2", "resume=latest", *VALIDATION, cwd=tmp_path)
    wait_for(lambda: (out / "validation" / "step-2").is_dir(), proc=proc)
    code, stdout, stderr = sigterm(proc)
    assert code == 0, stderr[-3000:]
    assert "trained 2 steps" in stdout and (out / LORA).is_file()
    assert not (out / ".cogtune.lock").exists()
    assert_no_temp(out)


@needs_unshare
def test_full_disk_at_final_save_rescues_the_lora(base, tmp_path):
    config, _ = base
    out, rescue_root = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    rescue_root.mkdir()
    r = train(config, out, "max_steps=1", prefix=in_small_fs(out, "32k"), env={"TMPDIR": str(rescue_root)})
    line = assert_refused(r, "disk is full", "pytorch_lora_weights.safetensors", str(rescue_root))
    rescued = list(rescue_root.glob("cogtune-rescue-*/" + LORA))
    assert len(rescued) == 1 and str(rescued[0]) in line
    from cogtune.train.lora import read_metadata

    assert read_metadata(rescued[0])["cogtune.steps"] == "1"
    assert_no_temp(rescue_root)


@needs_unshare
def test_read_only_lora_folder_saves_a_checkpoint_to_resume(base, tmp_path):
    config, done = base
    out = tmp_path / "out"
    (out / "lora").mkdir(parents=True)
    r = train(config, out, f"resume={done / 'checkpoint-2'}", prefix=in_readonly(out / "lora"))
    line = assert_refused(r, "read-only", "lora", f"resume={out / 'checkpoint-2'}")
    assert (out / "checkpoint-2" / "trainer_state.json").is_file(), line
    assert_no_temp(out)
    r = train(config, out, f"resume={out / 'checkpoint-2'}")  # as the line says: the outputs, no more training
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained 2 steps" in r.stdout and (out / LORA).is_file()


def test_file_size_limit_at_final_save_names_file_and_last_checkpoint(base, tmp_path):
    config, done = base
    size = (done / LORA).stat().st_size
    out = tmp_path / "out"
    r = train(config, out, f"resume={done / 'checkpoint-2'}", fsize=size - 1000, env={"TMPDIR": str(tmp_path)})
    assert_refused(r, "larger than this system allows", "pytorch_lora_weights", str(done / "checkpoint-2"))
    assert not (out / "lora").exists() and not list(out.glob("checkpoint-*"))
    assert_no_temp(out)
    assert not list(tmp_path.glob("cogtune-rescue-*"))


SHARDS = """
import sys, torch
from cogtune.export.shards import save_transformer_folder
state = {f"w{i}": torch.randn(64, 64) for i in range(8)}
save_transformer_folder(state, {"a": 1}, sys.argv[1], max_shard_size="40KB")
"""


def test_shard_writer_over_the_size_limit_names_the_file_and_leaves_nothing(tmp_path):
    out = tmp_path / "transformer"
    script = tmp_path / "write.py"
    script.write_text(SHARDS)
    # through the CLI's OSError path: `cogtune convert` is not needed, the writer's error is what is checked
    r = subprocess.run([sys.executable, "-c", "import runpy, sys\nfrom cogtune.errors import os_error_text\n"
                        f"try:\n    runpy.run_path({str(script)!r}, run_name='__main__')\n"
                        "except OSError as e:\n    print('cogtune: error: ' + os_error_text(e), file=sys.stderr)\n"
                        "    sys.exit(2)", str(out)], capture_output=True, text=True,
                       preexec_fn=lambda: __import__("resource").setrlimit(
                           __import__("resource").RLIMIT_FSIZE, (20000, 20000)))
    assert_refused(r, "larger than this system allows", "diffusion_pytorch_model-0000")
    assert not out.exists()
    assert_no_temp(tmp_path)
