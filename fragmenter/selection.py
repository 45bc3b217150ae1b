"""Which fragments a partial replica holds: `--layers 3-5`, `--tensors GLOB`,
`--with-embeddings`, `--with-output`, resolved against a manifest.

A node of a distributed-inference system runs a range of layers: it needs
their `blk.N.*` tensors, plus the small non-layer tensors every layer uses
(`rope_freqs` and the like), and the embeddings or the output head only when
it runs the first or the last stage. Pure: no files, no network.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import FragmenterError
from .manifest import Manifest

EMBEDDINGS = "embeddings"
OUTPUT = "output"
OTHER = "other"
_BLOCK = re.compile(r"^blk\.(\d+)\.")
OUTPUT_HEAD = "output.weight"
TIED_HEAD = "token_embd.weight"  # the output head of a model without output.weight
MAX_LAYER = 100_000  # a typo'd range must not build a set of billions
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def tensor_group(name: str) -> int | str:
    """Layer N for `blk.N.*`; else EMBEDDINGS, OUTPUT or OTHER."""
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1))
    if "embd" in name or name.startswith("token_types"):
        return EMBEDDINGS  # token_embd, position_embd, per_layer_token_embd...
    if name == "output" or name.startswith(("output.", "output_norm", "cls")):
        return OUTPUT
    return OTHER


def parse_layers(text: str) -> frozenset[int]:
    """`3-5`, `0,2,7-9`: the layer numbers named."""
    layers: set[int] = set()
    for part in text.split(","):
        m = _RANGE.match(part)
        if not m:
            raise FragmenterError(f"not a layer range: {part.strip()!r} (expected e.g. 3-5 or 0,2,7-9)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise FragmenterError(f"empty layer range: {part.strip()!r}")
        if hi >= MAX_LAYER:
            raise FragmenterError(f"no model has layer {hi} (layers are numbered below {MAX_LAYER})")
        layers.update(range(lo, hi + 1))
    return frozenset(layers)


@dataclass(frozen=True)
class Selection:
    """What part of a model to hold. Empty `layers` and `tensors`: the whole model."""

    layers: frozenset[int] = frozenset()
    tensors: tuple[str, ...] = ()  # fnmatch globs on tensor names
    with_embeddings: bool = False
    with_output: bool = False

    @property
    def whole(self) -> bool:
        return not self.layers and not self.tensors and not self.with_embeddings and not self.with_output

    def wants(self, tensor_name: str, tied_head: bool = False) -> bool:
        """`tied_head`: the model has no `output.weight`, so llama.cpp computes
        the logits with `token_embd.weight`: the output head is that tensor."""
        if self.whole:
            return True
        if any(fnmatch.fnmatchcase(tensor_name, glob) for glob in self.tensors):
            return True
        group = tensor_group(tensor_name)
        if isinstance(group, int):
            return group in self.layers
        if group == EMBEDDINGS:
            return self.with_embeddings or (self.with_output and tied_head and tensor_name == TIED_HEAD)
        if group == OUTPUT:
            return self.with_output
        return bool(self.layers)  # shared by every layer (rope_freqs...): whoever runs a layer needs it

    def fragments(self, manifest: Manifest) -> list[int]:
        """Indexes (manifest order) of the fragments selected; an error names a selection that matches nothing."""
        tied = has_tied_head(manifest)
        chosen = [i for i, f in enumerate(manifest.fragments) if self.wants(f.tensor_name, tied)]
        if self.whole:
            return chosen
        known = model_layers(manifest)
        missing = sorted(self.layers - set(known))
        if missing:
            span = f"{known[0]}-{known[-1]}" if known else "none"
            raise FragmenterError(f"the model has no layer {_ranges(missing)} (its layers: {span})")
        names = {f.tensor_name for f in manifest.fragments}
        for glob in self.tensors:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise FragmenterError(f"no tensor of the model matches {glob!r}")
        return chosen


def has_tied_head(manifest: Manifest) -> bool:
    names = {f.tensor_name for f in manifest.fragments}
    return OUTPUT_HEAD not in names and TIED_HEAD in names


def model_layers(manifest: Manifest) -> list[int]:
    return sorted({g for f in manifest.fragments if isinstance(g := tensor_group(f.tensor_name), int)})


@dataclass(frozen=True)
class Holding:
    layers: str  # whole layers held, as ranges: "0-2,5"; "" for none
    embeddings: bool
    output: bool
    bytes: int

    def describe(self) -> str:
        parts = [f"layers {self.layers}" if self.layers else "no whole layer"]
        parts += [name for name, held in ((EMBEDDINGS, self.embeddings), (OUTPUT, self.output)) if held]
        return ", ".join(parts)


def held_summary(manifest: Manifest, have: Sequence[bool]) -> Holding:
    """What a partial replica holds, for people: whole layers as ranges, and
    whether the embeddings and output are in. A layer counts when every
    fragment of it is held."""
    by_group: dict[int | str, list[bool]] = {}
    held_bytes = 0
    for f, h in zip(manifest.fragments, have, strict=True):
        by_group.setdefault(tensor_group(f.tensor_name), []).append(h)
        held_bytes += f.size if h else 0
    full = [g for g, hs in by_group.items() if all(hs)]
    layers = sorted(g for g in full if isinstance(g, int))
    output = OUTPUT in full
    if output and has_tied_head(manifest):  # the head is token_embd.weight: held only if that is
        output = all(h for f, h in zip(manifest.fragments, have, strict=True) if f.tensor_name == TIED_HEAD)
    return Holding(_ranges(layers), EMBEDDINGS in full, output, held_bytes)


def describe_fragments(manifest: Manifest, indexes: Iterable[int]) -> str:
    """What some fragments are part of, for people: "embeddings, layers 2-3,5, output"."""
    groups = {tensor_group(manifest.fragments[k].tensor_name) for k in indexes}
    layers = [g for g in groups if isinstance(g, int)]
    parts = [EMBEDDINGS] if EMBEDDINGS in groups else []
    if layers:
        parts.append(f"layer{'s' if len(layers) > 1 else ''} {_ranges(layers)}")
    return ", ".join(parts + [g for g in (OUTPUT, OTHER) if g in groups])


def _ranges(numbers: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out: list[str] = []
    run: list[int] = []
    for n in sorted(numbers):
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [n]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
