"""Tensors for executors: a tensor by name, as a dequantized numpy array,
from a fragment folder or from a running node that fetches (and verifies)
the fragments it lacks from the swarm.

    async with open_node(config) as node:             # trio-native
        w = await get_tensor(node, model_cid, "blk.3.attn_q.weight")

    with SyncNode(config) as node:                    # the same, from plain Python
        w = node.get_tensor(model_cid, "blk.3.attn_q.weight")

    w = read_tensor("models/gemma", "blk.3.attn_q.weight")   # a local folder, no network

Values are float32 in numpy's order of the GGUF shape (`gguf.quants.dequantize`).
Every fragment is checked against the manifest's SHA-256 as it is read.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import numpy as np
import trio

from fragmenter import load_tensor
from fragmenter.selection import Selection

from .host import NodeError
from .node import Node, NodeConfig, open_node
from .pull import PullOptions, pull_model

__all__ = ["SyncNode", "get_tensor", "read_tensor", "tensor_names"]
log = logging.getLogger(__name__)

T = TypeVar("T")


def read_tensor(folder: Path | str, name: str) -> np.ndarray:
    """One tensor from a local fragment folder (a partial one will do, if it holds the tensor)."""
    return load_tensor(folder, name)


def tensor_names(node: Node, model_cid: str) -> list[str]:
    """The tensors of a model the node knows (has the manifest of), in file order."""
    model = node.store.models.get(model_cid)
    if model is None:
        raise NodeError(f"no manifest of model {model_cid} on this node (pull it, or part of it, first)")
    return list(dict.fromkeys(f.tensor_name for f in model.manifest.fragments))


async def get_tensor(node: Node, model_cid: str, name: str, options: PullOptions | None = None) -> np.ndarray:
    """One tensor of a model, dequantized; its fragments (and the manifest and
    header, if new to this node) are pulled first when they are not local."""
    model = node.store.models.get(model_cid)
    if model is not None and all(f.tensor_name != name for f in model.manifest.fragments):
        raise NodeError(f"no tensor named {name!r} in model {model_cid}")
    if not _holds(node, model_cid, name):
        opts = options or PullOptions()
        opts.selection = Selection(tensors=(_literal_glob(name),))
        await pull_model(node, model_cid, opts)
    model = node.store.models[model_cid]
    return await trio.to_thread.run_sync(load_tensor, model.folder, name)


def _holds(node: Node, model_cid: str, name: str) -> bool:
    model = node.store.models.get(model_cid)
    if model is None or not model.header_present:
        return False
    held = [h for f, h in zip(model.manifest.fragments, model.have, strict=True) if f.tensor_name == name]
    return bool(held) and all(held)


def _literal_glob(name: str) -> str:
    """A glob that matches exactly `name` (tensor names are plain, but never trust that)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class SyncNode:
    """A node running on a thread of its own, for callers that are not trio
    code: each method blocks until the node's trio loop has done the work."""

    def __init__(self, config: NodeConfig) -> None:
        self._config = config
        self._token: trio.lowlevel.TrioToken | None = None
        self._node: Node | None = None
        self._stop: trio.Event | None = None
        self._started: queue.Queue[BaseException | None] = queue.Queue()
        self._crash: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="gguf-swarm-node", daemon=True)

    def __enter__(self) -> SyncNode:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        self._thread.start()
        error = self._started.get()
        if error is not None:
            raise error

    def close(self) -> None:
        with self._lock:
            token, self._token = self._token, None
        if token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=token)
            except trio.RunFinishedError:
                pass  # the node's loop already ended (it crashed: _call reports why)
            self._thread.join()

    def addrs(self) -> list[str]:
        """Where peers reach this node (multiaddrs with /p2p/ id)."""
        return self._call(lambda node: _async(node.addrs))

    def model_cids(self) -> list[str]:
        """The models this node holds, whole or in part."""
        return self._call(lambda node: _async(lambda: list(node.store.models)))

    def get_tensor(self, model_cid: str, name: str) -> np.ndarray:
        return self._call(lambda node: get_tensor(node, model_cid, name))

    def tensor_names(self, model_cid: str) -> list[str]:
        return self._call(lambda node: _async(tensor_names, node, model_cid))

    def _call(self, work: Callable[[Node], Awaitable[T]]) -> T:
        token, node = self._token, self._node
        if token is None or node is None:
            raise NodeError("the node is not running")

        async def run() -> T:
            return await work(node)

        try:
            return trio.from_thread.run(run, trio_token=token)
        except trio.RunFinishedError:
            raise NodeError(f"the node stopped: {self._crash!r}" if self._crash else "the node stopped") from None

    def _run(self) -> None:
        async def main() -> None:
            async with open_node(self._config) as node:
                self._node = node
                self._stop = trio.Event()
                self._token = trio.lowlevel.current_trio_token()
                self._started.put(None)
                await self._stop.wait()

        try:
            trio.run(main)
        except BaseException as e:
            if self._token is None and self._node is None:
                self._started.put(e)  # start() is waiting for it
            else:
                self._crash = e  # later calls say why the node is gone
                log.error("node thread ended: %r", e)


async def _async(fn: Callable[..., T], *args: object) -> T:
    return fn(*args)
