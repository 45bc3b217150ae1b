"""A full disk, through the real console script: one `error:` line, a non-zero
exit, and nothing corrupt (no file under a final name that is not whole, no
staging litter). The disk is a 3 MiB tmpfs (needs root; skipped otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import fragmenter as fr
from tests.conftest import sha256_file
from tests.integration.test_crash_safety import (
    _cid,
    assert_no_wrong_final_file,
    big_model,
    hidden,
    pull,
    pulled_event,
    seed_process,
)

CLI = [sys.executable, "-m", "node.cli"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs mounted at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return big_model(tmp_path_factory.mktemp("model") / "full-model.gguf")


@pytest.fixture(scope="module")
def folder(model: Path) -> Path:
    out = model.parent / "data" / "full-model"
    fr.fragment_model(model, out, chunk_size=4 << 20)
    return out


def assert_disk_full_error(proc: subprocess.CompletedProcess[str], where: Path) -> None:
    """One line naming what could not be written, and why."""
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "No space left on device" in lines[0] and str(where) in lines[0], lines[0]


def used(disk: Path) -> int:
    st = os.statvfs(disk)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_fragment_into_a_full_disk(model: Path, small_disk: Path) -> None:
    out = small_disk / "out"
    proc = subprocess.run([*CLI, "fragment", str(model), "--output", str(out)], capture_output=True, text=True)
    assert_disk_full_error(proc, out)
    assert list(small_disk.iterdir()) == []  # no folder under the final name, no staging folder
    assert used(small_disk) == 0


def test_assemble_into_a_full_disk(folder: Path, small_disk: Path) -> None:
    out = small_disk / "out.gguf"
    proc = subprocess.run([*CLI, "assemble", str(folder), "--output", str(out)], capture_output=True, text=True)
    assert_disk_full_error(proc, out)
    assert list(small_disk.iterdir()) == []
    assert used(small_disk) == 0


def test_pull_into_a_full_disk_then_resume_once_there_is_room(
    folder: Path, model: Path, small_disk: Path, tmp_path: Path
) -> None:
    cid = _cid(folder)
    manifest = fr.read_manifest(folder)
    total = manifest.total_bytes + manifest.header_size
    with seed_process(folder.parent, tmp_path / "seed.log") as addr:
        proc = pull(cid, small_disk, addr)
        print(f"\n{proc.stderr.strip()}")
        assert_disk_full_error(proc, small_disk / cid)
        held = assert_no_wrong_final_file(small_disk / cid)  # whole and right, or absent
        assert len(held) < len(manifest.fragments) + 1
        for name in ("tokenizer.json", "tokenizer.model"):  # built beside them: whole or absent too
            if (small_disk / cid / name).exists():
                assert sha256_file(small_disk / cid / name) == sha256_file(folder / name)
        left = hidden(small_disk / cid)
        assert all(name.startswith(".resume-") for name in left), left  # verified blocks, kept

        # Room again: the rerun keeps what the full disk let through and fetches the rest.
        subprocess.run(["mount", "-o", "remount,size=64M", str(small_disk)], check=True)
        out = tmp_path / "out.gguf"
        done = pulled_event(pull(cid, small_disk, addr, extra=("--output", str(out))))
    print(f"\nfull disk: the rerun fetched {done['bytes']} of {total} bytes")
    assert done["bytes"] < total
    assert sha256_file(out) == sha256_file(model)
    assert hidden(small_disk / cid) == []
