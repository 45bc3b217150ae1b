"""Atomic file and folder writes: nothing half-written ever carries a final name.

Staging names carry the writer's process id (`.NAME.partial-PID-XXXX`), so the
next write to the same final name can tell a killed writer's leftovers (SIGKILL,
a power cut: no cleanup ran) from a live writer's, and remove only the former.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FragmenterError, WriteError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def libc() -> ctypes.CDLL:
    # The running program's own symbols, libc's among them: ctypes.util.find_library
    # would run `ldconfig -p` twice at every import of this module.
    return ctypes.CDLL(None, use_errno=True)


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        syncfs = libc().syncfs  # Linux only
    except (OSError, AttributeError, TypeError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return syncfs  # type: ignore[no-any-return]


_SYNCFS = _load_syncfs()


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        call = libc().sync_file_range  # Linux only
    except (OSError, AttributeError, TypeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_FROM = 256 * 1024  # files this large start their writeback as they are written (start_writeback)


def start_writeback(fd: int) -> None:
    """Have the kernel start writing the file's dirty pages to disk now, without
    waiting for them (sync_file_range(2), SYNC_FILE_RANGE_WRITE): the one sync at
    the end then finds most of a large output already on disk, instead of all of
    it. Not a durability promise; nothing where the call is missing."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def drop_cached(path: Path) -> None:
    """Let the kernel drop `path`'s pages from its page cache (posix_fadvise
    DONTNEED). Only clean pages go, so call it once the file is durable. Best
    effort: a file gone or a system without the call is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Make durable everything written to the filesystem holding `path` (one
    syncfs(2); elsewhere, sync(2)). Grouped durability: files written without
    their own fsync, then one call for all of them."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """Make every file in `folder` (and the folder) durable.

    One syncfs(2) for the filesystem instead of an fsync per file: a model cut
    into 40,000 fragments spent 12 s in fsync, one journal commit per file,
    against about 0.3 s for one syncfs. Elsewhere, fsync each file."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _SYNCFS is not None and _SYNCFS(fd) == 0:
            return
        for child in folder.iterdir():
            child_fd = os.open(child, os.O_RDONLY)
            try:
                os.fsync(child_fd)
            finally:
                os.close(child_fd)
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def remove_stale_staging(final: Path) -> None:
    """Remove the staging leftovers of writers of `final` that are no longer running."""
    for kind in ("partial", "old"):
        prefix = f".{final.name}.{kind}-"
        for path in final.parent.glob(glob.escape(prefix) + "*"):
            pid = path.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and _pid_alive(int(pid)):
                continue  # a live writer's (or, after pid reuse, kept until that process ends)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _staging_prefix(final: Path, kind: str) -> str:
    return f".{final.name}.{kind}-{os.getpid()}-"


@contextmanager
def open_staging_folder(final: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `final`; on success it replaces `final`.

    On any error the temporary folder is removed, so an interrupted run never
    leaves a folder that looks complete.
    """
    final = final.resolve()
    if final.exists() and not final.is_dir():
        raise FragmenterError(f"{final} exists and is not a folder")
    if final.is_dir() and any(final.iterdir()) and not force:
        raise FragmenterError(f"{final} exists and is not empty (use --force to replace it)")
    prefix = _staging_prefix(final, "partial")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(final)
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        os.chmod(staging, 0o777 & ~umask())  # mkdtemp's 0700 would shut out a seed run as another user
    except OSError as e:
        raise WriteError(f"cannot write into {final.parent}: {e.strerror}") from None
    except BaseException:  # a SIGTERM or Ctrl-C after mkdtemp made the folder, before we knew its name
        for leftover in final.parent.glob(glob.escape(prefix) + "*"):
            _remove_folder(leftover)
        raise
    try:
        yield staging
        sync_folder(staging)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=_staging_prefix(final, "old"), dir=final.parent))
            final.rename(trash / "old")
            staging.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(final)
        fsync_dir(final.parent)
    except BaseException:
        _remove_folder(staging)
        raise


def _remove_folder(path: Path) -> None:
    """rmtree, tried again while the folder is still there: one run of the
    suite left a staging folder behind after a SIGTERM, for a reason not found
    (a file still being created as rmtree ran is the one way it fails)."""
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
        time.sleep(0.01)


def umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, racing other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def open_staging_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; renamed onto `final` on success."""
    final = final.resolve()
    prefix = _staging_prefix(final, "partial")
    tmp: Path | None = None
    try:
        # The file is made inside the block that removes it: a SIGTERM raised as an
        # exit (the tokenizer build's) just after mkstemp left it behind.
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(final)
            fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
            tmp = Path(name)
            try:
                os.fchmod(fd, 0o666 & ~umask())  # what open(2) gives, not mkstemp's 0600
            finally:
                os.close(fd)
        except OSError as e:
            raise WriteError(f"cannot write into {final.parent}: {e.strerror}") from None
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        else:  # interrupted between mkstemp and its name: ours are the files with our pid's prefix
            for path in final.parent.glob(glob.escape(prefix) + "*"):
                path.unlink(missing_ok=True)
        raise
