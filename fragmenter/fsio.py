"""Atomic file and folder writes: nothing half-written ever carries a final name."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FragmenterError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    except OSError as e:
        raise FragmenterError(f"cannot write into {final.parent}: {e.strerror}") from None
    try:
        yield staging
        for child in staging.iterdir():
            fd = os.open(child, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(staging)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            final.rename(trash / "old")
            staging.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def open_staging_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; renamed onto `final` on success."""
    final = final.resolve()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.partial-", dir=final.parent)
        os.close(fd)
    except OSError as e:
        raise FragmenterError(f"cannot write into {final.parent}: {e.strerror}") from None
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
