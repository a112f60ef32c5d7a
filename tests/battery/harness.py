"""The battery's harness: run the real `cogtune` in a subprocess, then check the promises a refusal keeps.

A refusal is: a non-zero exit code, exactly one `cogtune: error: ...` line on stderr that names the file or key at
fault, no traceback, no "internal error", and no earlier output changed or half-written file left behind.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
TEMP_MARKERS = (".tmp", ".partial", ".tmp-")


def cli(*args, cwd=None, env=None, timeout=600, fsize: int | None = None, prefix=()) -> subprocess.CompletedProcess:
    """`cogtune ARGS` as a user runs it; `fsize` caps the size of any file it writes (RLIMIT_FSIZE: EFBIG)."""
    def limits():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    cmd = [*prefix, sys.executable, "-m", "cogtune", *map(os.fsdecode, args)]
    return subprocess.run(cmd, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, timeout=timeout,
                          preexec_fn=limits if fsize is not None else None, errors="backslashreplace", text=True)


def start(*args, cwd=None, env=None) -> subprocess.Popen:
    """`cogtune ARGS` in the background (for signals at a chosen phase); stdout and stderr are merged per stream."""
    cmd = [sys.executable, "-m", "cogtune", *map(os.fsdecode, args)]
    return subprocess.Popen(cmd, cwd=cwd, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="backslashreplace", start_new_session=True)


def wait_for(predicate, timeout: float = 300, proc: subprocess.Popen | None = None, every: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before the awaited phase:\n"
                                 f"{proc.stdout.read()[-3000:]}\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError("the awaited phase never came")
        time.sleep(every)


def error_line(r) -> str:
    """The single `cogtune: error:` line of a finished command (fails if there is not exactly one)."""
    out = f"{r.stdout}\n{r.stderr}"
    assert "Traceback" not in out, f"traceback instead of one line:\n{out[-4000:]}"
    assert "internal error" not in out, f"an unexpected exception, not a refusal:\n{out[-4000:]}"
    lines = [l for l in r.stderr.splitlines() if l.startswith("cogtune: error:")]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{r.stderr[-4000:]}"
    assert len(lines[0]) < 2200, f"error line of {len(lines[0])} characters"
    return lines[0]


def assert_refused(r, *names: str, code: int = 2) -> str:
    """`r` exited with `code` and one error line that contains every one of `names` (case-insensitive)."""
    assert r.returncode == code, f"exit {r.returncode}, expected {code}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    line = error_line(r)
    for name in names:
        assert name.lower() in line.lower(), f"{name!r} not named in: {line}"
    return line


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (what 'earlier outputs intact' compares)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_intact(before: dict[str, str], root: Path) -> None:
    after = snapshot(root)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"earlier outputs changed or lost: {changed[:10]}"


def assert_no_temp(root: Path) -> None:
    """Nothing half-written: no temp file or folder of a write that did not finish."""
    left = [str(p) for p in Path(root).rglob("*") if any(m in p.name for m in TEMP_MARKERS)]
    assert not left, f"half-written files left behind: {left[:10]}"


def can_unshare() -> bool:
    """Whether this machine lets us mount a small or read-only filesystem in a private namespace (unshare -rm)."""
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"; '
                        'rc=$?; umount "$d" 2>/dev/null; rmdir "$d"; exit $rc'], capture_output=True)
    return r.returncode == 0


needs_unshare = pytest.mark.skipif(not can_unshare(), reason="no user+mount namespaces here (unshare -rm)")


def in_small_fs(mountpoint: Path, size: str) -> tuple[str, ...]:
    """A command prefix that runs the command with a `size` tmpfs mounted on `mountpoint` (a real ENOSPC)."""
    return ("unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "{mountpoint}" && exec "$@"', "sh")


def in_readonly(path: Path) -> tuple[str, ...]:
    """A command prefix that runs the command with `path` bind-mounted read-only onto itself (a real EROFS)."""
    return ("unshare", "-rm", "sh", "-c",
            f'mount --bind "{path}" "{path}" && mount -o remount,bind,ro "{path}" && exec "$@"', "sh")


def sigterm(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err
