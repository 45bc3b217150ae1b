"""Logs and settings of the real console script: logs on stderr only, human
lines by default, JSON lines with --log-format json, py-libp2p's warnings out
unless asked for; the GGUF_SWARM_* variables set what flags set, and name
themselves when wrong; publish, pull and models agree on where a model lives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.test_cli_errors import assert_one_line_error

UNKNOWN = "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
# py-libp2p has no QUIC transport: it warns that it skips this address, every time.
LISTEN = ["--listen", "/ip4/127.0.0.1/tcp/0", "--listen", "/ip4/127.0.0.1/udp/9/quic-v1", "--no-mdns"]


def pull_unknown(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A pull that finds nobody within 1 s: libp2p warns at start, the pull fails with one line."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "pull", UNKNOWN, "--data-dir", str(tmp_path / "d"), *LISTEN, *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_libp2p_warnings_stay_out_by_default(tmp_path: Path) -> None:
    proc = pull_unknown(tmp_path, "--timeout", "1")
    assert_one_line_error(proc, f"no peer has model {UNKNOWN}")  # nothing from libp2p before it


def test_json_logs_are_one_object_per_line_on_stderr(tmp_path: Path) -> None:
    proc = pull_unknown(
        tmp_path, "--timeout", "1", "--json", "--log-format", "json", "--log-level", "debug,libp2p=warning"
    )
    *lines, last = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and last.startswith("error: no peer has model")
    records = [json.loads(line) for line in lines]  # every log line is JSON
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    assert any(r["logger"].startswith("libp2p") and r["level"] == "warning" and "quic" in r["msg"] for r in records)
    up = [r for r in records if r["logger"] == "node.node" and r["msg"] == "node running"]
    assert up and up[0]["peer_id"].startswith("12D3") and up[0]["data_dir"] == str(tmp_path / "d")  # extra fields
    assert not any(r["logger"].startswith("libp2p") and r["level"] in ("debug", "info") for r in records)
    assert [json.loads(line)["event"] for line in proc.stdout.splitlines()][:1] == ["listening"]  # events: stdout


def test_the_environment_sets_logs_as_flags_do(tmp_path: Path) -> None:
    env = {"GGUF_SWARM_LOG_FORMAT": "json", "GGUF_SWARM_LOG_LEVEL": "libp2p=warning"}
    proc = pull_unknown(tmp_path, "--timeout", "1", env=env)
    *lines, last = proc.stderr.strip().splitlines()
    assert last.startswith("error: no peer has model") and lines
    assert {json.loads(line)["logger"].split(".")[0] for line in lines} == {"libp2p"}
    proc = pull_unknown(tmp_path, "--timeout", "1", "--log-level", "libp2p=off", env=env)  # the flag wins
    assert_one_line_error(proc, "no peer has model")


def test_a_bad_variable_is_one_line_naming_it(tmp_path: Path) -> None:
    proc = pull_unknown(tmp_path, env={"GGUF_SWARM_UPLOAD_RATE": "fast"})
    assert_one_line_error(proc, "GGUF_SWARM_UPLOAD_RATE: not a size: 'fast'")
    assert proc.returncode == 2
    proc = pull_unknown(tmp_path, env={"GGUF_SWARM_CONFIG": str(tmp_path / "missing.toml")})
    assert_one_line_error(proc, "cannot read config")


def test_publish_pull_and_models_agree_on_the_environments_data_dir(tmp_path: Path) -> None:
    """publish fragments into DATA_DIR/NAME; a pull of that CID in the same data dir
    finds it there (by CID) and fetches nothing; models lists it: one layout."""
    from tests.gguf_factory import MIXED, write_model
    from tests.processes import terminate

    model, data = write_model(tmp_path / "tiny.gguf", MIXED), tmp_path / "models"
    env = {
        **os.environ,
        "GGUF_SWARM_DATA_DIR": str(data),
        "GGUF_SWARM_LISTEN": "/ip4/127.0.0.1/tcp/0",
        "GGUF_SWARM_MDNS": "false",
    }
    cli = [sys.executable, "-m", "node.cli"]
    proc = subprocess.Popen(
        [*cli, "publish", str(model), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        seen: dict[str, dict] = {}
        for line in proc.stdout:
            seen[json.loads(line)["event"]] = json.loads(line)
            if "serving" in seen:
                break
        assert "serving" in seen, proc.stderr.read() if proc.poll() is not None else seen
    finally:
        terminate(proc)
    cid = seen["published"]["model_cid"]
    assert seen["published"]["folder"] == str(data / "tiny") and seen["serving"]["model_cid"] == cid
    pulled = subprocess.run(
        [*cli, "pull", cid, "--json", "--timeout", "2"], capture_output=True, text=True, timeout=120, env=env
    )
    assert pulled.returncode == 0, pulled.stderr
    done = json.loads(pulled.stdout.splitlines()[-1])
    assert done["event"] == "pulled" and done["folder"] == str(data / "tiny") and done["bytes"] == 0
    assert done["already_had"] == seen["published"]["fragments"]
    listed = subprocess.run([*cli, "models", "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert [(m["model_cid"], m["folder"]) for m in map(json.loads, listed.stdout.splitlines())] == [
        (cid, str(data / "tiny"))
    ]
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == ["tiny"]  # no DATA_DIR/CID copy
