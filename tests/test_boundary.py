"""Guard rails that only tighten: model knowledge lives in models/, and the layers import downwards only.

ALLOWED counts, per file outside models/, the model-specific names that are still there (class and module names of a
family, variant names, text-encoder names, CogVideoX's 226-token text length). A file may never go above its count,
a file not listed may have none, and a count that drops must be lowered here in the same change: the list only
shrinks. What is left is mostly prose (what the official CogVideoX trainer does), CogVideoX-only formats (SAT, ZeRO
checkpoints of its trainer, ComfyUI's CogVideoX names) and the planner's CogVideoX memory profile.
"""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cogtune"
MODEL_NAMES = re.compile(r"CogVideoX|cogvideox|transformer_blocks|\bWan[A-Z]\w*|\bwan2|\bUMT5|\bT5\b|\b226\b")
ALLOWED = {
    "__init__.py": 1,
    "cli/tiny.py": 1,
    "config.py": 5,
    "data/frames.py": 1,
    "data/sources.py": 2,
    "data/synth.py": 1,
    "export/lora_formats.py": 14,
    "export/sat.py": 33,
    "export/shards.py": 1,
    "export/zero.py": 1,
    "objectives.py": 2,
    "plan/__init__.py": 2,
    "plan/memory.py": 18,
    "plan/presets.py": 1,
    "plan/report.py": 1,
    "train/encode.py": 1,
    "train/memory.py": 1,
}


def _counts() -> dict[str, int]:
    counts = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("models/"):
            continue
        n = len(MODEL_NAMES.findall(path.read_text(encoding="utf-8")))
        if n:
            counts[rel] = n
    return counts


def test_model_names_stay_in_models():
    counts = _counts()
    grew = {f: (n, ALLOWED.get(f, 0)) for f, n in counts.items() if n > ALLOWED.get(f, 0)}
    assert not grew, f"model-specific names outside models/ (file: (now, allowed)): {grew}; put them in a family"
    shrank = {f: counts.get(f, 0) for f, n in ALLOWED.items() if counts.get(f, 0) < n}
    assert not shrank, f"fewer model-specific names than allowed: lower ALLOWED to {shrank}"


def test_no_module_outside_models_imports_a_family():
    """Only the registry (models/__init__.py) names family modules; everyone else asks it."""
    family = re.compile(r"from \.+models\.(cogvideox|variants|wan|tiny)\b|import cogtune\.models\.(cogvideox|wan)")
    hits = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
            if not p.relative_to(SRC).as_posix().startswith("models/") and family.search(p.read_text(encoding="utf-8"))]
    assert hits == ALLOWED_FAMILY_IMPORTS, f"imports of a family module outside models/: {hits}"


ALLOWED_FAMILY_IMPORTS: list = []  # may only shrink (it is empty)


# package -> the packages it may not import (the layers: data, models < export < infer < train; plan < train; the
# commands in cli/ on top of everything)
FORBIDDEN = {
    "data": {"models", "export", "train", "infer", "plan", "cli"},
    "models": {"data", "export", "train", "infer", "plan", "cli"},
    "export": {"train", "infer", "plan", "cli"},
    "infer": {"train", "plan", "cli"},
    "plan": {"data", "export", "train", "infer", "cli"},
    "train": {"cli"},
}
RELATIVE = re.compile(r"^\s*from (\.+)(\w+)?(?:\.(\w+))?", re.M)


def test_imports_go_downwards_only():
    upward = []
    for pkg, banned in FORBIDDEN.items():
        for path in (SRC / pkg).rglob("*.py"):
            for dots, mod, _ in RELATIVE.findall(path.read_text(encoding="utf-8")):
                if len(dots) == 2 and mod in banned:
                    upward.append(f"{pkg}/{path.name} imports {mod}")
    assert not upward, upward


def test_generate_knows_nothing_of_compare_or_the_commands():
    """compare and the CLI build on generate, never the other way round (no import circle)."""
    text = (SRC / "infer" / "generate.py").read_text(encoding="utf-8")
    assert not re.search(r"from \.(compare|cli|webui)\b", text)


def test_the_command_list_and_train_parse_without_torch():
    """`cogtune --help` and a refused config answer at once: cli/ modules import only the stdlib at their top, and
    a command's own imports wait until it is chosen (train's until it runs)."""
    import subprocess
    import sys

    code = ("import sys, cogtune.cli as c; c.build_parser(''); c.build_parser('train'); c.build_parser('plan'); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
