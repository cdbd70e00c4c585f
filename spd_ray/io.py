"""File helpers that every writer of results shares: safe names, durable atomic replacement,
append-only JSON-lines files that survive a torn last line, whole folders swapped in when complete,
and advisory locks. A leaf: imports nothing from spd_ray.

The promises: a file that is replaced is either the old one or the whole new one, also after a
power loss (temp file, fsync, rename, fsync of the folder); an append-only file loses at most its
last, partial line, which readers skip and the next writer cuts; a folder that is built (an asset, a
harvest) appears complete or not at all; two commands never write the same thing at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from spd_ray.errors import InputError, UserError

_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_name(name: str, what: str) -> str:
    """`name` as one path segment (letters, digits, `.`, `_`, `-`; not `.` or `..`), else a
    ValueError naming `what` (e.g. "--name")."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise InputError(
            f"{what} {name!r} is not a valid name: use one path segment of letters, digits, "
            "'.', '_' and '-' (not '.' or '..')"
        )
    return name


def safe_name(text: str) -> str:
    """`text` made a valid name (a config path's stem may hold spaces and the like): every
    character a name may not hold becomes `_`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".") or "_"


def child(root: Path, name: str, what: str) -> Path:
    """`root / name` for a checked name, which resolves to a path inside `root`."""
    check_name(name, what)
    path = root / name
    if path.resolve().parent != root.resolve():
        raise InputError(f"{what} {name!r} leaves {root} (a link?)")
    return path


# ---------------------------------------------------------------------------------------------
# Durable writes
# ---------------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's data to disk (a folder: the names in it). Filesystems that
    cannot sync a folder are let be."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file in the same folder, fsync it, rename it over `path` and
    fsync the folder: readers see the old file or the whole new one - also after a crash or power
    loss - and concurrent writers cannot interleave. The old file is never deleted first."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Replace `path` atomically and durably with `text`."""
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent) + "\n")


def copy_file(src: Path, dest: Path) -> None:
    """Copy atomically: `dest` is complete or absent, never a torn copy."""
    atomic_write(dest, lambda p: shutil.copyfile(src, p))


# ---------------------------------------------------------------------------------------------
# Append-only JSON lines
# ---------------------------------------------------------------------------------------------


def _split_tail(data: bytes) -> tuple[bytes, bytes]:
    """(complete lines, the bytes after the last newline)."""
    cut = data.rfind(b"\n") + 1
    return data[:cut], data[cut:]


def _parses(blob: bytes) -> bool:
    try:
        json.loads(blob)
    except ValueError:
        return False
    return True


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSON-lines file. A last line cut short (a kill or a full disk mid-append) is
    skipped; a bad line anywhere else is an error naming the file and line."""
    if not path.exists():
        return []
    body, tail = _split_tail(path.read_bytes())
    rows = []
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise InputError(f"{path}:{n} is not valid JSON") from None
    if tail.strip() and _parses(tail):
        rows.append(json.loads(tail))
    return rows


def repair_tail(path: Path) -> bool:
    """Make the file end at a line end: a complete last row gets its newline, a torn one is cut.
    Returns True when it changed the file."""
    if not path.exists():
        return False
    size = path.stat().st_size
    if size == 0:
        return False
    with path.open("rb+") as f:
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        body, tail = _split_tail(f.read())
        if tail.strip() and _parses(tail):
            f.seek(size)
            f.write(b"\n")
        else:
            f.truncate(len(body))
        f.flush()
        os.fsync(f.fileno())
    return True


def append_jsonl(path: Path, row: dict[str, Any], sync: bool = False) -> None:
    """Append one row (one write call); `sync` fsyncs it (appends from a loop sync at checkpoints
    with `fsync_path` instead)."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        if sync:
            f.flush()
            os.fsync(f.fileno())


def rewrite_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# Folders built whole
# ---------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_dir(new: Path, final: Path) -> None:
    """Put the complete folder `new` in place of `final`: swapped atomically where the system can
    (readers see the old or the new folder), else the old one is renamed aside first; the old
    folder is deleted only after the new one is in place."""
    fsync_path(new)
    if not final.exists():
        new.rename(final)
    elif _exchange(new, final):
        shutil.rmtree(new)  # now the old folder
    else:
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(final.parent)


@contextlib.contextmanager
def building_dir(final: Path) -> Iterator[Path]:
    """A temporary folder beside `final` to build into; put in place of `final` when the block
    ends without an error, removed otherwise (so a half-built folder is never accepted)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------------


class LockedError(UserError, RuntimeError):
    """Another live command holds the lock."""


class Lock:
    """An advisory lock (`fcntl.flock`) on a file, which records its holder (pid, host, command).
    A second command fails at once naming the holder; the kernel drops the lock when its holder
    dies, so the next command takes it over."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "another process"
        return f"pid {info.get('pid')} on host {info.get('host')} ({info.get('command', '?')})"

    def acquire(self) -> Lock:
        assert self.fd is None, f"{self.path} is already locked by this object"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(
                f"{self.what} is in use by {self.holder()}; wait for it to end or stop it "
                f"(lock {self.path})"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
