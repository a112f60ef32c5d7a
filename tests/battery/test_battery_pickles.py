"""Battery: nothing executed, nothing trusted that changed. Every command that reads pickles (`convert zero`, `convert
sat`, `convert fsdp`, `train` resuming) refuses code in a checkpoint and damaged bytes in one line, and still reads
real DeepSpeed, FSDP2, accelerate and SAT-style saves without `--unsafe-pickle`, which works the same on each.

The checkpoints are real: a DeepSpeed ZeRO-2 run on 2 CPU ranks (tests/helpers/zero_train.py), cogtune LoRA and FSDP2
runs, and a SAT save laid out as SAT's model_io.save_ds_checkpoint writes it (DeepSpeed's model states plus SAT's RNG
states, numpy's among them). Malicious files are those real files with one more entry that calls a global.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import random
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import CogVideoXTransformer3DModel
from safetensors.torch import load_file

from harness import assert_intact, assert_no_temp, assert_refused, cli, snapshot
from helpers.sat import to_sat

PAYLOADS = ("os.system", "posix.system", "builtins.exec")


# --- payloads -----------------------------------------------------------------------------------------------------

class _Call:
    """Unpickles as `fn(arg)`."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def payload(kind: str, marker: Path) -> _Call:
    if kind == "builtins.exec":
        return _Call(exec, f"open({str(marker)!r}, 'w').close()")
    return _Call(os.system, f"touch '{marker}'")  # pickled as posix.system, its home module


def rewrite_member(path: Path, suffix: str, edit) -> None:
    """Rewrite the zip member ending in `suffix` with `edit(bytes)`, CRCs recomputed (a well-formed archive)."""
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(name, edit(data) if name.endswith(suffix) else data)


def save_poisoned(obj: dict, path: Path, kind: str, marker: Path) -> None:
    torch.save({**obj, "note": payload(kind, marker)}, path)
    if kind == "os.system":  # a hand-written pickle may name the call `os system`
        rewrite_member(path, "data.pkl", lambda b: b.replace(b"cposix\nsystem\n", b"cos\nsystem\n"))


def real(path: Path):
    """A file of our own real runs, loaded in full."""
    return torch.load(path, map_location="cpu", weights_only=False)


# --- damage -------------------------------------------------------------------------------------------------------

def _member_data_offset(f, base: int, info: zipfile.ZipInfo) -> int:
    f.seek(base + info.header_offset + 26)
    name_len, extra_len = struct.unpack("<HH", f.read(4))
    return base + info.header_offset + 30 + name_len + extra_len


def flip(path: Path, member: str = "/data/", base: int = 0, length: int | None = None) -> None:
    """XOR one byte in the middle of the largest zip member whose name contains `member` (inside a tensor's data, or
    the pickle); `base`/`length`: the archive is embedded at that range of the file (a DCP item)."""
    with open(path, "r+b") as f:
        f.seek(base)
        view = io.BytesIO(f.read(length if length is not None else -1))
        with zipfile.ZipFile(view) as z:
            info = max((i for i in z.infolist() if member in i.filename), key=lambda i: i.file_size)
        at = _member_data_offset(f, base, info) + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x5A]))


DAMAGES = {
    "flipped tensor byte": lambda p: flip(p, "/data/"),
    "flipped pickle byte": lambda p: flip(p, "data.pkl"),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p: p.write_bytes(random.Random(0).randbytes(p.stat().st_size)),
    "empty": lambda p: p.write_bytes(b""),
}


# --- real checkpoints (one run each for the module) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("cogvideox-5b")


@pytest.fixture(scope="module")
def zero(zero_checkpoint):
    """(checkpoint-2 of a real ZeRO-2 bf16 run on 2 ranks, DeepSpeed's own fp32 master weights)."""
    ckpt, ref, _ = zero_checkpoint("zero2-bf16")
    return ckpt, ref


@pytest.fixture(scope="module")
def config(model, synth_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model)}, "data": {"root": str(synth_data), "frames": 9, "height": 32, "width": 48},
        "lora": {"rank": 4, "alpha": 4}, "optimizer": {"lr": 1e-3}, "max_steps": 1, "mixed_precision": "no",
        "validation": {"heldout_loss": False}, "checkpoint": {"every_steps": 1}}))
    return path


