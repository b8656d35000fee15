# Copied from image/LLaVA/llava/vtr/outputs.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""Output files that are never half written and never written by two runs at once.

    with output_lock(path / "run.lock", "vtr_run"):   # refused (OutputLocked) while another run holds it
        write_atomic(path / "summary.md", text)        # replaces the file whole or not at all
        write_new(path / "bench.json", text)           # creates it whole, never replaces one (OutputExists)

Every failure is an `OutputError` whose message names the file; no raw OSError escapes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path


class OutputError(Exception):
    """An output file or lock file that cannot be used; the message names it, `reason` says why (the OS's
    words, for a caller that names the file its own way)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class OutputLocked(OutputError):
    """The lock belongs to another run. `holder`: who, in words (pid, host, start, command); `info`: the lock
    file's record; `held`: True when a live process holds the kernel lock, False when only the record refuses
    (a process of another host, whose lock may not show here, or a running pid on a filesystem without locks):
    the message then says to delete the lock file if that run is gone."""

    def __init__(self, message: str, lock: Path, holder: str, info: dict, held: bool = True):
        super().__init__(message)
        self.lock, self.holder, self.info, self.held = lock, holder, info, held


class OutputExists(OutputError):
    """`write_new` found the file already there."""


def _holder(fd: int) -> tuple[dict, str]:
    """A lock file's record and who it names, in words ({} and its raw text when it is not a record)."""
    text = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
    try:
        info = json.loads(text)
        return info, f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return {}, text


def _alive(pid) -> bool:
    """Whether process `pid` of this host is running (a zombie, dead but not yet reaped, is not)."""
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # exists, owned by someone else
        pass
    except (OSError, ValueError, TypeError, OverflowError):
        return False
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def output_lock(path: str | Path, what: str = "run", command: str | None = None):
    """Hold the lock file `path` while the block runs; `what` names the kind of holder in messages ("run",
    "vtr_run"). An fcntl lock, so the kernel drops it when its holder dies, however it dies; the file holds the
    holder's record (pid, host, command: `command` or this process's argv, start time) and is removed on
    release. Raises OutputLocked naming the holder while a live process holds it, or while the file names a
    process on another host; a file left by a process of this host that is gone is taken over with a note on
    stderr. Yields the record written."""
    import fcntl

    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(f"cannot create the lock file {path}: {error}", str(error)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            info, holder = _holder(fd)
            os.close(fd)
            if isinstance(error, BlockingIOError):
                holder = holder or "it is just starting"
                raise OutputLocked(f"{path} is held by another {what} ({holder})", path, holder, info) from None
            raise OutputError(f"cannot lock {path}: {error}", str(error)) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:  # not removed by its last holder meanwhile
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        info, left = _holder(fd)
        if info.get("host", socket.gethostname()) != socket.gethostname():
            message = f"{path} is held by a {what} on another host ({left}); if it is gone, delete {path}"
            raise OutputLocked(message, path, left, info, held=False)
        if info and info.get("pid") != os.getpid() and _alive(info.get("pid")):  # a filesystem without flock
            message = f"{path} names a {what} that is still running ({left}); if it is not that {what}, delete {path}"
            raise OutputLocked(message, path, left, info, held=False)
        if left:
            print(f"note: took over {path}, left by a {what} that is no longer running ({left})", file=sys.stderr)
        mine = dict(
            pid=os.getpid(),
            host=socket.gethostname(),
            command=command or shlex.join(sys.argv),
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        except OSError as error:
            raise OutputError(f"cannot write the lock file {path}: {error}", str(error)) from None
        try:
            yield mine
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: str | bytes) -> Path:
    """`data` (str: UTF-8) in this process's temporary file beside `path`, flushed to disk. The caller removes
    the temporary file (`_temp(path)`) whatever happens."""
    tmp = _temp(path)
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` with `data` whole or not at all (a temporary file beside it, renamed over it): an
    interruption leaves the old file. OutputError naming `path` when it cannot be written."""
    path = Path(path)
    tmp = _temp(path)
    try:
        tmp = _write_temp(path, data)
        os.replace(tmp, path)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error}", str(error)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def write_new(path: str | Path, data: str | bytes) -> Path:
    """Create `path` holding `data`, whole or not at all, never replacing a file: OutputExists when it is
    there (also when another process created it meanwhile), OutputError when it cannot be written."""
    path = Path(path)
    tmp = _temp(path)
    try:
        tmp = _write_temp(path, data)
        try:
            os.link(tmp, path)  # fails if `path` exists: the check and the creation are one step
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: claim the name, then move the whole file onto it
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.replace(tmp, path)
    except FileExistsError:
        raise OutputExists(f"{path} exists; a finished result is never replaced") from None
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error}", str(error)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path
