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
"""

from __future__ import annotations

import base64
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fragmenter.fragment_table import FragmentTable
from fragmenter.manifest import Manifest, PartEntry

log = logging.getLogger(__name__)
FORMAT = 1


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
