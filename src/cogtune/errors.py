"""The one error type users see, and the helpers that keep its text to one bounded line."""

from __future__ import annotations

import errno
import os

MAX_VALUE = 120  # characters of a user's value echoed back in a message
MAX_MESSAGE = 2000  # characters of one error message on stderr


class CogtuneError(Exception):
    """An error the user can fix. The CLI prints its message as one line and exits non-zero."""


def bounded(value: object, limit: int = MAX_VALUE) -> str:
    """`repr`-like text of a user's value, cut to `limit` characters (a 10 MB caption is not echoed)."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # file names that are not UTF-8
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text


def display_path(path: os.PathLike | str) -> str:
    """A path printable on any terminal: bytes that are not UTF-8 are shown as \\xNN escapes."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose another folder",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose another folder",
    errno.EFBIG: "the file is larger than this system allows (ulimit -f or the filesystem's limit): "
                 "raise the limit or choose another folder",
    errno.EROFS: "the filesystem is read-only: choose a writable folder",
    errno.EACCES: "permission denied: check the file's permissions or choose another folder",
    errno.EPERM: "operation not permitted: check the file's permissions or choose another folder",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "this is a folder where a file was expected: check the path",
    errno.EEXIST: "it already exists: remove it or choose another name",
    errno.ENAMETOOLONG: "the name is too long for this filesystem: choose a shorter one",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.EIO: "an input/output error from the device: check the disk",
}


def os_error_text(e: OSError, doing: str | None = None) -> str:
    """One line for an OSError: what failed, on which file, and what to do about it."""
    where = " and ".join(display_path(f) for f in (e.filename, e.filename2) if f is not None)
    hint = _OS_HINTS.get(e.errno) or bounded(e.strerror or str(e) or type(e).__name__, 300)
    head = f"{doing} failed" if doing else "a file operation failed"
    return f"{head}: {where + ': ' if where else ''}{hint}"


def one_line(message: str) -> str:
    """An error message as the CLI prints it: no control characters, at most MAX_MESSAGE characters."""
    text = display_path(message) if isinstance(message, (bytes, bytearray)) else str(message)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = " ".join(part.strip() for part in text.splitlines() if part.strip()) or "unknown error"
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]}... ({len(text)} characters)"
    return text
