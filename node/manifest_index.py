"""A parsed manifest kept beside the verified-file records, so a start does
not parse and check every manifest again.

Why: a seed of twenty 40,000-fragment models spent ~1 s a model at every
start reading 30 MB of JSON into dicts and checking each entry. The index
holds what parsing produced (the fragment columns of `FragmentTable` and the
top-level fields) in one `.npz` per model folder
(`DATA_DIR/.gguf-swarm/index/NAME.npz`), keyed by the model CID: it is used
only when the manifest's bytes on disk still hash to the CID it was made
from, so an edited manifest is parsed (and checked) again. Written after a
full check, with no pickled objects; any file that does not load cleanly is
ignored (and rewritten), never trusted in part.

A manifest of CHILD_PARSE_FROM bytes or more is parsed by a child process
(`python -m node.manifest_index`), which writes the index that the node then
loads. Why: parsing 30 MB of JSON costs ~90 MB of short-lived objects, which
CPython's allocator keeps from the OS once freed (a pull of a 40,960-fragment
model peaked at 254 MB, a seed's first start on 20 such models sat at 469 MB
against 360 MB after a restart); and a first start can parse on every core.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fragmenter.errors import FragmenterError, ManifestError
from fragmenter.fragment_table import FragmentTable
from fragmenter.manifest import MAX_MANIFEST_BYTES, Manifest, PartEntry, parse_manifest_bytes
from protocol.cid import cid_from_digest

log = logging.getLogger(__name__)
FORMAT = 1
CHILD_PARSE_FROM = 4 << 20  # ~5,000 fragments; below it a child's start-up (~0.2 s) costs more than it saves
_REJECTED = 3  # the child's exit status for a manifest it parsed and refused (its error on stderr)
_CHILD_SECONDS = 600.0


def save(path: Path, model_cid: str, manifest: Manifest) -> None:
    """Write the index of `manifest` (parsed from the bytes of `model_cid`). Never raises."""
    table = manifest.fragments
    if not isinstance(table, FragmentTable):
        return
    fields = {
        "format": FORMAT,
        "model_cid": model_cid,
        "raw": manifest.raw,
        "model_name": manifest.model_name,
        "header_size": manifest.header_size,
        "file_size": manifest.file_size,
        "file_sha256": manifest.file_sha256,
        "alignment": manifest.alignment,
        "extra_bytes": [[offset, base64.b64encode(data).decode("ascii")] for offset, data in manifest.extra_bytes],
        "block_size": manifest.block_size,
        "header_block_root": manifest.header_block_root,
        "parts": None
        if manifest.parts is None
        else [[p.file_name, p.offset, p.file_size, p.file_sha256] for p in manifest.parts],
    }
    arrays = table.to_arrays()
    arrays["fields"] = np.frombuffer(json.dumps(fields).encode("utf-8"), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # a cache: no fsync; a torn file fails to load and is rebuilt
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning("cannot save manifest index %s: %s", path, e)


def load(path: Path, model_cid: str) -> Manifest | None:
    """The manifest indexed at `path` if it was made from `model_cid`; else None."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        fields: dict[str, Any] = json.loads(arrays.pop("fields").tobytes())
        if fields.get("format") != FORMAT or fields.get("model_cid") != model_cid:
            return None
        parts = fields["parts"]
        return Manifest(
            raw=fields["raw"],
            model_name=fields["model_name"],
            fragments=FragmentTable.from_arrays(arrays),
            header_size=fields["header_size"],
            file_size=fields["file_size"],
            file_sha256=fields["file_sha256"],
            alignment=fields["alignment"],
            extra_bytes=[(offset, base64.b64decode(text)) for offset, text in fields["extra_bytes"]],
            block_size=fields["block_size"],
            header_block_root=fields["header_block_root"],
            parts=None if parts is None else tuple(PartEntry(*p) for p in parts),
        )
    except FileNotFoundError:
        return None
    except Exception as e:  # anything malformed: parse the manifest instead
        log.info("ignoring manifest index %s: %s", path, e)
        return None


def cid_of_file(source: BinaryIO) -> str:
    """The CID of a file's bytes from its start, read in chunks (no copy held)."""
    source.seek(0)
    digest = hashlib.sha256()
    while chunk := source.read(1 << 20):
        digest.update(chunk)
    return cid_from_digest(digest.digest())


def check_size(source: BinaryIO, where: str) -> int:
    """The size of a manifest file; ManifestError when it is over the cap."""
    size = os.fstat(source.fileno()).st_size
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{where}: manifest of {size} bytes is over the {MAX_MANIFEST_BYTES}-byte cap")
    return size


def parse(
    source: BinaryIO, model_cid: str, index_path: Path | None, where: str, pool: ParserPool | None = None
) -> Manifest:
    """The manifest in `source` (a file whose bytes hash to `model_cid`), parsed
    and checked, its index saved at `index_path` (None: none kept). Large
    ones are parsed by a child process (see above), one of `pool`'s when
    given (`where` is then the file's path); ManifestError, in the parser's
    own words, when it is refused either way."""
    size = check_size(source, where)
    if index_path is not None and size >= CHILD_PARSE_FROM:
        if pool is not None:
            manifest = _reply_to_manifest(pool.parse(where, model_cid, index_path), model_cid, index_path)
        else:
            manifest = _parse_in_child(source, model_cid, index_path, where)
        if manifest is not None:
            return manifest
    source.seek(0)
    data = source.read()
    if cid_from_digest(hashlib.sha256(data).digest()) != model_cid:
        raise ManifestError(f"{where}: the manifest changed while it was read")
    manifest = parse_manifest_bytes(data, where)
    del data
    if index_path is not None:
        save(index_path, model_cid, manifest)
    return manifest


