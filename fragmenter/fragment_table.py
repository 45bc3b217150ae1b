"""A manifest's fragment list, held as columns.

Why: a seed holds twenty models of ~40,000 fragments each. As one
`FragmentEntry` per fragment (three 64-hex strings, an id, five ints) that was
~600 bytes a fragment, 25 MB a model; as columns (digests as raw bytes, numbers
in arrays, tensor fields once per tensor) it is ~190 bytes. Entries are built
when read, so code that indexes or iterates the list sees the same
`FragmentEntry` values as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, overload

import numpy as np

if TYPE_CHECKING:
    from .manifest import FragmentEntry

_NONE = bytes(32)


class FragmentTable(Sequence["FragmentEntry"]):
    def __init__(self, entries: Sequence[FragmentEntry]) -> None:
        n = len(entries)
        self._ids = [e.fragment_id for e in entries]
        tensors: dict[tuple[str, str, tuple[int, ...], int], int] = {}
        keys = ((e.tensor_name, e.tensor_type, e.shape, e.total_shards) for e in entries)
        self._tensor = np.fromiter((tensors.setdefault(k, len(tensors)) for k in keys), dtype=np.int32, count=n)
        self._tensors = list(tensors)
        self._numbers = np.array(
            [(e.shard_index, e.size, e.file_offset, e.data_offset) for e in entries], dtype=np.int64
        ).reshape(n, 4)
        self._checksums = bytes.fromhex("".join(e.checksum for e in entries))
        self._sha = b"".join(bytes.fromhex(e.sha256) if e.sha256 is not None else _NONE for e in entries)
        self._has_sha = np.fromiter((e.sha256 is not None for e in entries), dtype=bool, count=n)
        self._root = b"".join(bytes.fromhex(e.block_root) if e.block_root is not None else _NONE for e in entries)
        self._has_root = np.fromiter((e.block_root is not None for e in entries), dtype=bool, count=n)

    # ---- as arrays (the node's index cache, node/manifest_index.py) ----------

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "ids": np.frombuffer("\n".join(self._ids).encode("utf-8"), dtype=np.uint8),
            "tensors": np.frombuffer(json.dumps([list(t) for t in self._tensors]).encode("utf-8"), dtype=np.uint8),
            "tensor": self._tensor,
            "numbers": self._numbers,
            "checksums": np.frombuffer(self._checksums, dtype=np.uint8),
            "sha": np.frombuffer(self._sha, dtype=np.uint8),
            "has_sha": self._has_sha,
            "root": np.frombuffer(self._root, dtype=np.uint8),
            "has_root": self._has_root,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> FragmentTable:
        """The table `to_arrays` saved; ValueError when the arrays do not fit together."""
        table = cls.__new__(cls)
        ids = arrays["ids"].tobytes().decode("utf-8")
        table._ids = ids.split("\n") if ids else []
        n = len(table._ids)
        table._tensors = [
            (str(a), str(b), tuple(int(d) for d in c), int(e)) for a, b, c, e in json.loads(arrays["tensors"].tobytes())
        ]
        table._tensor = arrays["tensor"].astype(np.int32)
        table._numbers = arrays["numbers"].astype(np.int64).reshape(n, 4)
        table._checksums = arrays["checksums"].tobytes()
        table._sha = arrays["sha"].tobytes()
        table._has_sha = arrays["has_sha"].astype(bool)
        table._root = arrays["root"].tobytes()
        table._has_root = arrays["has_root"].astype(bool)
        sizes_ok = (
            len(table._tensor) == len(table._has_sha) == len(table._has_root) == n
            and len(table._checksums) == 8 * n
            and len(table._sha) == len(table._root) == 32 * n
        )
        if not sizes_ok or (n and not 0 <= int(table._tensor.min()) <= int(table._tensor.max()) < len(table._tensors)):
            raise ValueError("fragment table arrays do not fit together")
        return table

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def total_size(self) -> int:
        return int(self._numbers[:, 1].sum())

    # Whole columns, for code that walks every fragment (indexing a data dir)
    # without building an entry for each.

    def file_names(self) -> list[str]:
        return [fid + ".dat" for fid in self._ids]

    def sizes(self) -> list[int]:
        return self._numbers[:, 1].tolist()  # type: ignore[no-any-return]

    def sha256_digests(self) -> tuple[bytes, list[bool]]:
        """Every fragment's SHA-256, 32 bytes each (zeros where the manifest has
        only a checksum prefix), and which are real."""
        return self._sha, self._has_sha.tolist()

    def has_block_roots(self) -> list[bool]:
        return self._has_root.tolist()  # type: ignore[no-any-return]

    def block_roots(self) -> list[str | None]:
        text = self._root.hex()
        return [text[64 * i : 64 * i + 64] if has else None for i, has in enumerate(self._has_root.tolist())]

    @overload
    def __getitem__(self, index: int) -> FragmentEntry: ...

    @overload
    def __getitem__(self, index: slice) -> list[FragmentEntry]: ...

    def __getitem__(self, index: int | slice) -> FragmentEntry | list[FragmentEntry]:
        if isinstance(index, slice):
            return [self._entry(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("fragment index out of range")
        return self._entry(index)

    def __eq__(self, other: object) -> bool:  # like the list it stands for
        if isinstance(other, FragmentTable | list | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a list's equality, a list's unhashability

    def __iter__(self) -> Iterator[FragmentEntry]:
        return (self._entry(i) for i in range(len(self)))

    def _entry(self, i: int) -> FragmentEntry:
        from .manifest import FragmentEntry  # here: manifest.py imports this module

        name, tensor_type, shape, total_shards = self._tensors[self._tensor[i]]
        shard, size, file_offset, data_offset = self._numbers[i].tolist()
        return FragmentEntry(
            fragment_id=self._ids[i],
            tensor_name=name,
            tensor_type=tensor_type,
            shape=shape,
            shard_index=shard,
            total_shards=total_shards,
            size=size,
            file_offset=file_offset,
            data_offset=data_offset,
            checksum=self._checksums[8 * i : 8 * i + 8].hex(),
            sha256=self._sha[32 * i : 32 * i + 32].hex() if self._has_sha[i] else None,
            block_root=self._root[32 * i : 32 * i + 32].hex() if self._has_root[i] else None,
        )
