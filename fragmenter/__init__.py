"""GGUF file <-> fragment folder: fragment, verify, assemble, rebuild the
manifest, write tokenizer files, load and validate tensors.

Pure Python and synchronous; knows nothing of the network.

The names below load their module on first use (PEP 562): `python -m
fragmenter.build_tokenizer` and a node that only moves fragments import what
they use, not the assembler and the tensor loader (~50 ms a start).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# Before numpy loads: OpenBLAS's thread pool cost 0.075 s of CPU at every
# import (0.16 -> 0.09 s, farm-bench), and nothing here multiplies matrices.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

if TYPE_CHECKING:
    from .assembly import AssembleResult, assemble
    from .errors import FragmenterError, FragmentError, GGUFFormatError, ManifestError
    from .folder import FragmentFolder, VerifyReport, open_folder, verify_folder
    from .fragment import DEFAULT_CHUNK_SIZE, FragmentResult, fragment_model
    from .gguf_header import GGUFHeader, TensorInfo, parse_header
    from .manifest import FORMAT, HEADER_NAME, MANIFEST_NAME, FragmentEntry, Manifest, parse_manifest, read_manifest
    from .rebuild import rebuild_manifest
    from .tensors import ValidateReport, load_tensor, validate_folder
    from .tokenizer import write_tokenizer_files

_HOMES = {
    "AssembleResult": "assembly",
    "assemble": "assembly",
    "FragmenterError": "errors",
    "FragmentError": "errors",
    "GGUFFormatError": "errors",
    "ManifestError": "errors",
    "FragmentFolder": "folder",
    "VerifyReport": "folder",
    "open_folder": "folder",
    "verify_folder": "folder",
    "DEFAULT_CHUNK_SIZE": "fragment",
    "FragmentResult": "fragment",
    "fragment_model": "fragment",
    "GGUFHeader": "gguf_header",
    "TensorInfo": "gguf_header",
    "parse_header": "gguf_header",
    "FORMAT": "manifest",
    "HEADER_NAME": "manifest",
    "MANIFEST_NAME": "manifest",
    "FragmentEntry": "manifest",
    "Manifest": "manifest",
    "parse_manifest": "manifest",
    "read_manifest": "manifest",
    "rebuild_manifest": "rebuild",
    "ValidateReport": "tensors",
    "load_tensor": "tensors",
    "validate_folder": "tensors",
    "write_tokenizer_files": "tokenizer",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT",
    "HEADER_NAME",
    "MANIFEST_NAME",
    "AssembleResult",
    "FragmentEntry",
    "FragmentError",
    "FragmentFolder",
    "FragmentResult",
    "FragmenterError",
    "GGUFFormatError",
    "GGUFHeader",
    "Manifest",
    "ManifestError",
    "TensorInfo",
    "ValidateReport",
    "VerifyReport",
    "assemble",
    "fragment_model",
    "load_tensor",
    "open_folder",
    "parse_header",
    "parse_manifest",
    "read_manifest",
    "rebuild_manifest",
    "validate_folder",
    "verify_folder",
    "write_tokenizer_files",
]
