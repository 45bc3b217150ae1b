"""The dashboard (`--web`) of real nodes in one process, seen through Debian's
headless Chromium (driven by playwright, no browser of its own), and its
guards: the token for actions, loopback Host and bind addresses."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from gguf import GGMLQuantizationType as T

import fragmenter as fr
from node.host import NodeError
from node.node import Node, NodeConfig, open_node
from node.server import ServeLimits
from tests.gguf_factory import write_model
from tests.integration.test_cli_errors import assert_one_line_error, gguf_swarm
from tests.integration.test_cli_node import CLI, LISTEN
from tests.integration.test_swarm import LOOPBACK, model_folder
from tests.processes import terminate

CHROMIUM = shutil.which("chromium")
# What Chromium needs here: no sandbox (root), no GPU, and nothing that reaches out (the network is closed).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Written when missing, or again with GGUF_SWARM_DOCS_SCREENSHOT=1: a run does not leave the tree changed.
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
R = TypeVar("R")


def request(
    url: str, data: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a GET, or of a POST when `data` is given."""
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def web_config(data_dir: Path, bootstrap: list[str] | None = None, **kw: Any) -> NodeConfig:
    data_dir.mkdir(parents=True, exist_ok=True)
    return NodeConfig(data_dir, listen=LOOPBACK, bootstrap=bootstrap or [], web=("127.0.0.1", 0), **kw)


def split_url(node: Node) -> tuple[str, str]:
    """(base URL, token) of a node's dashboard."""
    assert node.dashboard_url is not None
    base, _, token = node.dashboard_url.partition("/#token=")
    assert base.startswith("http://127.0.0.1:") and len(token) >= 24
    return base, token


def layered_model(base: Path) -> Path:
    """~2 MB in 8 layers cut into 128 fragments of 16 KiB, in data dir `base`."""
    tensors = [(f"blk.{i}.ffn_up.weight", T.F32, (64, 1024)) for i in range(8)]
    model = write_model(base.parent / "layered.gguf", tensors, vocab=False)
    folder = base / "layered"
    fr.fragment_model(model, folder, chunk_size=16 * 1024)
    return folder


def non_loopback_addresses() -> list[str]:
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [a for a in out.split() if not a.startswith("127.") and a != "::1"]


