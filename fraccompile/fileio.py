"""Files that survive kills, concurrent writers and damage: the one place fraccompile writes them.

* :func:`atomic_path` / :func:`atomic_write`: write ``<name>.<random>.tmp[<suffix>]`` next to the
  target, fsync it, give it the usual permissions (``0o666`` less the umask) and rename it over the
  target, so a reader sees the old file or the whole new one, never a part. While it is written the
  temporary file is ``flock``-ed; an exception removes it.
* :func:`locked`: an exclusive ``flock`` on ``<path>.lock`` (one writer of ``path`` at a time,
  across processes).
* :func:`remove_stale_temps`: removes the temporary files (and build directories) that killed
  writers left behind: those not locked by a live writer, whose target's lock is free.
* :func:`write_checksum` / :func:`checksum_problem`: size and sha256 of a file, recorded next to it
  (``<path>.sha256``) and checked before it is used.
* :func:`elf_problem`: whether a shared library is a whole ELF file (a truncated one is mapped by
  ``dlopen`` and then kills the process with SIGBUS, past any ``except``).
* :func:`read_jsonl`: the records of a JSON-lines file, tolerating a torn last line (a kill
  mid-append).
* :func:`dir_problem`: whether a directory can be created and written (checked before long work).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP = re.compile(r"^(?P<target>.+)\.[A-Za-z0-9_]{6,}\.tmp(\.[A-Za-z0-9]+)?$")
CHECKSUM_SUFFIX = ".sha256"
NO_CHECKSUM = "no checksum recorded"


# -- atomic writes and locks -----------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (``os.umask`` sets it, for a
    moment in which another thread would create files with another mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "", fsync: bool = True) -> Iterator[Path]:
    """A temporary path next to ``path`` to write (by name, or by opening it); on a clean exit it
    replaces ``path`` (see the module docstring), on an exception it is removed and ``path`` is
    left as it was. ``suffix`` ends the temporary name (tools that pick a format by extension)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp" + suffix, dir=path.parent)
    tmp = Path(name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # marks it as being written (remove_stale_temps)
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = True) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def cached_bytes(path: str | os.PathLike, build) -> bytes:
    """The non-empty bytes at ``path`` (a disk cache entry), else ``build()``'s, stored there
    atomically when the directory is writable (a read-only cache only returns them: the next
    process builds again)."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if data:
            return data
    except OSError:
        pass
    data = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError:
        pass
    return data


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (created if missing) for the ``with`` block."""
    with open(str(path) + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _try_lock(path: Path):
    """An open file holding a non-blocking exclusive lock on ``path``, or None when someone else
    holds it (or it cannot be opened)."""
    try:
        f = open(path, "rb")
    except OSError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def remove_stale_temps(directory: str | os.PathLike, name: str = "*", min_age: float = 10.0) -> list[Path]:
    """Remove the temporary files and directories (``<target>.<random>.tmp[<suffix>]``) of targets
    matching the glob ``name`` in ``directory`` whose writer is gone: older than ``min_age``
    seconds, not locked by a writer, and ``<target>.lock`` (when there is one) free. Returns what
    was removed."""
    removed = []
    directory = Path(directory)
    try:
        candidates = sorted(directory.glob(f"{name}.*.tmp*"))
    except OSError:
        return removed
    now = time.time()
    for tmp in candidates:
        match = TEMP.match(tmp.name)
        try:
            if match is None or tmp.is_symlink() or now - tmp.lstat().st_mtime < min_age:
                continue
        except OSError:
            continue
        target_lock = directory / (match["target"] + ".lock")
        guard = None
        if target_lock.exists():
            guard = _try_lock(target_lock)
            if guard is None:
                continue  # the target is being built right now
        try:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
                continue
            own = _try_lock(tmp)
            if own is None:
                continue  # its writer is still at work
            with own:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
        finally:
            if guard is not None:
                guard.close()
    return removed


# -- checking files before they are used -----------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + CHECKSUM_SUFFIX)


def write_checksum(path: str | os.PathLike) -> None:
    """Record the size and sha256 of ``path`` in ``<path>.sha256``."""
    atomic_write(checksum_path(path), f"{os.path.getsize(path)} {sha256_file(path)}\n")


def checksum_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` has the size and sha256 recorded next to it, else what is wrong (no
    record, another size: truncated or grown, another hash: modified)."""
    try:
        size, digest = checksum_path(path).read_text().split()
        size = int(size)
    except FileNotFoundError:
        return NO_CHECKSUM
    except (OSError, ValueError):
        return "its checksum record is damaged"
    try:
        actual = os.path.getsize(path)
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    if actual != size:
        how = "truncated" if actual < size else "grown"
        return f"{actual} bytes where {size} were written ({how})"
    if sha256_file(path) != digest:
        return "its sha256 differs from the one recorded when it was written (modified)"
    return None


def elf_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` is an ELF file whose headers and loaded segments lie inside the file,
    else what is wrong (a check made before ``dlopen``, which maps a truncated library and then
    dies of SIGBUS reading past its end)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
                return "not an ELF shared library"
            end = "<" if head[5] == 1 else ">"
            if head[4] == 2:  # 64-bit
                if len(head) < 64:
                    return "truncated inside the ELF header"
                phoff, shoff = struct.unpack_from(end + "QQ", head, 32)
                phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 54)
                ph_fmt, off_at = end + "IIQQQQQQ", (2, 5)  # p_offset, p_filesz
            else:
                phoff, shoff = struct.unpack_from(end + "II", head, 28)
                phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 42)
                ph_fmt, off_at = end + "IIIIIIII", (1, 4)
            for what, start, length in (
                ("program headers", phoff, phentsize * phnum),
                ("section headers", shoff, shentsize * shnum),
            ):
                if start + length > size:
                    return f"truncated: its {what} end at byte {start + length}, the file has {size}"
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    need = struct.calcsize(ph_fmt)
    for i in range(phnum if phentsize >= need else 0):
        fields = struct.unpack_from(ph_fmt, table, i * phentsize)
        offset, filesz = fields[off_at[0]], fields[off_at[1]]
        if fields[0] == 1 and offset + filesz > size:  # PT_LOAD
            return f"truncated: a loaded segment ends at byte {offset + filesz}, the file has {size}"
    return None


def dir_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a directory that can be written, or can be created as one; else why
    not (checked with a probe file, so read-only file systems and permissions both count)."""
    path = Path(path)
    probe = path
    try:
        while not probe.exists():
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir():
            return "exists and is not a directory" if probe == path else f"{probe} is not a directory"
        fd, name = tempfile.mkstemp(prefix=".fraccompile-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        why = "read-only file system" if e.errno == errno.EROFS else e.strerror or type(e).__name__
        return f"cannot write in {probe} ({why})"
    return None


# -- JSON lines ------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """``(line number, record)`` for each non-empty line of a JSON-lines file. A last line that
    does not parse and has no newline is a write cut short (a kill mid-append, or one still in
    progress) and is left out; any other line that does not parse raises ``ValueError`` naming
    the file and line."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as err:
            if n == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
    return out


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value
