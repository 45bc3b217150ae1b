"""Kills and disk rot, through the real console script as subprocesses.

What must hold: a `fragment`, `assemble` or `pull` killed (SIGKILL or SIGTERM)
at any point leaves no wrong file under a final name, the next run leaves no
staging litter and completes, and a pull's rerun does not fetch again the
blocks the killed one verified and wrote. A fragment that rots on a seed's
disk, before it starts or after it has served it once, is never sent: the
seed refuses it (it is not banned as a liar), the puller gets it elsewhere or
stops with an error naming what is missing, and writes no wrong byte.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

import fragmenter as fr
from fragmenter.manifest import HEADER_NAME
from node.store import Blob, Store
from tests.conftest import sha256_file
from tests.gguf_factory import write_model
from tests.processes import terminate

CLI = [sys.executable, "-m", "node.cli"]
LISTEN = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"]  # no other test's nodes found by mDNS
BLOCK = 1 << 20


# ---- helpers -------------------------------------------------------------------------


def big_model(path: Path) -> Path:
    """24 MiB in six 4 MiB tensors (with a vocabulary, so pulls build tokenizer files)."""
    return write_model(path, [(f"blk.{i}.ffn_up.weight", T.F32, (256, 4096)) for i in range(6)])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return big_model(tmp_path_factory.mktemp("model") / "crash-model.gguf")


@pytest.fixture(scope="module")
def folder(model: Path) -> Path:
    """The model in 4 MiB fragments: six files of four 1 MiB blocks, plus the header."""
    out = model.parent / "data" / "crash-model"
    fr.fragment_model(model, out, chunk_size=4 << 20)
    return out


def _cid(folder: Path) -> str:
    from protocol import cid_of

    return cid_of((folder / "manifest.json").read_bytes())


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_no_wrong_final_file(model_folder: Path) -> list[str]:
    """Every file under a name the manifest gives has the manifest's size and
    sha256 (or does not exist); returns the names present."""
    manifest = fr.read_manifest(model_folder)
    raw = json.loads((model_folder / "manifest.json").read_text())
    expected = {e.file_name: (e.size, e.sha256) for e in manifest.fragments}
    expected[HEADER_NAME] = (manifest.header_size, raw["header_sha256"])
    present = []
    for name, (size, sha) in expected.items():
        path = model_folder / name
        if path.exists():
            assert path.stat().st_size == size and sha256_file(path) == sha, f"{name} is wrong under its final name"
            present.append(name)
    return present


def flip_byte(path: Path, offset: int) -> None:
    """Bit rot: one byte changed in place, the mtime kept (a disk error does not touch it)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@contextmanager
def seed_process(data_dir: Path, log: Path, *extra: str) -> Iterator[str]:
    """A seed (`-v`: its log goes to `log`); yields its first address."""
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [*CLI, "seed", "--data-dir", str(data_dir), *LISTEN, "-v", *extra],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            assert proc.stdout is not None
            addr = proc.stdout.readline().strip()
            assert "/p2p/12D3" in addr, log.read_text()[-2000:]
            yield addr
        finally:
            terminate(proc)


def pull_args(cid: str, data_dir: Path, *bootstrap: str) -> list[str]:
    boot = [a for addr in bootstrap for a in ("--bootstrap", addr)]
    return [*CLI, "pull", cid, "--data-dir", str(data_dir), *LISTEN, *boot, "--json"]


def pull(cid: str, data_dir: Path, *bootstrap: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*pull_args(cid, data_dir, *bootstrap), *extra], capture_output=True, text=True, timeout=120)


