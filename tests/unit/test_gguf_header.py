from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fragmenter as fr
from fragmenter import gguf_header
from fragmenter.gguf_header import WALK_AT_ONCE_FROM, GGUFArray, check_tensor_data, parse_header
from fragmenter.gguf_spec import GGUF_MAGIC, ValueType
from tests.gguf_factory import MIXED, set_version, write_model, write_vocab_only


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


# ---- what llama.cpp accepts (ggml/src/gguf.cpp, gguf_init_from_reader) ---------


def _raw_gguf(kvs: list[tuple[str, ValueType, bytes]], version: int = 3) -> bytes:
    """A tensorless GGUF built by hand: GGUFWriter cannot write repeated or empty keys."""
    out = GGUF_MAGIC + struct.pack("<IQQ", version, 0, len(kvs))
    for key, vtype, payload in kvs:
        raw = key.encode()
        out += struct.pack("<Q", len(raw)) + raw + struct.pack("<I", vtype) + payload
    return out


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


@pytest.mark.parametrize(
    "alignment, padded",
    # 2**31, the largest uint32 power of two, only unpadded: padded, the file would be 2 GiB.
    [(None, False), (None, True), (1, False), (1, True), (64, False), (64, True), (1 << 31, False)],
)
def test_no_tensors_with_or_without_padding(tmp_path: Path, alignment: int | None, padded: bool) -> None:
    data = write_vocab_only(tmp_path / "v.gguf", alignment, padded).read_bytes()
    h = parse_header(data)
    assert h.tensors == [] and h.alignment == (alignment or 32)
    # Whatever padding there is belongs to the header; reparsing the header alone agrees.
    assert h.data_start == len(data) and parse_header(data[: h.data_start]).data_start == h.data_start
    assert h.metadata["tokenizer.ggml.tokens"].strings()[2] == "<bos>"


def test_every_truncation_of_a_tensorless_file_is_a_format_error(tmp_path: Path) -> None:
    data = write_vocab_only(tmp_path / "v.gguf").read_bytes()
    for cut in range(len(data)):
        with pytest.raises(fr.GGUFFormatError, match="truncated|not a GGUF"):
            parse_header(data[:cut])


