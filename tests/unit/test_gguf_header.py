from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fragmenter as fr
from fragmenter.gguf_header import parse_header
from tests.gguf_factory import MIXED, write_model


@pytest.fixture(scope="module")
def header_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = write_model(tmp_path_factory.mktemp("h") / "m.gguf", MIXED)
    data = path.read_bytes()
    return data[: parse_header(data).data_start]


def test_parses_what_gguf_py_wrote(header_bytes: bytes) -> None:
    h = parse_header(header_bytes)
    assert h.version == 3 and h.alignment == 32 and h.data_start == len(header_bytes)
    assert [t.name for t in h.tensors] == [name for name, _, _ in MIXED]
    assert h.metadata["llama.block_count"] == 2
    assert h.metadata["tokenizer.ggml.tokens"].strings()[2] == "<bos>"


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(min_value=0, max_value=4000))
def test_every_truncation_is_a_format_error(header_bytes: bytes, cut: int) -> None:
    cut = min(cut, len(header_bytes) - 1)
    with pytest.raises(fr.GGUFFormatError):
        parse_header(header_bytes[:cut])


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_corrupt_bytes_never_raise_anything_else(header_bytes: bytes, pos: int, value: int) -> None:
    data = bytearray(header_bytes)
    data[pos % len(data)] = value
    try:
        parse_header(bytes(data))
    except fr.GGUFFormatError:
        pass


def test_unknown_version_is_refused(header_bytes: bytes) -> None:
    data = bytearray(header_bytes)
    data[4:8] = struct.pack("<I", 7)
    with pytest.raises(fr.GGUFFormatError, match="unsupported GGUF version 7"):
        parse_header(bytes(data))
