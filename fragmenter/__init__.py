"""GGUF file <-> fragment folder: fragment, verify, assemble, rebuild the
manifest, write tokenizer files, load and validate tensors.

Pure Python and synchronous; knows nothing of the network.
"""

from .assemble import AssembleResult, assemble
from .errors import FragmenterError, FragmentError, GGUFFormatError, ManifestError
from .folder import FragmentFolder, VerifyReport, open_folder, verify_folder
from .fragment import DEFAULT_CHUNK_SIZE, FragmentResult, fragment_model
from .gguf_header import GGUFHeader, TensorInfo, parse_header
from .manifest import FORMAT, HEADER_NAME, MANIFEST_NAME, FragmentEntry, Manifest, parse_manifest, read_manifest
from .rebuild import rebuild_manifest
from .tensors import ValidateReport, load_tensor, validate_folder
from .tokenizer import write_tokenizer_files

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