def _train(config, out, *extra, nproc=1):
    r = cli("train", config, f"output_dir={out}", *extra, *(["--nproc", str(nproc)] if nproc > 1 else []),
            env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def lora_run(config, tmp_path_factory):
    """A cogtune LoRA run with checkpoint-1 (accelerate save_state: optimizer.bin, scheduler.bin, random_states)."""
    return _train(config, tmp_path_factory.mktemp("lora") / "run")


@pytest.fixture(scope="module")
def fsdp_run(config, tmp_path_factory):
    """A cogtune FSDP2 full fine-tune on 2 ranks: checkpoint-1/sharded/ and the final transformer/ of the same step."""
    return _train(config, tmp_path_factory.mktemp("fsdp") / "run", "method=sft", "distributed.strategy=fsdp2",
                  nproc=2)


@pytest.fixture(scope="module")
def sat_state(zero, model):
    """(a SAT save's dict: DeepSpeed's model states with SAT's module and client state, the transformer it holds)."""
    ds = torch.load(zero[0] / "pytorch_model" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    transformer = CogVideoXTransformer3DModel.from_pretrained(model / "transformer")
    sd, cfg = transformer.state_dict(), transformer.config
    client = {  # what SAT's model_io.save_ds_checkpoint adds (cuda_rng_state too, on a GPU)
        "iteration": 1000, "client_lr_scheduler": {"start_lr": 1e-4, "warmup_iter": 100, "num_iters": 1000,
                                                   "decay_style": "cosine", "end_iter": 1000, "decay_ratio": 0.1},
        "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state()}
    return {**ds, "module": to_sat(sd, cfg.num_layers, cfg.use_rotary_positional_embeddings), **client}, sd


def save_sat(state: dict, folder: Path) -> Path:
    (folder / "1000").mkdir(parents=True)
    torch.save(state, folder / "1000" / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text("1000")
    return folder


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def refused_intact(r, root: Path, before: dict, out: Path, *names: str) -> None:
    assert_refused(r, *names)
    assert_intact(before, root)
    assert not out.exists()
    assert_no_temp(out.parent)


# --- the payloads are live: a test that they are refused can fail ---------------------------------------------

@pytest.mark.parametrize("kind", PAYLOADS)
def test_payload_runs_when_unpickled(kind, tmp_path):
    marker = tmp_path / "ran"
    save_poisoned({"w": torch.ones(2)}, tmp_path / "x.pt", kind, marker)
    module, name = kind.replace("builtins", "__builtin__").split(".")  # protocol 2 writes Python 2's module name
    with zipfile.ZipFile(tmp_path / "x.pt") as z:
        pkl = next(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    assert f"c{module}\n{name}\n".encode() in pkl
    real(tmp_path / "x.pt")
    assert marker.exists()


# --- convert zero ---------------------------------------------------------------------------------------------

def test_zero_converts_without_the_flag(zero, model, tmp_path):
    ckpt, ref = zero
    r = cli("convert", "zero", ckpt, tmp_path / "out", "--base", model)
    assert r.returncode == 0, r.stderr[-3000:]
    got = weights(tmp_path / "out")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


ZERO_FILES = {"model states": "mp_rank_00_model_states.pt", "optimizer states": "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"}


@pytest.mark.parametrize("which, kind", [("model states", "os.system"), ("model states", "builtins.exec"),
                                         ("optimizer states", "posix.system")])
def test_zero_refuses_code(zero, model, tmp_path, which, kind):
    ckpt, marker = copy(zero[0], tmp_path / "ckpt"), tmp_path / "ran"
    target = ckpt / "pytorch_model" / ZERO_FILES[which]
    save_poisoned(real(target), target, kind, marker)
    before = snapshot(ckpt)
    r = cli("convert", "zero", ckpt, tmp_path / "out", "--base", model)
    refused_intact(r, ckpt, before, tmp_path / "out", target.name, kind, "--unsafe-pickle")
    assert not marker.exists()


@pytest.mark.parametrize("which, damage", [("model states", d) for d in DAMAGES if d != "flipped pickle byte"]
                         + [("optimizer states", "flipped tensor byte"), ("optimizer states", "flipped pickle byte")])
def test_zero_refuses_damaged_files(zero, model, tmp_path, which, damage):
    ckpt = copy(zero[0], tmp_path / "ckpt")
    target = ckpt / "pytorch_model" / ZERO_FILES[which]
    DAMAGES[damage](target)
    before = snapshot(ckpt)
    r = cli("convert", "zero", ckpt, tmp_path / "out", "--base", model)
    refused_intact(r, ckpt, before, tmp_path / "out", target.name, "damaged")


def test_zero_flag_loads_a_trusted_object(zero, model, tmp_path):
    ckpt, ref = copy(zero[0], tmp_path / "ckpt"), zero[1]
    target = ckpt / "pytorch_model" / "mp_rank_00_model_states.pt"
    torch.save({**real(target), "args": argparse.Namespace(lr=1e-4)}, target)  # refused without: see the SAT case
    r = cli("convert", "zero", ckpt, tmp_path / "out", "--base", model, "--unsafe-pickle")
    assert r.returncode == 0, r.stderr[-3000:]
    got = weights(tmp_path / "out")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# --- convert sat ----------------------------------------------------------------------------------------------

def test_sat_save_with_numpy_rng_converts_without_the_flag(sat_state, tmp_path):
    state, sd = sat_state
    assert isinstance(state["np_rng_state"][1], np.ndarray)
    r = cli("convert", "sat", save_sat(state, tmp_path / "sat"), tmp_path / "out", "--variant", "cogvideox-5b")
    assert r.returncode == 0, r.stderr[-3000:]
    got = weights(tmp_path / "out")
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_sat_refuses_code(sat_state, tmp_path):
    marker = tmp_path / "ran"
    folder = save_sat({**sat_state[0], "args": payload("posix.system", marker)}, tmp_path / "sat")
    before = snapshot(folder)
    r = cli("convert", "sat", folder, tmp_path / "out", "--variant", "cogvideox-5b")
    refused_intact(r, folder, before, tmp_path / "out", "mp_rank_00_model_states.pt", "posix.system", "--unsafe-pickle")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["flipped tensor byte", "truncated", "empty"])
def test_sat_refuses_damaged_files(sat_state, tmp_path, damage):
    folder = save_sat(sat_state[0], tmp_path / "sat")
    DAMAGES[damage](folder / "1000" / "mp_rank_00_model_states.pt")
    before = snapshot(folder)
    r = cli("convert", "sat", folder, tmp_path / "out", "--variant", "cogvideox-5b")
    refused_intact(r, folder, before, tmp_path / "out", "mp_rank_00_model_states.pt", "damaged")


def test_sat_flag_loads_a_trusted_object(sat_state, tmp_path):
    state, sd = sat_state
    folder = save_sat({**state, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "sat")  # older SAT saves' args
    assert_refused(cli("convert", "sat", folder, tmp_path / "out", "--variant", "cogvideox-5b"), "argparse.Namespace")
    r = cli("convert", "sat", folder, tmp_path / "out", "--variant", "cogvideox-5b", "--unsafe-pickle")
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(torch.equal(weights(tmp_path / "out")[k], sd[k]) for k in sd)


# --- convert fsdp ---------------------------------------------------------------------------------------------

def _metadata(sharded: Path):
    with open(sharded / ".metadata", "rb") as f:
        return pickle.load(f)  # our own run's file


def _dump_metadata(sharded: Path, meta) -> None:
    with open(sharded / ".metadata", "wb") as f:
        pickle.dump(meta, f)


def test_fsdp_converts_without_the_flag(fsdp_run, model, tmp_path):
    r = cli("convert", "fsdp", fsdp_run / "checkpoint-1", tmp_path / "out", "--base", model)
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = weights(tmp_path / "out"), weights(fsdp_run / "transformer")  # the same step, saved by training
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _fsdp_bad_metadata(sharded: Path, marker: Path) -> str:
    meta = _metadata(sharded)
    meta.planner_data = {"note": payload("posix.system", marker)}
    _dump_metadata(sharded, meta)
    return ".metadata"


def _fsdp_flipped_tensor(sharded: Path, marker: Path) -> str:
    meta = _metadata(sharded)
    index, info = max(((i, s) for i, s in meta.storage_data.items() if i.fqn.startswith("model.")),
                      key=lambda item: item[1].length)
    flip(sharded / info.relative_path, "/data/", info.offset, info.length)
    return info.relative_path


def _fsdp_truncated_shard(sharded: Path, marker: Path) -> str:
    DAMAGES["truncated"](sharded / "__1_0.distcp")
    return "__1_0.distcp"


def _fsdp_damaged_metadata(how: str):
    def damage(sharded: Path, marker: Path) -> str:
        DAMAGES[how](sharded / ".metadata")
        return ".metadata"
    return damage


FSDP_FAULTS = {"code in .metadata": (_fsdp_bad_metadata, "posix.system"),
               "flipped tensor byte": (_fsdp_flipped_tensor, "damaged"),
               "truncated shard": (_fsdp_truncated_shard, "damaged"),
               "truncated .metadata": (_fsdp_damaged_metadata("truncated"), "damaged"),
               "garbage .metadata": (_fsdp_damaged_metadata("garbage"), "damaged")}


@pytest.mark.parametrize("fault", FSDP_FAULTS)
def test_fsdp_refuses(fsdp_run, model, tmp_path, fault):
    ckpt, marker = copy(fsdp_run / "checkpoint-1", tmp_path / "checkpoint-1"), tmp_path / "ran"
    make, word = FSDP_FAULTS[fault]
    name = make(ckpt / "sharded", marker)
    before = snapshot(ckpt)
    r = cli("convert", "fsdp", ckpt, tmp_path / "out", "--base", model)
    refused_intact(r, ckpt, before, tmp_path / "out", name, word)
    assert not marker.exists()


def test_fsdp_flag_loads_a_trusted_object(fsdp_run, model, tmp_path):
    ckpt = copy(fsdp_run / "checkpoint-1", tmp_path / "checkpoint-1")
    meta = _metadata(ckpt / "sharded")
    meta.planner_data = {"note": argparse.Namespace(by="a custom planner")}
    _dump_metadata(ckpt / "sharded", meta)
    r = cli("convert", "fsdp", ckpt, tmp_path / "out", "--base", model, "--unsafe-pickle")
    assert r.returncode == 0, r.stderr[-3000:]


def test_fsdp_resume_check_refuses_code_in_a_non_tensor_item(fsdp_run, tmp_path):
    """DCP unpickles non-tensor items (optimizer param groups) with weights_only=False: resume checks them first.
    (In-process: a refused 2-rank resume prints one line per rank.)"""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from cogtune import pickles
    from cogtune.errors import CogtuneError

    ckpt, marker = copy(fsdp_run / "checkpoint-1", tmp_path / "checkpoint-1"), tmp_path / "ran"
    sharded = ckpt / "sharded"
    meta = _metadata(sharded)
    index = next(i for i in meta.storage_data if isinstance(meta.state_dict_metadata[i.fqn], BytesStorageMetadata))
    shard = sharded / meta.storage_data[index].relative_path
    evil = io.BytesIO()
    torch.save(payload("posix.system", marker), evil)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(evil.getvalue())
    meta.storage_data[index] = _StorageInfo(shard.name, offset, len(evil.getvalue()))
    _dump_metadata(sharded, meta)
    with pytest.raises(CogtuneError, match=rf"{shard.name}.*{index.fqn}.*posix\.system.*--unsafe-pickle"):
        pickles.check_folder(ckpt)
    assert not marker.exists()


# --- train: resume --------------------------------------------------------------------------------------------

RESUME_FILES = ("scheduler.bin", "optimizer.bin", "random_states_0.pkl")


def resume(config, run, *extra):
    return cli("train", config, f"output_dir={run}", "resume=latest", "max_steps=2", *extra,
               env={"OMP_NUM_THREADS": "1"})


def test_resume_without_the_flag(config, lora_run, tmp_path):
    run = copy(lora_run, tmp_path / "run")
    r = resume(config, run)
    assert r.returncode == 0 and "trained 2 steps" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("name", RESUME_FILES)
def test_resume_refuses_code(config, lora_run, tmp_path, name):
    run, marker = copy(lora_run, tmp_path / "run"), tmp_path / "ran"
    target = run / "checkpoint-1" / name
    save_poisoned(real(target), target, "posix.system", marker)
    before = snapshot(run)
    r = resume(config, run)
    assert_refused(r, name, "posix.system", "--unsafe-pickle")
    assert_intact(before, run)
    assert not marker.exists() and not (run / "checkpoint-2").exists()


# random_states: accelerate skips RNG states it cannot load without a word (the resumed run would not be exact)
@pytest.mark.parametrize("name, damage", [("random_states_0.pkl", "truncated")])
def test_resume_refuses_damaged_files(config, lora_run, tmp_path, name, damage):
    run = copy(lora_run, tmp_path / "run")
    DAMAGES[damage](run / "checkpoint-1" / name)
    before = snapshot(run)
    r = resume(config, run)
    assert_refused(r, name, "damaged")
    assert_intact(before, run)
    assert not (run / "checkpoint-2").exists()


def test_resume_flag_loads_a_trusted_object(config, lora_run, tmp_path):
    run = copy(lora_run, tmp_path / "run")
    target = run / "checkpoint-1" / "scheduler.bin"
    torch.save({**real(target), "note": argparse.Namespace(by="a custom callback")}, target)
    r = resume(config, run, "--unsafe-pickle")
    assert r.returncode == 0 and "trained 2 steps" in r.stdout, r.stderr[-3000:]
