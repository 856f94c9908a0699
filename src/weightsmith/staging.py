"""The one staging writer: every output, file or directory, is built under a hidden name and swapped in whole.

Rules every command gets from here (and from nowhere else):

- An existing output is refused unless ``force``; with ``force`` the old output stays untouched until the
  new one is complete, then the two are swapped (a directory by two renames, a file by one).
- A special file (``/dev/null``, a FIFO, a terminal) given as a file output is written through, never
  unlinked or renamed over. A symlink stays a symlink: its target is what gets replaced.
- Staging names are ``.NAME.ws-staging-PID-N`` beside the output. On an error, Ctrl-C or SIGTERM the
  staging is removed; a later run removes staging left by a killed (SIGKILL) one, and restores an old
  output that a killed swap had moved aside.
- A second run writing the same output while the first is alive is refused; an output that appears or
  changes while a run works is never silently replaced.
- Disk full, read-only directories and permission errors become a ``WeightsmithError`` naming the path.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import signal
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType

from .errors import WeightsmithError

STAGING = ".ws-staging-"
OLD = ".ws-old-"
_counter = itertools.count()
_active: set[Staging] = set()
_lock = threading.Lock()
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


def final_path(out: str | os.PathLike[str]) -> Path:
    """Where an output really goes: a symlink's target (so the link survives), else the path itself."""
    p = Path(out).expanduser()
    return Path(os.path.realpath(p)) if p.is_symlink() else p.absolute()


def is_special(p: Path) -> bool:
    """A device, FIFO or socket: written through as a stream, never replaced."""
    try:
        mode = p.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            p.unlink()


def _siblings(final: Path, marker: str) -> Iterator[tuple[Path, int]]:
    pattern = re.compile(re.escape(f".{final.name}{marker}") + r"(\d+)(?:-\d+)?$")
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m:
            yield entry, int(m.group(1))


def clean_stale(final: Path) -> None:
    """Remove staging left by dead runs for ``final``; put back an old output a killed swap moved aside."""
    for path, pid in _siblings(final, OLD):
        if not _pid_alive(pid):
            if not final.exists() and not final.is_symlink():
                os.replace(path, final)
            else:
                _remove(path)
    for path, pid in _siblings(final, STAGING):
        if not _pid_alive(pid):
            _remove(path)


def live_writer(final: Path) -> int | None:
    """The pid of another live process staging ``final``, if any."""
    for _path, pid in _siblings(final, STAGING):
        if pid != os.getpid() and _pid_alive(pid):
            return pid
    return None


def user_error(exc: OSError, path: Path | str, doing: str = "writing") -> WeightsmithError:
    """A fixable OSError (full disk, read-only, no permission) as a message naming the path."""
    reason = exc.strerror or str(exc)
    hint = {
        errno.ENOSPC: "; free some space or choose another output",
        errno.EDQUOT: "; free some space or choose another output",
        errno.EROFS: "; the file system is read-only, choose another output",
        errno.EACCES: "; no permission, choose another output",
        errno.EPERM: "; no permission, choose another output",
    }.get(exc.errno or 0, "")
    return WeightsmithError(f"{doing} {path} failed: {reason}{hint}; nothing was written")


def check_output(out: str | os.PathLike[str], force: bool = False, directory: bool = False) -> Path:
    """Validate an output path up front (before any long work); returns the path that will be replaced."""
    final = final_path(out)
    if directory and is_special(final):
        raise WeightsmithError(f"output {out} is a special file; a directory output needs a directory path")
    if not directory and is_special(final):
        return final
    if final.exists() and not force:
        raise WeightsmithError(f"output {out} already exists; pass --force to replace it")
    if final.exists() and directory != final.is_dir():
        what = "a directory" if final.is_dir() else "a file"
        raise WeightsmithError(
            f"output {out} is {what}; refusing to replace it with a {'directory' if directory else 'file'}"
        )
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise user_error(exc, parent, "creating the directory") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WeightsmithError(f"cannot write output {out}: directory {parent} is not writable")
    clean_stale(final)
    pid = live_writer(final)
    if pid is not None:
        raise WeightsmithError(
            f"another weightsmith run (pid {pid}) is writing {out}; wait for it or choose another output"
        )
    return final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_permissions(root: Path) -> None:
    """Files written 0600 by libraries that stage privately (``safetensors.torch.save_file``) get the mode a
    plain ``open()`` gives (0644 under the usual umask), like every other output."""
    mode = 0o666 & ~_umask()
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for f in files:
        if f.stat().st_mode & 0o777 == 0o600 and mode != 0o600:
            f.chmod(mode)


