"""A bad config is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from cogtune.cli import main


def _write(tmp_path, tree):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def good(tiny_model, synth_data, tmp_path):
    return {
        "model": {"path": str(tiny_model("cogvideox-5b"))},
        "data": {"root": str(synth_data), "frames": 9, "height": 32, "width": 48},
        "output_dir": str(tmp_path / "run"),
        "max_steps": 1,
    }


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda t: t["lora"].update(rnk=4) if "lora" in t else t.update(lora={"rnk": 4}), "lora.rnk"),
        (lambda t: t.update(max_steps="many"), "max_steps"),
        (lambda t: t["data"].update(frames=10), "data.frames=10"),
        (lambda t: t["model"].update(path="/no/such/model"), "/no/such/model"),
        (lambda t: t.update(mixed_precision="fp64"), "mixed_precision"),
        (lambda t: t["data"].update(height=33), "data.height"),
    ],
)
@pytest.mark.parametrize("command", [["train"], ["data", "cache"]])
def test_bad_config_is_one_line(good, tmp_path, capsys, mutate, needle, command):
    mutate(good)
    code, err = _run(capsys, [*command, str(_write(tmp_path, good))])
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert needle in err and "Traceback" not in err


def test_bad_override_is_one_line(good, tmp_path, capsys):
    code, err = _run(capsys, ["train", str(_write(tmp_path, good)), "lora.rank=-3"])
    assert code != 0 and len(err.splitlines()) == 1 and "lora.rank" in err


def test_missing_config_file(tmp_path, capsys):
    code, err = _run(capsys, ["train", str(tmp_path / "nope.yaml")])
    assert code != 0 and len(err.splitlines()) == 1 and "nope.yaml" in err


def test_console_script_exit_code(tmp_path):
    """The installed entry point behaves like main(): exit 2, one line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "cogtune", "train", str(tmp_path / "missing.yaml")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing.yaml" in proc.stderr


def test_unquoted_no_means_no_mixed_precision(tmp_path):
    from cogtune.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model: {path: m}\ndata: {root: d}\nmixed_precision: no\n")
    assert load_config(path).mixed_precision == "no"
    assert load_config(path, ["mixed_precision=no"]).mixed_precision == "no"