def _parse_in_child(source: BinaryIO, model_cid: str, index_path: Path, where: str) -> Manifest | None:
    """The index a child process made of `source`, loaded; None when the child
    could not do the work (could not start, was killed, found other bytes):
    the caller parses in this process instead."""
    source.seek(0)
    cmd = [sys.executable, "-m", "node.manifest_index", model_cid, str(index_path), where]
    try:
        done = subprocess.run(cmd, stdin=source, capture_output=True, text=True, timeout=_CHILD_SECONDS)
    except (OSError, subprocess.SubprocessError) as e:
        log.info("manifest parser process failed (%s); parsing here", e)
        return None
    lines = done.stderr.strip().splitlines()
    return _reply_to_manifest((done.returncode, lines[-1] if lines else f"{where}: refused"), model_cid, index_path)


def _reply_to_manifest(reply: tuple[int, str] | None, model_cid: str, index_path: Path) -> Manifest | None:
    """A child's (status, message) made the manifest its index holds; raises its
    refusal; None when it gave no verdict (the caller parses in this process)."""
    if reply is None:
        return None
    status, message = reply
    if status == _REJECTED:
        raise ManifestError(message)
    manifest = load(index_path, model_cid) if status == 0 else None
    if manifest is None:
        log.info("manifest parser process ended with status %d (%s); parsing here", status, message[-300:])
    return manifest


class ParserPool:
    """Parser processes kept for a batch of manifests (a first start on a data
    dir of large models): each starts once, not once a manifest (~0.26 s of
    interpreter and imports each time). Worker threads borrow an idle one;
    at most `size` run. A process that fails is dropped (its job then has no
    verdict: the caller parses it itself)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._idle: queue.SimpleQueue[subprocess.Popen[str]] = queue.SimpleQueue()
        self._started: list[subprocess.Popen[str]] = []
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> ParserPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def parse(self, path: str, model_cid: str, index_path: Path) -> tuple[int, str] | None:
        """(status, message) of one manifest file parsed and indexed by a pool
        process, as `_child_main` reports it; None when no process could."""
        child = self._borrow()
        if child is None:
            return None
        try:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(json.dumps([path, model_cid, str(index_path), path]) + "\n")
            child.stdin.flush()
            # One reply line per job and nothing buffered between jobs: the pipe
            # itself says when the reply is there. A child stuck (stopped, swapping)
            # must not hold the node's indexing forever.
            if not select.select([child.stdout], [], [], _CHILD_SECONDS)[0]:
                raise TimeoutError(f"no reply in {_CHILD_SECONDS:.0f} s")
            status, message = json.loads(child.stdout.readline())
        except (OSError, ValueError) as e:
            log.info("manifest parser process failed (%s)", e)
            child.kill()
            child.wait()
            return None
        self._idle.put(child)
        return int(status), str(message)

    def _borrow(self) -> subprocess.Popen[str] | None:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._closed:
                return None
            if len(self._started) < self._size:
                try:
                    child = subprocess.Popen(
                        [sys.executable, "-m", "node.manifest_index", "--serve"],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                    )
                except OSError as e:
                    log.info("cannot start a manifest parser process (%s)", e)
                    return None
                self._started.append(child)
                return child
        try:
            return self._idle.get(timeout=_CHILD_SECONDS)
        except queue.Empty:
            return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            started, self._started = self._started, []
        for child in started:
            try:
                if child.stdin is not None:
                    child.stdin.close()  # end of jobs: it exits
                child.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                child.kill()
                child.wait()


def _parse_and_save(data: bytes, model_cid: str, index_path: str, where: str) -> tuple[int, str]:
    if cid_from_digest(hashlib.sha256(data).digest()) != model_cid:
        return 1, f"{where}: the manifest changed while it was read"  # no verdict: the caller reads it itself
    try:
        manifest = parse_manifest_bytes(data, where)
    except FragmenterError as e:
        return _REJECTED, str(e).replace("\n", " ")
    del data
    save(Path(index_path), model_cid, manifest)
    return 0, ""


def _child_main(argv: list[str]) -> int:
    """`python -m node.manifest_index CID INDEX_PATH WHERE` < manifest: parse and
    check the manifest on stdin and save its index; the error on stderr and
    status _REJECTED when it is refused. `--serve`: jobs [path, CID,
    INDEX_PATH, WHERE] as JSON lines on stdin, a [status, message] line for
    each on stdout, until stdin ends (ParserPool)."""
    if argv == ["--serve"]:
        for line in sys.stdin:
            path, model_cid, index_path, where = json.loads(line)
            try:
                with open(path, "rb") as f:
                    reply = _parse_and_save(f.read(MAX_MANIFEST_BYTES + 1), model_cid, index_path, where)
            except OSError as e:
                reply = (1, f"{where}: {e.strerror or e}")
            print(json.dumps(reply), flush=True)
        return 0
    model_cid, index_path, where = argv
    status, message = _parse_and_save(sys.stdin.buffer.read(MAX_MANIFEST_BYTES + 1), model_cid, index_path, where)
    if message:
        print(message, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