def _snapshot(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns)


class Staging:
    """One output under construction: write at ``path``; ``commit()`` swaps it in, ``abort()`` removes it.

    Use :func:`staged_file` / :func:`staged_dir` in ``with`` blocks; hold a ``Staging`` directly only when
    the writing outlives one block (a streaming writer).
    """

    def __init__(self, out: str | os.PathLike[str], force: bool = False, directory: bool = False) -> None:
        self.requested = Path(out)
        self.final = check_output(out, force, directory)
        self.directory = directory
        self.passthrough = not directory and is_special(self.final)
        self._before = _snapshot(self.final)
        self.done = False
        if self.passthrough:
            self.path = self.final
            return
        self.path = self.final.with_name(f".{self.final.name}{STAGING}{os.getpid()}-{next(_counter)}")
        _remove(self.path)
        try:
            if directory:
                self.path.mkdir()
        except OSError as exc:
            raise user_error(exc, self.requested) from exc
        with _lock:
            _active.add(self)

    def commit(self) -> Path:
        """Swap the finished staging in; refuse if someone else changed the output meanwhile."""
        if self.done:
            return self.final
        if self.passthrough:
            self.done = True
            return self.final
        if _snapshot(self.final) != self._before:
            self.abort()
            raise WeightsmithError(
                f"output {self.requested} was created or changed by someone else while this run worked; "
                "it was left as it is and this run's result was discarded"
            )
        try:
            _normal_permissions(self.path)
            if self.directory and self.final.exists():
                old = self.final.with_name(f".{self.final.name}{OLD}{os.getpid()}")
                _remove(old)
                os.replace(self.final, old)
                os.replace(self.path, self.final)
                _remove(old)
            else:
                os.replace(self.path, self.final)
        except OSError as exc:
            self.abort()
            raise user_error(exc, self.requested) from exc
        self.done = True
        with _lock:
            _active.discard(self)
        return self.final

    def abort(self) -> None:
        self.done = True
        if not self.passthrough:
            _remove(self.path)
        with _lock:
            _active.discard(self)

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
            return
        self.abort()
        if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
            raise user_error(exc, self.requested) from exc


@contextmanager
def staged_file(out: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Write one file: ``with staged_file(out, force) as tmp: ...``; swapped in on success."""
    with Staging(out, force, directory=False) as s:
        yield s.path


@contextmanager
def staged_dir(out: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Build one directory: ``with staged_dir(out, force) as tmp: ...``; swapped in whole on success."""
    with Staging(out, force, directory=True) as s:
        yield s.path


def write_text(out: str | os.PathLike[str], text: str, force: bool = True) -> Path:
    """Write a text file whole (readers never see half of it); a special file gets the text streamed."""
    with Staging(out, force, directory=False) as s:
        mode = "a" if s.passthrough else "w"
        with open(s.path, mode, encoding="utf-8") as fh:
            fh.write(text)
    return s.final


def write_bytes(out: str | os.PathLike[str], data: bytes, force: bool = True) -> Path:
    with Staging(out, force, directory=False) as s, open(s.path, "ab" if s.passthrough else "wb") as fh:
        fh.write(data)
    return s.final


def abort_all() -> None:
    """Remove every staging this process holds (called on SIGTERM and at interpreter exit)."""
    with _lock:
        pending = list(_active)
    for s in pending:
        s.abort()


def _on_terminate(signum: int, _frame: object) -> None:
    abort_all()
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C (``with`` blocks clean up), then exit with 128 + signal."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, _on_terminate)


import atexit  # noqa: E402

atexit.register(abort_all)
