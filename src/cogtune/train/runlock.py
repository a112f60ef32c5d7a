"""What keeps a run's work safe: the live-run lock of its output folder, and the stop flag for SIGTERM/SIGINT.

`{output_dir}/.cogtune.lock` (JSON: pid, host, start time) marks a folder live while a run uses it; another run on
the same folder refuses before it deletes or writes anything. A lock whose process is gone (same host) is stale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

from ..errors import CogtuneError

log = logging.getLogger("cogtune")
LOCK = ".cogtune.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_not_live(out: Path) -> Path | None:
    """Refuses if another live run holds `out`; returns the path of a stale lock (to take over), else None."""
    path = Path(out) / LOCK
    try:
        owner = json.loads(path.read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise CogtuneError(f"output_dir {out} has an unreadable lock {path}: if no run uses this folder, "
                           f"delete {path}") from None
    if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
        return path
    raise CogtuneError(f"output_dir {out} is in use by a live run (pid {pid} on {host}, lock {path}); wait for it "
                       f"or choose another output_dir (if that run is gone, delete {path})")


class RunLock:
    """Held by rank 0 from just before the run changes its folder until it ends (also on error)."""

    def __init__(self, out: Path):
        self.path, self.held = Path(out) / LOCK, False

    def acquire(self) -> None:
        stale = check_not_live(self.path.parent)
        if stale is not None:
            log.warning("taking over the stale lock %s (its run is gone)", stale)
            stale.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another run took it a moment ago
            check_not_live(self.path.parent)
            raise
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
        self.held = True

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(OSError, ValueError, KeyError):
                if json.loads(self.path.read_text())["pid"] == os.getpid():  # never another run's lock
                    self.path.unlink()
            self.held = False


class Stopped(BaseException):
    """Raised by the stop flag's handler in a phase that is abandoned at once (caching, loading, validation)."""


class StopFlag:
    """SIGTERM/SIGINT: at once (`Stopped`) inside `abandonable()` phases, else at the next step boundary (the
    training step, checkpoint and final save finish first). A second signal is final (KeyboardInterrupt)."""

    def __init__(self):
        self.requested, self.abandon, self._previous = False, False, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.requested = True
        if self.abandon:
            log.warning("signal %d: stopping now", signum)
            raise Stopped
        log.warning("signal %d: saving at the end of this step, then stopping", signum)

    def at_once(self, on: bool) -> None:
        self.abandon = on
        if on and self.requested:
            raise Stopped

    @contextlib.contextmanager
    def abandonable(self, enabled: bool = True):
        """Inside, a signal stops the work at once; a signal that came before stops it before it starts."""
        if self.requested and enabled:
            raise Stopped
        previous, self.abandon = self.abandon, enabled
        try:
            yield
        finally:
            self.abandon = previous

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
