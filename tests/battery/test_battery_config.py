"""Bad configs and overrides through the real `cogtune train`: one line naming the key, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness import assert_refused, cli

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"

# (case, overrides, what the line must name)
BAD_VALUES = [
    ("beta above 1", ["optimizer.betas=[1.5,0.999]"], "optimizer.betas"),
    ("beta of exactly 1", ["optimizer.betas=[0.9,1.0]"], "optimizer.betas"),
    ("three betas", ["optimizer.betas=[0.9,0.99,0.999]"], "optimizer.betas"),
    ("negative seed", ["seed=-1"], "seed"),
    ("70-bit seed", [f"seed={2**70}"], "seed"),
    ("negative validation seed", ["validation.seed=-5"], "validation.seed"),
    ("zero bucket size", ["data.buckets.resolutions=[[0,0]]"], "data.buckets.resolutions"),
    ("bucket size not x16", ["data.buckets.resolutions=[[480,721]]"], "data.buckets.resolutions"),
    ("bucket as a scalar", ["data.buckets.resolutions=[480]"], "data.buckets.resolutions"),
    ("aspect with zero height", ["data.buckets.aspect_ratios=['16:0']"], "data.buckets.aspect_ratios"),
    ("negative aspect", ["data.buckets.aspect_ratios=[-1.5]"], "data.buckets.aspect_ratios"),
    ("no target modules", ["lora.target_modules=[]"], "lora.target_modules"),
    ("empty target module name", ["lora.target_modules=['']"], "lora.target_modules"),
    ("infinite learning rate", ["optimizer.lr=.inf"], "optimizer.lr"),
    ("NaN learning rate", ["optimizer.lr=.nan"], "optimizer.lr"),
    ("NaN logit mean", ["loss.logit_mean=.nan"], "loss.logit_mean"),
    ("infinite guidance", ["validation.guidance_scale=.inf"], "validation.guidance_scale"),
    ("absurd frame count", ["data.frames=100000"], "data.frames"),
    ("rank zero", ["lora.rank=0"], "lora.rank"),
    ("rank of a million", ["lora.rank=1000000"], "lora.rank"),
    ("zero steps", ["max_steps=0"], "max_steps"),
    ("more inference steps than timesteps", ["validation.inference_steps=10000"], "validation.inference_steps"),
    ("dropout of 1", ["lora.dropout=1"], "lora.dropout"),
    ("unknown key", ["lora.rnk=4"], "lora.rnk"),
    ("unknown section", ["lorra.rank=4"], "lorra"),
    ("value where a section goes", ["lora=4"], "lora"),
    ("override into a value", ["max_steps.x=1"], "max_steps"),
    ("override without =", ["max_steps"], "key=value"),
    ("override with an empty key", ["=3"], "key is empty"),
    ("override with a dotted empty part", ["lora..rank=3"], "key is empty"),
    ("override of broken YAML", ["lora.rank=["], "lora.rank"),
    ("unknown mixed precision", ["mixed_precision=fp8"], "mixed_precision"),
]


@pytest.mark.parametrize("overrides,name", [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_key(tmp_path, overrides, name):
    out = tmp_path / "run"
    r = cli("train", QUICKSTART, f"output_dir={out}", *overrides, cwd=tmp_path)
    assert_refused(r, name)
    assert not out.exists(), "a refused config must not create the output folder"


def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


BAD_FILES = [
    ("alias bomb", lambda p: p.write_text(_bomb()), "aliases"),
    ("deep nesting", lambda p: p.write_text("a: " + "[" * 50000 + "]" * 50000 + "\n"), "nested"),
    ("not UTF-8", lambda p: p.write_bytes(b"max_steps: 3\n\xff\xfe\n"), "UTF-8"),
    ("binary garbage", lambda p: p.write_bytes(bytes(range(256)) * 16), "config"),
    ("too large", lambda p: p.write_bytes(b"#" * (2 << 20)), "too large"),
    ("broken YAML", lambda p: p.write_text("model: {path: [unclosed\n"), "not valid YAML"),
    ("tab indentation", lambda p: p.write_text("model:\n\tpath: x\n"), "not valid YAML"),
    ("a list at top level", lambda p: p.write_text("- max_steps\n"), "mapping"),
    ("a number as a key", lambda p: p.write_text("1: 2\n"), "not a name"),
    ("empty file", lambda p: p.write_text(""), "model"),
    ("missing data section", lambda p: p.write_text(yaml.safe_dump({"model": {"path": "m"}})), "data"),
    ("a folder", lambda p: p.mkdir(), "is a folder"),
    ("missing", lambda p: None, "does not exist"),
]


@pytest.mark.parametrize("make,name", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_config_file_is_one_line(tmp_path, make, name):
    path = tmp_path / "my_run.yaml"
    make(path)
    r = cli("train", path, cwd=tmp_path)
    line = assert_refused(r, name)
    if name != "does not exist":
        assert "my_run.yaml" in line
    assert len(r.stderr) < 2000  # the alias bomb once became a 312 MB "one line"


def test_huge_value_is_not_echoed(tmp_path):
    r = cli("train", QUICKSTART, f"output_dir={tmp_path / 'run'}", "optimizer.name=" + "x" * 100_000, cwd=tmp_path)
    assert_refused(r, "optimizer.name")
    assert len(r.stderr) < 2000


BAD_OPTIONS = [
    ("unknown command", ["frobnicate"], "invalid choice"),
    ("missing argument", ["tiny"], "dir"),
    ("seed not a number", ["tiny", "{tmp}/m", "--seed", "abc"], "--seed"),
    ("negative seed", ["tiny", "{tmp}/m", "--seed", "-1"], "--seed"),
    ("70-bit seed", ["tiny", "{tmp}/m", "--seed", str(2**70)], "--seed"),
    ("unknown variant", ["tiny", "{tmp}/m", "--variant", "cogvideox-7b"], "--variant"),
    ("zero clips", ["data", "synth", "{tmp}/d", "--clips", "0"], "--clips"),
    ("a million clips", ["data", "synth", "{tmp}/d", "--clips", "1000000"], "--clips"),
    ("zero processes", ["train", str(QUICKSTART), "--nproc", "0"], "--nproc"),
    ("zero world size", ["plan", str(QUICKSTART), "--world-size", "0"], "--world-size"),
    ("zero GPU memory", ["plan", str(QUICKSTART), "--gpu-memory", "0GB"], "--gpu-memory"),
    ("NaN GPU memory", ["plan", str(QUICKSTART), "--gpu-memory", "nan"], "--gpu-memory"),
    ("unknown option", ["train", str(QUICKSTART), "--lr", "1"], "--lr"),
]


@pytest.mark.parametrize("argv,name", [c[1:] for c in BAD_OPTIONS], ids=[c[0] for c in BAD_OPTIONS])
def test_bad_option_is_one_line_naming_it(tmp_path, argv, name):
    r = cli(*[a.format(tmp=tmp_path) for a in argv], cwd=tmp_path)
    assert_refused(r, name)
    assert not any(tmp_path.iterdir()), "a refused command line must not write anything"