# ---- the page, in a browser ------------------------------------------------------


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
async def test_the_page_shows_a_pull_as_it_runs(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright  # a test extra: missing is a failure, not a skip

    folder = layered_model(tmp_path / "seed")
    # B holds layers 0-3 only (a partial replica): A's map shows fragments with 2 holders and with 1.
    shutil.copytree(folder, tmp_path / "b" / folder.name)
    for entry in fr.read_manifest(folder).fragments:
        if int(entry.tensor_name.split(".")[1]) >= 4:
            (tmp_path / "b" / folder.name / entry.file_name).unlink()
    slow = ServeLimits(upload_rate=100_000)  # the pull takes seconds: the page is seen while it runs
    async with (
        open_node(web_config(tmp_path / "seed", serve=slow)) as seed,
        open_node(web_config(tmp_path / "b", seed.addrs()[:1], serve=slow)) as b,
        open_node(web_config(tmp_path / "a", seed.addrs()[:1] + b.addrs()[:1])) as a,
    ):
        model_cid = next(iter(seed.store.models))
        n = len(seed.store.models[model_cid].have)
        assert b.store.models[model_cid].have == [k < n // 2 for k in range(n)]
        url = a.dashboard_url
        assert url is not None

        def on_trio(fn: Callable[[], R]) -> R:
            return trio.from_thread.run_sync(fn)

        def held_by_a() -> int:
            model = a.store.models.get(model_cid)
            return 0 if model is None else sum(model.have)

        def browse() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 1360, "height": 660})
                    errors: list[str] = []
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    page.goto(url)
                    page.wait_for_selector("#live.on", timeout=10_000)
                    assert "#token=" not in page.url  # taken out of the address bar
                    # Start A's pull from the page, as a person would (the button sends the token).
                    page.fill("#pull-cid", model_cid)
                    page.click("#pull-form button")
                    page.wait_for_selector(f'#transfers tr[data-cid="{model_cid}"]', timeout=20_000)
                    card = f'#models .model[data-cid="{model_cid}"]'
                    page.wait_for_selector(card, timeout=20_000)
                    # Mid-pull: what the page shows against the node's own state.
                    page.wait_for_function(
                        f"""() => {{
                            const el = document.querySelector('{card} .held');
                            return el && Number(el.textContent) >= {n // 2} && Number(el.textContent) < {n};
                        }}""",
                        timeout=30_000,
                    )
                    page.wait_for_timeout(1000)  # a little more rate history for the graph
                    shown_held = int(page.text_content(f"{card} .held") or -1)
                    node_held = on_trio(held_by_a)
                    seen["mid"] = (shown_held, node_held)
                    seen["cid_text"] = page.text_content(f"{card} .cid")
                    seen["peers"] = page.eval_on_selector_all(
                        "#peers tr[data-peer]", "rows => rows.map(r => r.dataset.peer)"
                    )
                    seen["connected"] = on_trio(lambda: {str(p) for p in a.connected_peers()})
                    seen["transfer"] = page.text_content(f'#transfers tr[data-cid="{model_cid}"]')
                    seen["map_height"] = page.eval_on_selector(f"{card} canvas.map", "c => c.height")
                    shot = page.screenshot(full_page=True)
                    (tmp_path / "dashboard-mid-pull.png").write_bytes(shot)
                    if os.environ.get("GGUF_SWARM_DOCS_SCREENSHOT") or not DOCS_SCREENSHOT.exists():
                        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
                        DOCS_SCREENSHOT.write_bytes(shot)  # the README's picture (not rewritten on every run)
                    # The end of the pull, as the page shows it.
                    page.wait_for_function(
                        f"() => document.querySelector('{card} .held')?.textContent === '{n}'", timeout=60_000
                    )
                    page.wait_for_selector(f'#transfers tr[data-cid="{model_cid}"]', state="detached", timeout=10_000)
                    seen["end"] = (page.text_content(f"{card} .held"), page.text_content(f"{card} .missing"))
                    seen["events"] = page.eval_on_selector_all("#events li", "items => items.map(i => i.textContent)")
                    page.screenshot(path=str(tmp_path / "dashboard-done.png"), full_page=True)
                    seen["errors"] = errors
                finally:
                    browser.close()
            return seen

        with trio.fail_after(150):
            seen = await trio.to_thread.run_sync(browse)
        final = a.store.models[model_cid]
        assert final.complete and sum(final.have) == n

    shown_held, node_held = seen["mid"]
    assert n // 2 <= shown_held < n and shown_held <= node_held  # the page is at most a second behind, never ahead
    assert seen["cid_text"] == model_cid
    assert str(seed.peer_id) in seen["peers"] and str(b.peer_id) in seen["peers"]
    assert set(seen["peers"]) <= seen["connected"] | {str(seed.peer_id), str(b.peer_id)}
    assert "layered" in seen["transfer"] and "%" in seen["transfer"]
    assert seen["map_height"] > 0
    assert seen["end"] == (str(n), "0 missing")
    assert any("pulled" in e for e in seen["events"]) and any("started from the dashboard" in e for e in seen["events"])
    assert seen["errors"] == []
    assert (tmp_path / "dashboard-mid-pull.png").stat().st_size > 10_000


# ---- guards (no browser needed) ------------------------------------------------------