@pytest.mark.parametrize("alignment", [1, 32, 64])
def test_tensor_data_starts_at_the_aligned_offset(tmp_path: Path, alignment: int) -> None:
    data = write_model(tmp_path / "m.gguf", MIXED, alignment=alignment).read_bytes()
    h = parse_header(data)
    last = h.tensors[-1]
    end_of_infos = last.info_position + 8 + len(last.name) + 4 + 8 * len(last.dims) + 4 + 8
    assert h.alignment == alignment
    assert h.data_start == -(-end_of_infos // alignment) * alignment
    assert all((h.data_start + t.offset) % alignment == 0 for t in h.tensors)
    assert h.data_start + h.tensors[-1].offset + h.tensors[-1].n_bytes <= len(data)


def test_v2_parses_like_v3(tmp_path: Path) -> None:
    v3 = write_model(tmp_path / "m.gguf", MIXED).read_bytes()
    v2 = set_version(tmp_path / "m.gguf", 2).read_bytes()
    a, b = parse_header(v3), parse_header(v2)
    assert (a.version, b.version) == (3, 2)
    assert (a.tensors, a.data_start, a.metadata.keys()) == (b.tensors, b.data_start, b.metadata.keys())


@pytest.mark.parametrize(
    "version, message",
    [
        (1, "GGUF v1 is not supported"),
        (0, "unsupported GGUF version 0 "),
        (4, "unsupported GGUF version 4 "),
        (0x03000000, "a big-endian file?"),
    ],
)
def test_versions_llama_cpp_refuses(tmp_path: Path, version: int, message: str) -> None:
    path = set_version(write_vocab_only(tmp_path / "v.gguf"), version)
    with pytest.raises(fr.GGUFFormatError, match=re.escape(message)):
        parse_header(path.read_bytes())


@pytest.mark.parametrize(
    "vtype, payload, message",
    [
        (ValueType.UINT32, _u32(0), "general.alignment 0 is not a power of two"),
        (ValueType.UINT32, _u32(48), "general.alignment 48 is not a power of two"),
        (ValueType.INT32, _u32(64), "general.alignment must be a uint32, not int32"),
        (ValueType.UINT64, struct.pack("<Q", 64), "must be a uint32, not uint64"),
        (ValueType.BOOL, b"\x01", "must be a uint32, not bool"),
    ],
)
def test_alignments_llama_cpp_refuses(vtype: ValueType, payload: bytes, message: str) -> None:
    with pytest.raises(fr.GGUFFormatError, match=re.escape(message)):
        parse_header(_raw_gguf([("general.alignment", vtype, payload)]))


def test_repeated_and_empty_keys_are_refused() -> None:
    ok = parse_header(_raw_gguf([("a", ValueType.UINT32, _u32(1)), ("b", ValueType.UINT32, _u32(2))]))
    assert ok.metadata == {"a": 1, "b": 2} and ok.data_start == 4 + 4 + 16 + 2 * (8 + 1 + 4 + 4)
    with pytest.raises(fr.GGUFFormatError, match="duplicate metadata key 'a'"):
        parse_header(_raw_gguf([("a", ValueType.UINT32, _u32(1)), ("a", ValueType.UINT32, _u32(2))]))
    with pytest.raises(fr.GGUFFormatError, match="metadata key #0 is empty"):
        parse_header(_raw_gguf([("", ValueType.UINT32, _u32(1))]))


def test_counts_that_cannot_fit_are_refused_at_once(header_bytes: bytes) -> None:
    for n_tensors, n_kv in [(1 << 40, 1), (1, 1 << 60), ((1 << 64) - 1, 0)]:
        data = bytearray(header_bytes)
        data[8:24] = struct.pack("<QQ", n_tensors, n_kv)
        with pytest.raises(fr.GGUFFormatError, match="cannot fit in"):
            parse_header(bytes(data))


def test_cut_inside_the_padding_before_tensor_data(header_bytes: bytes) -> None:
    h = parse_header(header_bytes)
    last = h.tensors[-1]
    end_of_infos = last.info_position + 8 + len(last.name) + 4 + 8 * len(last.dims) + 4 + 8
    assert end_of_infos < h.data_start  # MIXED's header needs padding
    for cut in range(end_of_infos, h.data_start):
        with pytest.raises(fr.GGUFFormatError, match=f"ends at byte {cut}, before its tensor data"):
            parse_header(header_bytes[:cut])


def test_cut_before_the_tensor_data_is_refused(tmp_path: Path, header_bytes: bytes) -> None:
    # The header parses (it is whole), but llama.cpp's loader refuses the file.
    h = parse_header(header_bytes)
    with pytest.raises(fr.GGUFFormatError, match="runs past the end of the file .*: truncated"):
        check_tensor_data(h, len(header_bytes))
    full = write_model(tmp_path / "m.gguf", MIXED)
    check_tensor_data(parse_header(full.read_bytes()), full.stat().st_size)


def _plain(value: object) -> object:
    """A metadata value as something `==` compares whole (a flipped byte can make any type)."""
    if isinstance(value, GGUFArray):
        return value.strings() if value.element_type == ValueType.STRING else repr(value.values)
    return value


def _string_array(items: list[bytes]) -> bytes:
    payload = _u32(ValueType.STRING) + struct.pack("<Q", len(items))
    return payload + b"".join(struct.pack("<Q", len(b)) + b for b in items)


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(
        st.one_of(
            st.text().map(lambda s: s.encode("utf-8")),  # valid UTF-8, NULs and empty strings included
            st.binary(max_size=12),  # mostly invalid
        ),
        max_size=40,
    )
)
@example(items=[b"a\x00b", b""])  # a NUL inside an element
@example(items=[b"\xe2\x96", b"\x81"])  # a character cut across two elements
@example(items=[b"", b"\xff"])
def test_a_string_array_decodes_as_each_element_would(items: list[bytes]) -> None:
    """`strings()` decodes all elements at once when it can: the same list, every
    element valid or not, as decoding them one by one with replacement."""
    data = _raw_gguf([("tokenizer.ggml.tokens", ValueType.ARRAY, _string_array(items))])
    got = parse_header(data).metadata["tokenizer.ggml.tokens"].strings()
    assert got == [b.decode("utf-8", errors="replace") for b in items]


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(
        st.one_of(
            st.binary(max_size=6),
            st.binary(min_size=250, max_size=300),  # past the runs' 255 bytes
            st.just(b"\x00" * 9),  # text that looks like a length field
            st.just(bytes([3]) + b"\x00" * 7 + b"abc"),
        ),
        max_size=60,
    ),
    trimmed=st.integers(min_value=0, max_value=64),  # bytes cut off the end (the last key is 17)
    flip=st.one_of(st.none(), st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255))),
    window=st.sampled_from([8, 20, 64, 1 << 22]),  # bytes searched for runs at a time
)
def test_string_arrays_walked_in_runs_as_element_by_element(
    items: list[bytes], trimmed: int, flip: tuple[int, int] | None, window: int
) -> None:
    """The numpy walk of long string arrays (`_walk_strings`, here from the first
    element) finds what the plain walk finds, or fails as it does: on cut and
    corrupted headers too."""
    tokens = ("tokenizer.ggml.tokens", ValueType.ARRAY, _string_array(items))
    data = bytearray(_raw_gguf([tokens, ("x", ValueType.UINT32, _u32(7))]))
    if flip is not None:
        data[flip[0] % len(data)] = flip[1]
    data = data[: len(data) - trimmed]
    default_window = gguf_header._WINDOW

    def walk(threshold: int) -> object:
        gguf_header.WALK_AT_ONCE_FROM = threshold
        gguf_header._WINDOW = window
        try:
            h = parse_header(bytes(data))
        except fr.GGUFFormatError as e:
            return str(e)
        return [_plain(v) for v in h.metadata.values()], h.data_start

    try:
        assert walk(0) == walk(1 << 62)
    finally:
        gguf_header.WALK_AT_ONCE_FROM, gguf_header._WINDOW = WALK_AT_ONCE_FROM, default_window


def test_string_array_runs_cross_every_window_boundary() -> None:
    """Runs that meet the end of the window searched for them, at every offset."""
    items = [b"x" * (i % 13) for i in range(120)] + [b"y" * 300] + [b"z" * (i % 7) for i in range(60)]
    data = _raw_gguf([("tokenizer.ggml.tokens", ValueType.ARRAY, _string_array(items))])
    default_window = gguf_header._WINDOW
    try:
        for window in range(8, 80):
            gguf_header.WALK_AT_ONCE_FROM, gguf_header._WINDOW = 0, window
            got = parse_header(data).metadata["tokenizer.ggml.tokens"].strings()
            assert got == [b.decode() for b in items], window
    finally:
        gguf_header.WALK_AT_ONCE_FROM, gguf_header._WINDOW = WALK_AT_ONCE_FROM, default_window
