"""The real `gguf-swarm` console script as subprocesses: seed, pull, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import fragmenter as fr
from tests.conftest import GEMMA_SHA256, sha256_file
from tests.integration.test_cli_errors import assert_one_line_error, gguf_swarm
from tests.processes import terminate

CLI = [sys.executable, "-m", "node.cli"]
ON_LAN = ["--listen", "/ip4/127.0.0.1/tcp/0"]  # mDNS on, as by default
LISTEN = [*ON_LAN, "--no-mdns"]  # no other test's nodes found by mDNS


@contextmanager
def seed_process(data_dir: Path, listen: list[str] = LISTEN) -> Iterator[str]:
    proc = subprocess.Popen(
        [*CLI, "seed", "--data-dir", str(data_dir), *listen], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        addr = proc.stdout.readline().strip()
        assert "/p2p/12D3" in addr, proc.stderr.read() if proc.poll() is not None else addr
        yield addr
    finally:
        terminate(proc)


def pull(cid: str, data_dir: Path, bootstrap: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "pull", cid, "--data-dir", str(data_dir), *LISTEN, "--bootstrap", bootstrap, "--json", *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def events(proc: subprocess.CompletedProcess[str]) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_seed_and_two_pullers_on_gemma(gemma_folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "seed"
    data.mkdir()
    (data / "gemma").symlink_to(gemma_folder, target_is_directory=True)
    cid = fr.read_manifest(gemma_folder)
    model_cid = json.loads(gguf_swarm("models", "--data-dir", str(data), "--json").stdout.splitlines()[0])["model_cid"]
    with seed_process(data) as addr:
        for name in ("p1", "p2"):
            out = tmp_path / f"{name}.gguf"
            proc = pull(model_cid, tmp_path / name, addr, "--output", str(out))
            assert proc.returncode == 0, proc.stderr[-2000:]
            done = [e for e in events(proc) if e["event"] == "pulled"][0]
            assert done["bytes"] == cid.total_bytes + cid.header_size  # every block, the header's included
            assert sha256_file(out) == GEMMA_SHA256
            # The tokenizer files, built from the header during the transfer, are the seed's to the byte.
            for tokenizer in ("tokenizer.json", "tokenizer.model"):
                pulled = tmp_path / name / model_cid / tokenizer
                assert sha256_file(pulled) == sha256_file(gemma_folder / tokenizer), tokenizer


def test_puller_killed_and_restarted_resumes(tmp_path: Path) -> None:
    from tests.integration.test_swarm import model_folder

    model, folder = model_folder(tmp_path / "seed")
    model_cid = json.loads(gguf_swarm("models", "--data-dir", str(tmp_path / "seed"), "--json").stdout)["model_cid"]
    with seed_process(tmp_path / "seed") as addr:
        proc = subprocess.Popen(
            [*CLI, "pull", model_cid, "--data-dir", str(tmp_path / "p"), *LISTEN, "--bootstrap", addr, "--json"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{") and json.loads(line).get("fragments_done", 0) >= 3:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        held = [p for p in (tmp_path / "p" / model_cid).glob("*.dat") if p.name != "gguf_header.dat"]
        assert held, "the killed puller should have verified some fragments"
        again = pull(model_cid, tmp_path / "p", addr, "--output", str(tmp_path / "out.gguf"))
        assert again.returncode == 0, again.stderr[-2000:]
        done = [e for e in events(again) if e["event"] == "pulled"][0]
        assert done["already_had"] >= len(held) - 1 and done["bytes"] < fr.read_manifest(folder).total_bytes
    assert sha256_file(tmp_path / "out.gguf") == sha256_file(model)
    assert not list((tmp_path / "p" / model_cid).glob(".partial-*"))


def test_unknown_cid_fails_after_a_bounded_wait(tmp_path: Path) -> None:
    with seed_process(tmp_path / "seed") as addr:
        start = time.monotonic()
        unknown = "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
        proc = subprocess.run(
            [*CLI, "pull", unknown, "--data-dir", str(tmp_path / "p"), *LISTEN, "--bootstrap", addr, "--timeout", "2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert_one_line_error(proc, "no peer has model")
        assert time.monotonic() - start < 60


def test_node_bad_input(tmp_path: Path) -> None:
    cid = "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
    proc = gguf_swarm("pull", cid, "--data-dir", str(tmp_path / "d"), "--bootstrap", "not-a-multiaddr")
    assert_one_line_error(proc, "not a valid multiaddr")
    proc = gguf_swarm(
        "pull",
        cid,
        "--data-dir",
        str(tmp_path / "d"),
        *LISTEN,
        "--bootstrap",
        "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWKGToymYguLNXsYxwT6WaS58q1rsX7pbFLWCD4Chowquc",
    )
    assert_one_line_error(proc, "no bootstrap peer reachable")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(gguf_swarm("seed", "--data-dir", str(blocker / "d"), *LISTEN), "not writable")
    proc = gguf_swarm("pull", "QmNotACid", "--data-dir", str(tmp_path / "d"))
    assert proc.returncode != 0 and "not a model CID" in proc.stderr and "Traceback" not in proc.stderr


def test_config_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    config = tmp_path / "seed.toml"
    config.write_text('[serve]\nupload_rat = "10MB"\n')
    proc = gguf_swarm("seed", "--config", str(config), "--data-dir", str(tmp_path / "d"), *LISTEN)
    assert_one_line_error(proc, "unknown key serve.upload_rat")
    config.write_text('[serve]\nupload_rate = "fast"\n')
    proc = gguf_swarm("seed", "--config", str(config), "--data-dir", str(tmp_path / "d"), *LISTEN)
    assert_one_line_error(proc, "bad value")
    proc = gguf_swarm("seed", "--data-dir", str(tmp_path / "d"), *LISTEN, "--upload-rate", "lots")
    assert proc.returncode == 2 and "not a size" in proc.stderr and "Traceback" not in proc.stderr


def test_publish_fragments_into_the_configs_data_dir(tmp_path: Path) -> None:
    from tests.gguf_factory import MIXED, write_model
    from tests.integration.test_metrics import scrape_sync, value

    model = write_model(tmp_path / "tiny.gguf", MIXED)
    data, cwd = tmp_path / "served", tmp_path / "cwd"
    cwd.mkdir()
    config = tmp_path / "seed.toml"
    config.write_text(
        f'[node]\ndata_dir = "{data}"\nlisten = ["/ip4/127.0.0.1/tcp/0"]\nmetrics = "127.0.0.1:0"\n'
        '[serve]\nupload_rate = "10MB"\n'
    )
    proc = subprocess.Popen(
        [*CLI, "publish", str(model), "--config", str(config), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert proc.stdout is not None
        seen: dict[str, dict] = {}
        for line in proc.stdout:
            event = json.loads(line)
            seen[event["event"]] = event
            if event["event"] == "serving":
                break
        assert "serving" in seen, proc.stderr.read() if proc.poll() is not None else seen
        published = seen["published"]
        assert published["folder"] == str(data / "tiny")
        assert seen["serving"]["model_cid"] == published["model_cid"] and seen["serving"]["complete"]
        assert (data / "tiny" / "manifest.json").exists() and fr.verify_folder(data / "tiny").ok
        assert list(cwd.iterdir()) == []  # nothing fragmented into the working directory
        metrics = scrape_sync(seen["metrics"]["url"])  # [node] metrics from the same config
        labels = {"model": published["model_cid"], "name": "tiny"}
        assert value(metrics, "gguf_swarm_fragments_held", **labels) == published["fragments"]
    finally:
        terminate(proc)
    assert proc.returncode == 0


def test_publish_bad_input_is_one_line(tmp_path: Path) -> None:
    from tests.gguf_factory import MIXED, write_model

    model = write_model(tmp_path / "tiny.gguf", MIXED)
    config = tmp_path / "seed.toml"
    config.write_text('[node]\ndata_dir = "served"\nmetrics = "everywhere"\n')
    assert_one_line_error(gguf_swarm("publish", str(model), "--config", str(config)), "metrics: expected HOST:PORT")
    assert not (tmp_path / "served").exists()  # a bad config is reported before anything is fragmented
    proc = gguf_swarm("publish", str(tmp_path / "missing.gguf"), "--data-dir", str(tmp_path / "d"), *LISTEN)
    assert_one_line_error(proc, "cannot read")
    assert_one_line_error(
        gguf_swarm("publish", str(model), "--config", str(tmp_path / "nope.toml")), "cannot read config"
    )


def test_pull_without_bootstrap_finds_a_seed_on_the_lan(folder_for_lan: tuple[Path, str], tmp_path: Path) -> None:
    """mDNS (on by default): the puller is given no address at all."""
    data, cid = folder_for_lan
    with seed_process(data, ON_LAN):
        lonely = subprocess.run(
            [*CLI, "pull", cid, "--data-dir", str(tmp_path / "off"), *LISTEN, "--no-mdns", "--timeout", "3"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert lonely.returncode == 1 and f"no peer has model {cid}" in lonely.stderr
        found = subprocess.run(
            [*CLI, "pull", cid, "--data-dir", str(tmp_path / "on"), *ON_LAN, "--json", "--timeout", "20"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert found.returncode == 0, found.stderr[-2000:]
    assert events(found)[-1]["event"] == "pulled"
    assert fr.verify_folder(tmp_path / "on" / cid).ok


@pytest.fixture
def folder_for_lan(tmp_path: Path) -> tuple[Path, str]:
    from tests.integration.test_swarm import model_folder

    _, folder = model_folder(tmp_path / "seed")
    listed = subprocess.run(
        [*CLI, "models", "--data-dir", str(tmp_path / "seed"), "--json"], capture_output=True, text=True
    )
    return tmp_path / "seed", json.loads(listed.stdout.splitlines()[0])["model_cid"]


def test_a_seed_stopped_at_once_stops_cleanly(tmp_path: Path) -> None:
    """SIGTERM the moment a seed has printed its address (it may still be
    indexing): a clean stop, exit 0, not death by the signal."""
    for _ in range(3):
        proc = subprocess.Popen(
            [*CLI, "seed", "--data-dir", str(tmp_path / "d"), *LISTEN, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "listening"
        terminate(proc)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


def test_a_node_whose_stdout_reader_leaves_stops_quietly(tmp_path: Path) -> None:
    """`gguf-swarm seed --json | head -1`: the next line (`indexed`) finds the
    pipe closed. The node stops as on SIGTERM, cleanly and at once, without a
    traceback, as a program killed by SIGPIPE would end."""
    proc = subprocess.Popen(
        [*CLI, "seed", "--data-dir", str(tmp_path / "d"), *LISTEN, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert json.loads(proc.stdout.readline())["event"] == "listening"
        proc.stdout.close()  # the reader leaves
        assert proc.wait(timeout=30) == 0  # not death by SIGTERM, and not left running
        err = proc.stderr.read()
        assert "Traceback" not in err and "Broken pipe" not in err, err
    finally:
        if proc.poll() is None:
            terminate(proc)