async def test_actions_need_the_token_and_a_loopback_host(tmp_path: Path) -> None:
    _, folder = model_folder(tmp_path / "seed")
    _, outside = model_folder(tmp_path / "elsewhere", name="linked")
    (tmp_path / "seed" / "linked").symlink_to(outside, target_is_directory=True)  # served, never deleted
    async with open_node(web_config(tmp_path / "seed")) as node:
        base, token = split_url(node)
        (model_cid,) = [cid for cid, m in node.store.models.items() if m.folder == folder]
        (linked_cid,) = [cid for cid in node.store.models if cid != model_cid]
        port = base.rsplit(":", 1)[1]

        def call(*args: Any, **kw: Any) -> Callable[[], tuple[int, dict[str, Any]]]:
            return lambda: request(*args, **kw)

        remove = f"{base}/api/remove"
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token"},
            {"Authorization": f"Bearer {token}x"},
            {"Authorization": token},  # not as a bearer token
            {"Authorization": f"Bearer {token}", "Host": "evil.example"},  # DNS rebinding: refused before the token
            {"Authorization": f"Bearer {token}", "Host": f"evil.example:{port}"},
            {"Authorization": f"Bearer {token}", "Origin": "http://evil.example"},  # another page's script
        ):
            status, body = await trio.to_thread.run_sync(call(remove, {"cid": model_cid}, headers))
            assert status in (401, 403), (headers, status, body)
            assert model_cid in node.store.models and (folder / "manifest.json").exists()
        for headers in ({}, {"Authorization": "Bearer nope"}):
            status, _ = await trio.to_thread.run_sync(call(f"{base}/api/pull", {"cid": linked_cid}, headers))
            assert status == 401
        assert not node.swarms and [e.kind for e in node.events] == []  # no pull started
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example"):
            status, _ = await trio.to_thread.run_sync(call(f"{base}/api/state", headers={"Host": host}))
            assert status == 403, host
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
            status, state = await trio.to_thread.run_sync(call(f"{base}/api/state", headers={"Host": host}))
            assert status == 200 and model_cid in [m["cid"] for m in state["models"]]
        status, _ = await trio.to_thread.run_sync(call(f"{base}/api/remove"))  # a GET changes nothing
        assert status == 405 and model_cid in node.store.models
        status, body = await trio.to_thread.run_sync(
            call(remove, {"cid": "bafkreinotacid"}, {"Authorization": f"Bearer {token}"})
        )
        assert status == 400
        status, body = await trio.to_thread.run_sync(
            call(remove, {"cid": linked_cid}, {"Authorization": f"Bearer {token}"})
        )
        assert status == 403 and "symlink" in body["error"]
        assert linked_cid in node.store.models and (outside / "manifest.json").exists()
        # With the token: removed, folder and all; nothing else in the data dir touched.
        other = tmp_path / "seed" / "notes.txt"
        other.write_text("keep me")
        status, body = await trio.to_thread.run_sync(
            call(remove, {"cid": model_cid}, {"Authorization": f"Bearer {token}"})
        )
        assert status == 200 and body["removed"] == str(folder)
        assert model_cid not in node.store.models and not folder.exists() and other.read_text() == "keep me"
        assert [e.kind for e in node.events].count("removed") == 1
        status, _ = await trio.to_thread.run_sync(
            call(remove, {"cid": model_cid}, {"Authorization": f"Bearer {token}"})
        )
        assert status == 404
        # Not reachable on the machine's other addresses.
        for address in non_loopback_addresses():
            with pytest.raises(OSError):
                socket.create_connection((address, int(port)), timeout=2).close()


async def test_a_non_loopback_bind_is_refused(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.168.1.2"):
        with pytest.raises((NodeError, BaseExceptionGroup)) as caught:
            async with open_node(NodeConfig(tmp_path / "d", listen=LOOPBACK, web=(host, 0))):
                pass
        assert "loopback" in str(caught.value) or caught.group_contains(NodeError)


async def test_event_streams_are_bounded(tmp_path: Path) -> None:
    async with open_node(web_config(tmp_path / "d")) as node:
        base, _ = split_url(node)
        host, port = base.removeprefix("http://").rsplit(":", 1)
        streams: list[trio.SocketStream] = []
        try:
            for _ in range(8):
                stream = await trio.open_tcp_stream(host, int(port))
                await stream.send_all(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                first = await stream.receive_some(4096)
                assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first
                streams.append(stream)
            with trio.fail_after(5):
                data = b""
                while b"data: {" not in data:
                    data += await streams[0].receive_some(1 << 16)  # a snapshot arrives on an open stream
            status, body = await trio.to_thread.run_sync(lambda: request(f"{base}/api/events"))
            assert status == 503 and "too many" in body["error"]
        finally:
            for stream in streams:
                await stream.aclose()
        with trio.fail_after(10):
            while True:  # the slots come back once the pages are gone
                status, _ = await trio.to_thread.run_sync(lambda: request(f"{base}/api/state"))
                assert status == 200
                stream = await trio.open_tcp_stream(host, int(port))
                await stream.send_all(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                first = await stream.receive_some(4096)
                await stream.aclose()
                if first.startswith(b"HTTP/1.1 200"):
                    break
                await trio.sleep(0.2)


def test_cli_prints_the_dashboard_and_refuses_other_addresses(tmp_path: Path) -> None:
    proc = gguf_swarm("seed", "--data-dir", str(tmp_path / "d"), *LISTEN, "--web", "0.0.0.0:8080")
    assert_one_line_error(proc, "loopback only")
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "d"}"\nweb = "127.0.0.1:0"\n')
    proc2 = subprocess.Popen(
        [*CLI, "seed", "--config", str(config), *LISTEN, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc2.stdout is not None
        seen: dict[str, dict[str, Any]] = {}
        for line in proc2.stdout:
            event = json.loads(line)
            seen[event["event"]] = event
            if event["event"] == "dashboard":
                break
        assert "dashboard" in seen, proc2.stderr.read() if proc2.poll() is not None else seen
        url = seen["dashboard"]["url"]
        assert url.startswith("http://127.0.0.1:") and "/#token=" in url
        status, state = request(url.split("/#")[0] + "/api/state")
        assert status == 200 and state["node"]["peer_id"] == seen["listening"]["peer_id"]
    finally:
        terminate(proc2)
    assert proc2.returncode == 0