def events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def pulled_event(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(e for e in events(proc.stdout) if e["event"] == "pulled")


def _stalled_naming(stderr: str, name: str) -> bool:
    """The pull's one error line says it stalled and names the one file missing (log
    lines may precede it): the seed told the puller it lost that file (a `lost`
    message), so the puller neither struck nor dropped it and got every other file."""
    for line in stderr.splitlines():
        found = re.search(r"(\d+) file\(s\) missing", line)
        if line.startswith("error: stalled") and found:
            return name in line and int(found.group(1)) == 1
    return False


def stall_config(tmp_path: Path, seconds: int) -> list[str]:
    config = tmp_path / "pull.toml"
    config.write_text(f"[fetch]\nstall_timeout = {seconds}\n")
    return ["--config", str(config)]


# ---- fragment ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_fragment_killed_midway_leaves_nothing_final_and_the_rerun_clears_its_staging(
    model: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "out"
    # 16 KiB fragments: ~1,500 files, about a second of work, so the kill lands midway.
    cmd = [*CLI, "fragment", str(model), "--output", str(out), "--chunk-size", "16KiB", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        staging = list(tmp_path.glob(".out.partial-*"))
        if staging and len(list(staging[0].glob("*.dat"))) > 100:
            break
        time.sleep(0.002)
    if proc.poll() is not None:
        pytest.skip("fragmenting finished before it could be killed")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert not out.exists()  # nothing under the final name
    if sig == signal.SIGTERM:  # handled like Ctrl-C: the staging folder goes at once
        assert proc.returncode == 130 and err.strip() == "interrupted", err
        assert not list(tmp_path.glob(".out.partial-*"))
    else:
        assert list(tmp_path.glob(".out.partial-*"))  # no cleanup ran: the next run's job

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left, the killed run's included
    assert fr.verify_folder(out).ok


# ---- assemble ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_assemble_killed_midway_leaves_no_output_and_the_rerun_clears_its_staging(
    folder: Path, model: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "out.gguf"
    cmd = [*CLI, "assemble", str(folder), "--output", str(out)]
    for _ in range(10):  # a 24 MiB assembly takes ~0.1 s: poll for its staging file, kill on sight
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:
            staging = list(tmp_path.glob(".out.gguf.partial-*"))
            if staging and staging[0].exists() and staging[0].stat().st_size > 0:
                proc.send_signal(sig)
                break
            time.sleep(0.001)
        _, err = proc.communicate(timeout=30)
        if proc.returncode != 0:
            break
        out.unlink()  # finished first: try again
    else:
        pytest.skip("assembling always finished before it could be killed")
    assert not out.exists()
    if sig == signal.SIGTERM:  # handled like Ctrl-C: the staging file goes at once
        assert proc.returncode == 130 and err.strip() == "interrupted", err
        assert not list(tmp_path.glob(".out.gguf.partial-*"))
    else:
        assert proc.returncode == -signal.SIGKILL

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]  # no staging file left, the killed run's included
    assert sha256_file(out) == sha256_file(model)


# ---- pull ----------------------------------------------------------------------------


def _pull_until(cid: str, data_dir: Path, addr: str, fraction: float, sig: signal.Signals) -> int:
    """Start a pull, kill it with `sig` once `fraction` of the bytes are verified;
    return the bytes it reported verified (and so written) last."""
    proc = subprocess.Popen(pull_args(cid, data_dir, addr), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    done = 0
    for line in proc.stdout:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "progress":
            done = event["done"]
            if done >= fraction * event["total"]:
                break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -sig, f"the pull ended before it could be killed: {err[-2000:]}"
    return done


def test_pull_killed_twice_resumes_its_verified_blocks(folder: Path, model: Path, tmp_path: Path) -> None:
    cid = _cid(folder)
    manifest = fr.read_manifest(folder)
    total = manifest.total_bytes + manifest.header_size
    data = tmp_path / "p"
    # 4 MB/s: the 25 MB model takes ~6 s, so each kill lands midway.
    with seed_process(folder.parent, tmp_path / "seed.log", "--upload-rate", "4MB") as addr:
        done1 = _pull_until(cid, data, addr, 0.3, signal.SIGTERM)
        assert_no_wrong_final_file(data / cid)
        done2 = _pull_until(cid, data, addr, 0.65, signal.SIGKILL)
        assert done2 > done1  # the second run went on from where the first stopped
        assert_no_wrong_final_file(data / cid)
        out = tmp_path / "out.gguf"
        last = pulled_event(pull(cid, data, addr, extra=("--output", str(out))))
    # Whatever the killed runs verified and wrote was kept: the last run fetched only the rest.
    print(f"\nkilled at {done1} and {done2} of {total} bytes; the last run fetched {last['bytes']}")
    assert last["bytes"] <= total - done2
    assert sha256_file(out) == sha256_file(model)
    assert fr.verify_folder(data / cid).ok
    assert hidden(data / cid) == []  # no partial or resume file left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---- rot on a seed's disk -----------------------------------------------------------


def test_fragment_rotted_before_the_seed_starts_is_never_served(folder: Path, model: Path, tmp_path: Path) -> None:
    cid = _cid(folder)
    manifest = fr.read_manifest(folder)
    bad = manifest.fragments[2].file_name
    rotted = tmp_path / "rotted"
    rotted.mkdir()
    fr_copy = rotted / folder.name
    subprocess.run(["cp", "-a", str(folder), str(fr_copy)], check=True)
    flip_byte(fr_copy / bad, BLOCK + 12345)  # in its second block

    with seed_process(rotted, tmp_path / "rotted.log") as addr:
        # Alone, the rotted seed cannot supply that fragment: a clear error naming it, nothing wrong written.
        proc = pull(cid, tmp_path / "alone", addr, extra=tuple(stall_config(tmp_path, 8)))
        failed = proc.returncode == 1 and _stalled_naming(proc.stderr, bad)
        assert failed, f"{proc.stderr}\n{proc.stdout[-3000:]}\n{(tmp_path / 'rotted.log').read_text()[-5000:]}"
        assert "Traceback" not in proc.stderr
        assert bad not in assert_no_wrong_final_file(tmp_path / "alone" / cid)
        assert not any(e["event"] == "bad_peer" for e in events(proc.stdout))  # refused, not sent: not a liar

        # With a good seed too, the pull completes, every byte right.
        with seed_process(folder.parent, tmp_path / "good.log") as good:
            out = tmp_path / "out.gguf"
            proc = pull(cid, tmp_path / "both", addr, good, extra=("--output", str(out)))
            done = pulled_event(proc)
    assert done["bad_peers"] == []
    assert sha256_file(out) == sha256_file(model)
    assert "does not match the manifest; not serving it" in (tmp_path / "rotted.log").read_text()


def test_block_rotted_after_the_seed_served_it_once_is_never_served(folder: Path, tmp_path: Path) -> None:
    cid = _cid(folder)
    manifest = fr.read_manifest(folder)
    bad = manifest.fragments[3].file_name
    data = tmp_path / "seed"
    data.mkdir()
    subprocess.run(["cp", "-a", str(folder), str(data / folder.name)], check=True)

    with seed_process(data, tmp_path / "seed.log") as addr:
        pulled_event(pull(cid, tmp_path / "first", addr))  # every file verified and served once
        flip_byte(data / folder.name / bad, 2 * BLOCK + 7)  # then its third block rots, the mtime kept
        proc = pull(cid, tmp_path / "second", addr, extra=tuple(stall_config(tmp_path, 8)))
    # The seed re-checks every block it reads: it refuses the rotted one instead of sending it,
    # so the puller has no bad byte to reject and no reason to ban it; it names what it lacks.
    log = (tmp_path / "seed.log").read_text()
    failed = proc.returncode == 1 and _stalled_naming(proc.stderr, bad)
    assert failed, f"{proc.stderr}\n{proc.stdout[-3000:]}\n{log[-5000:]}"
    assert "Traceback" not in proc.stderr
    assert not any(e["event"] == "bad_peer" for e in events(proc.stdout))
    assert bad not in assert_no_wrong_final_file(tmp_path / "second" / cid)
    assert "changed on disk since it was verified; not serving it" in log


def test_v1_reads_recheck_the_blocks_they_touch(folder: Path, tmp_path: Path) -> None:
    """The single-request protocol's reads too: hashed whole once, then block by block."""
    data = tmp_path / "seed"
    data.mkdir()
    subprocess.run(["cp", "-a", str(folder), str(data / folder.name)], check=True)
    store = Store(data)
    store.scan()
    model = next(iter(store.models.values()))
    entry = model.manifest.fragments[1]
    blob = store.locate(model.fragment_cids[1])
    assert isinstance(blob, Blob)
    whole = (data / folder.name / entry.file_name).read_bytes()
    assert store.read_verified(blob) == whole
    assert store.read_verified(blob, BLOCK - 10, 20) == whole[BLOCK - 10 : BLOCK + 10]
    flip_byte(blob.path, 3 * BLOCK + 1)
    assert store.read_verified(blob, 0, 100) == whole[:100]  # the untouched first block still serves
    assert store.read_verified(blob, 3 * BLOCK, 10) is None  # the rotted one does not...
    assert not model.have[1] and store.locate(model.fragment_cids[1]) is None  # ...nor the file any more


# ---- power cut ------------------------------------------------------------------------


def test_a_file_left_unrecorded_by_a_power_cut_is_hashed_before_a_pull_counts_it(
    folder: Path, model: Path, tmp_path: Path
) -> None:
    """Pulled files are made durable in batches, just before their records are
    saved: after a power cut, a file named since the last batch may hold anything.
    Such a file (right size, wrong bytes, no record) is hashed by the next pull,
    dropped and fetched again, not taken as held."""
    cid = _cid(folder)
    manifest = fr.read_manifest(folder)
    data = tmp_path / "p"
    with seed_process(folder.parent, tmp_path / "seed.log") as addr:
        pulled_event(pull(cid, data, addr))
        # The power cut: the last batch's record never written (so the pull's mark is still
        # there), one file's bytes never landed.
        state = data / ".gguf-swarm"
        records, mark = state / "verified" / cid, state / "pulling" / cid
        assert records.exists() and not mark.exists()  # a whole model, recorded: the mark went
        records.unlink()
        mark.write_text(cid)
        torn = data / cid / manifest.fragments[3].file_name
        flip_byte(torn, BLOCK + 7)
        again = pulled_event(pull(cid, data, addr))
    assert again["bytes"] == torn.stat().st_size  # that file, and only it, fetched again
    assert_no_wrong_final_file(data / cid)
    assert fr.verify_folder(data / cid).ok
