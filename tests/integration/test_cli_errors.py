"""Bad input through the real console script: one line on stderr, non-zero exit,
nothing left that looks complete."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

import fragmenter as fr
from tests.gguf_factory import MIXED, write_model


def gguf_swarm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "m.gguf", MIXED)


def test_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    proc = gguf_swarm("fragment", str(bad), "--output", str(tmp_path / "out"))
    assert_one_line_error(proc, "not a GGUF file")
    assert not (tmp_path / "out").exists()


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.gguf").write_bytes(b"")
    assert_one_line_error(gguf_swarm("fragment", str(tmp_path / "e.gguf"), "-o", str(tmp_path / "o")), "empty")


def test_truncated_model(model: Path, tmp_path: Path) -> None:
    data = model.read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) - 500])
    proc = gguf_swarm("fragment", str(tmp_path / "t.gguf"), "--output", str(tmp_path / "out"))
    assert_one_line_error(proc, "runs past the end")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))] == []


def test_unknown_version(model: Path, tmp_path: Path) -> None:
    data = bytearray(model.read_bytes())
    data[4:8] = struct.pack("<I", 9)
    (tmp_path / "v.gguf").write_bytes(bytes(data))
    assert_one_line_error(gguf_swarm("fragment", str(tmp_path / "v.gguf"), "-o", str(tmp_path / "o")), "version 9")


def test_missing_input(tmp_path: Path) -> None:
    assert_one_line_error(gguf_swarm("fragment", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "o")), "nope.gguf")


def test_unwritable_output(model: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(gguf_swarm("fragment", str(model), "-o", str(blocker / "sub")), "cannot write")


def test_verify_and_assemble_on_a_folder_that_is_not_ours(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "manifest.json").write_text('{"hello": "world"}')
    assert_one_line_error(gguf_swarm("verify", str(tmp_path / "f")), "not a fragment manifest")
    assert_one_line_error(gguf_swarm("assemble", str(tmp_path / "f"), "-o", str(tmp_path / "x.gguf")), "manifest")
    assert_one_line_error(gguf_swarm("verify", str(tmp_path / "nowhere")), "not a folder")


def test_verify_exit_code_and_listing(model: Path, tmp_path: Path) -> None:
    ok = gguf_swarm("fragment", str(model), "-o", str(tmp_path / "f"), "--chunk-size", "4KiB")
    assert ok.returncode == 0, ok.stderr
    cid = ok.stdout.splitlines()[0]
    assert cid.startswith("bafk")
    assert gguf_swarm("verify", str(tmp_path / "f")).returncode == 0
    victim = sorted((tmp_path / "f").glob("*_S0_*.dat"))[0]
    victim.write_bytes(b"x" + victim.read_bytes()[1:])
    proc = gguf_swarm("verify", str(tmp_path / "f"))
    assert proc.returncode == 1 and f"bad: {victim.stem}" in proc.stdout
    proc = gguf_swarm("assemble", str(tmp_path / "f"), "-o", str(tmp_path / "x.gguf"))
    assert_one_line_error(proc, victim.stem)
    assert not (tmp_path / "x.gguf").exists()


def test_python_dash_m_fragmenter_and_json(model: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fragmenter", str(model), "--output", str(tmp_path / "f"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    event = json.loads(proc.stdout.strip().splitlines()[-1])
    assert event["event"] == "fragmented" and event["model_cid"].startswith("bafk")


def test_a_chunk_size_that_would_flood_the_disk_with_files_is_refused(model: Path, tmp_path: Path) -> None:
    proc = gguf_swarm("fragment", str(model), "--output", str(tmp_path / "out"), "--chunk-size", "1")
    assert proc.returncode == 2 and "chunk size must be from 4KiB to 1GiB" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "soon"])
def test_a_pull_timeout_that_is_not_a_positive_number_is_refused(tmp_path: Path, value: str) -> None:
    cid = "bafkreigsgxmcnkhjmxpohdq62xbgq327uoav2d7pbbkjdc5so4fnmqu3fq"
    proc = gguf_swarm("pull", cid, "--data-dir", str(tmp_path), "--timeout", value)
    assert proc.returncode == 2 and "--timeout" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_while_fragmenting_leaves_no_staging_folder(tmp_path: Path) -> None:
    big = write_model(tmp_path / "big.gguf", [(f"blk.{i}.ffn_up.weight", T.F32, (1024, 2048)) for i in range(24)])
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "fragment", str(big), "--output", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("fragmenting finished before it could be interrupted")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and not list(tmp_path.glob(".out.partial-*"))
    if proc.returncode == 0:  # the signal came as the last file landed: then the folder is whole
        assert fr.verify_folder(out).ok
    else:
        assert not out.exists()


def test_version() -> None:
    from importlib.metadata import version

    proc = gguf_swarm("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"gguf-swarm {version('gguf-swarm')}"


def test_bad_metrics_address(tmp_path: Path) -> None:
    proc = gguf_swarm("seed", "--data-dir", str(tmp_path / "d"), "--metrics", "127.0.0.1:http")
    assert proc.returncode == 2 and "argument --metrics: expected HOST:PORT" in proc.stderr
    assert "Traceback" not in proc.stderr
