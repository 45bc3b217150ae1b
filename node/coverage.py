"""Who holds which layers of a model: the map behind `gguf-swarm where`.

Pure: the caller collects, per peer, which fragments it holds (a list of bools
in manifest order) and this module turns that into rows of layers x peers with
the copy count of each row, a terminal picture and a JSON dict. Distributed
inference places whole layer ranges on nodes, so rows merge consecutive layers
that the same peers hold in the same way: a 60-layer model over 8 nodes reads
as about one row per node.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fragmenter.manifest import Manifest
from fragmenter.progress import human_bytes
from fragmenter.selection import EMBEDDINGS, OTHER, OUTPUT, tensor_group

FULL = "██"
PARTIAL = "▒▒"
NONE = "··"

_RED = "\x1b[31m"
_YELLOW = "\x1b[33m"
_GREEN = "\x1b[32m"
_DIM = "\x1b[2m"
_RESET = "\x1b[0m"

# Row order of the non-layer groups around the layers.
_BEFORE = (EMBEDDINGS,)
_AFTER = (OUTPUT, OTHER)


@dataclass(frozen=True)
class CoverageRow:
    label: str  # "layer 3", "layers 0-5", "embeddings", "output", "other"
    first_layer: int | None  # None for the non-layer rows
    last_layer: int | None
    fragments: int
    bytes: int
    copies: int  # min over the row's fragments of the peers holding it: the row's weakest point
    held: dict[str, float]  # peer -> fraction of the row's bytes it holds; only peers holding > 0

    def fraction(self, peer: str) -> float:
        return self.held.get(peer, 0.0)


@dataclass(frozen=True)
class Coverage:
    peers: list[str]  # column order: by first row held, then by id
    rows: list[CoverageRow]
    fragment_copies: list[int]  # per fragment, manifest order
    header_copies: int | None = None  # peers holding the GGUF header; None when not asked

    def under(self, min_copies: int) -> list[CoverageRow]:
        """Rows some fragment of which has fewer than `min_copies` holders."""
        return [r for r in self.rows if r.copies < min_copies]

    def fragments_under(self, min_copies: int) -> int:
        return sum(c < min_copies for c in self.fragment_copies)

    @property
    def fragments_lost(self) -> int:
        """Fragments no peer holds: the model cannot be assembled from this swarm."""
        return sum(c == 0 for c in self.fragment_copies)

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)


@dataclass
class _Acc:
    """One row being built: its fragments' indices and each peer's held bytes."""

    group: int | str
    first: int | None
    last: int | None
    indices: list[int] = field(default_factory=list)
    size: int = 0
    held_bytes: dict[str, int] = field(default_factory=dict)
    held_count: dict[str, int] = field(default_factory=dict)

    def fractions(self) -> dict[str, float]:
        # Zero-byte rows (possible in principle) fall back to fragment counts.
        if self.size:
            return {p: b / self.size for p, b in self.held_bytes.items() if b}
        return {p: n / len(self.indices) for p, n in self.held_count.items() if n}


def coverage(
    manifest: Manifest,
    holdings: Mapping[str, Sequence[bool]],
    header_holders: Collection[str] | None = None,
) -> Coverage:
    """The coverage of `manifest` by peers whose `holdings[peer][i]` says they
    hold fragment i (manifest order). `header_holders`, when given, are the
    peers holding the GGUF header (needed too to assemble the model)."""
    frags = manifest.fragments
    n = len(frags)
    held: dict[str, list[bool]] = {}
    for peer, bits in holdings.items():
        if len(bits) != n:
            raise ValueError(f"holdings of peer {peer} cover {len(bits)} fragments, the manifest has {n}")
        held[peer] = [bool(b) for b in bits]
    copies = [sum(bits[i] for bits in held.values()) for i in range(n)]

    groups: dict[int | str, _Acc] = {}
    for i, f in enumerate(frags):
        g = tensor_group(f.tensor_name)
        acc = groups.get(g)
        if acc is None:
            layer = g if isinstance(g, int) else None
            acc = groups[g] = _Acc(g, layer, layer)
        acc.indices.append(i)
        acc.size += f.size
        for peer, bits in held.items():
            if bits[i]:
                acc.held_bytes[peer] = acc.held_bytes.get(peer, 0) + f.size
                acc.held_count[peer] = acc.held_count.get(peer, 0) + 1

    layers = sorted(g for g in groups if isinstance(g, int))
    merged: list[_Acc] = [groups[g] for g in _BEFORE if g in groups]
    prev: _Acc | None = None
    for layer in layers:
        acc = groups[layer]
        if (
            prev is not None
            and prev.last is not None
            and prev.last + 1 == layer
            and prev.fractions() == acc.fractions()
            and _min_copies(prev, copies) == _min_copies(acc, copies)
        ):
            prev.last = layer
            prev.indices += acc.indices
            prev.size += acc.size
            for p, b in acc.held_bytes.items():
                prev.held_bytes[p] = prev.held_bytes.get(p, 0) + b
            for p, c in acc.held_count.items():
                prev.held_count[p] = prev.held_count.get(p, 0) + c
            continue
        merged.append(acc)
        prev = acc
    merged += [groups[g] for g in _AFTER if g in groups]

    rows = [
        CoverageRow(
            label=_label(acc),
            first_layer=acc.first,
            last_layer=acc.last,
            fragments=len(acc.indices),
            bytes=acc.size,
            copies=_min_copies(acc, copies),
            held=acc.fractions(),
        )
        for acc in merged
    ]
    first_row = {p: next((k for k, r in enumerate(rows) if p in r.held), len(rows)) for p in held}
    peers = sorted(held, key=lambda p: (first_row[p], p))
    header = None if header_holders is None else len(set(header_holders))
    return Coverage(peers, rows, copies, header)


def _min_copies(acc: _Acc, copies: list[int]) -> int:
    return min(copies[i] for i in acc.indices)


def _label(acc: _Acc) -> str:
    if acc.first is None:
        return str(acc.group)
    if acc.first == acc.last:
        return f"layer {acc.first}"
    return f"layers {acc.first}-{acc.last}"


def short_id(peer: str) -> str:
    """The last 6 characters: libp2p ids share their `12D3KooW` prefix."""
    return peer[-6:]


def column_name(k: int) -> str:
    """A, B, ..., Z, AA, AB, ...: column headers that fit a 2-character cell."""
    name = ""
    k += 1
    while k:
        k, r = divmod(k - 1, 26)
        name = chr(ord("A") + r) + name
    return name


def _copies_word(n: int) -> str:
    return "copy" if n == 1 else "copies"


def render(cov: Coverage, *, min_copies: int = 1, color: bool = False, width: int = 100) -> str:
    """A terminal picture of `cov`: one line per row, a cell per peer (full,
    partial or none), the copy count, the size and a flag on rows with fewer
    than `min_copies` copies; then a legend of the columns and a summary.
    Peers beyond `width` are left out (a `+N more` column counts them) but
    still count in every copy count."""

    def paint(text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if color and code else text

    def status(copies: int) -> str:
        if copies == 0:
            return _RED
        return _YELLOW if copies < min_copies else _GREEN

    label_w = max([len("layers"), *(len(r.label) for r in cov.rows)])
    copies_w = len("copies")
    size_w = max([len("size"), *(len(human_bytes(r.bytes)) for r in cov.rows)])
    flag_w = len(f"  ! under {min_copies} copies (lost)")
    fixed = label_w + 1 + 2 + copies_w + 2 + size_w + flag_w

    peers = cov.peers
    shown = peers
    more = ""
    if fixed + 3 * len(peers) > width:
        more = f"+{len(peers)} more"  # the widest the note can be
        fit = max(1, (width - fixed - len(more) - 1) // 3)
        shown = peers[:fit]
        more = f"+{len(peers) - len(shown)} more"
    hidden = peers[len(shown) :]

    lines = []
    head = "layers".ljust(label_w) + " " + "".join(f" {column_name(k):<2}" for k in range(len(shown)))
    if more:
        head += " " + more
    head += "  " + "copies".rjust(copies_w) + "  " + "size".rjust(size_w)
    lines.append(head.rstrip())

    for row in cov.rows:
        code = status(row.copies)
        cells = []
        for peer in shown:
            frac = row.fraction(peer)
            if frac >= 1:
                cells.append(paint(FULL, code))
            elif frac > 0:
                cells.append(paint(PARTIAL, code))
            else:
                cells.append(paint(NONE, _DIM))
        line = row.label.ljust(label_w) + " " + "".join(" " + c for c in cells)
        if more:
            n_hidden = sum(p in row.held for p in hidden)
            line += " " + (f"+{n_hidden}" if n_hidden else "").rjust(len(more))
        line += "  " + paint(str(row.copies).rjust(copies_w), code) + "  " + human_bytes(row.bytes).rjust(size_w)
        if row.copies < min_copies or row.copies == 0:
            flag = f"! under {min_copies} {_copies_word(min_copies)}" if row.copies < min_copies else "!"
            if row.copies == 0:
                flag += " (lost)"
            line += "  " + paint(flag, code)
        lines.append(line)

    lines.append("")
    for k, peer in enumerate(shown):
        lines.append(f"{column_name(k):>2} {short_id(peer)}  {peer}")
    if hidden:
        lines.append(f"   ({len(hidden)} more {'peer' if len(hidden) == 1 else 'peers'} not shown)")
    lines.append(f"   {FULL} holds the row   {PARTIAL} holds part of it   {NONE} holds none of it")

    n = len(cov.fragment_copies)
    under = cov.fragments_under(min_copies)
    lost = cov.fragments_lost
    summary = (
        f"{n} fragments ({human_bytes(cov.total_bytes)}), "
        f"{under} under {min_copies} {_copies_word(min_copies)}, {lost} lost (0 copies); "
        f"{len(peers)} {'peer' if len(peers) == 1 else 'peers'}"
    )
    if cov.header_copies is not None:
        summary += f"; header: {cov.header_copies} {_copies_word(cov.header_copies)}"
    code = _RED if lost or cov.header_copies == 0 else _YELLOW if under else _GREEN
    lines.append(paint(summary, code))
    return "\n".join(lines) + "\n"


def to_json(cov: Coverage, *, min_copies: int = 1) -> dict[str, Any]:
    """A plain, JSON-serializable dict of `cov` for scripts."""
    return {
        "peers": list(cov.peers),
        "rows": [
            {
                "label": r.label,
                "first_layer": r.first_layer,
                "last_layer": r.last_layer,
                "fragments": r.fragments,
                "bytes": r.bytes,
                "copies": r.copies,
                "held": {p: round(f, 6) for p, f in r.held.items()},
            }
            for r in cov.rows
        ],
        "fragments": len(cov.fragment_copies),
        "bytes": cov.total_bytes,
        "fragments_under_min": cov.fragments_under(min_copies),
        "fragments_lost": cov.fragments_lost,
        "header_copies": cov.header_copies,
        "min_copies": min_copies,
    }
