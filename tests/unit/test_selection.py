"""Partial-replica selections (`--layers`, `--tensors`, `--with-embeddings`, `--with-output`) on a small manifest."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from gguf import GGMLQuantizationType as T

import fragmenter as fr
from fragmenter.errors import FragmenterError
from fragmenter.manifest import Manifest
from fragmenter.selection import (
    EMBEDDINGS,
    OTHER,
    OUTPUT,
    Holding,
    Selection,
    describe_fragments,
    held_summary,
    model_layers,
    parse_layers,
    tensor_group,
)
from tests.gguf_factory import write_model

N_LAYERS = 6


def _tensors() -> list[tuple[str, T, tuple[int, ...]]]:
    tensors: list[tuple[str, T, tuple[int, ...]]] = [("token_embd.weight", T.Q8_0, (64, 256))]  # 3 fragments
    for i in range(N_LAYERS):
        tensors.append((f"blk.{i}.attn_q.weight", T.Q4_K, (64, 256)))  # 2 fragments
        tensors.append((f"blk.{i}.attn_norm.weight", T.F32, (64,)))
    tensors += [
        ("output_norm.weight", T.F32, (64,)),
        ("output.weight", T.Q8_0, (64, 256)),  # 3 fragments
        ("rope_freqs.weight", T.F32, (32,)),
    ]
    return tensors


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    d = tmp_path_factory.mktemp("selection")
    model = write_model(d / "m.gguf", _tensors(), vocab=False)
    fr.fragment_model(model, d / "frag", chunk_size=8 * 1024)
    m = fr.read_manifest(d / "frag")
    # the test relies on layers, embeddings and output that span several fragments
    assert sum(f.tensor_name == "blk.0.attn_q.weight" for f in m.fragments) >= 2
    assert sum(f.tensor_name == "token_embd.weight" for f in m.fragments) >= 2
    return m


def names(manifest: Manifest, indexes: list[int]) -> set[str]:
    return {manifest.fragments[i].tensor_name for i in indexes}


def indexes_of(manifest: Manifest, pred: Callable[[str], bool]) -> list[int]:
    return [i for i, f in enumerate(manifest.fragments) if pred(f.tensor_name)]


# ---- parse_layers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", {3}),
        ("3-5", {3, 4, 5}),
        ("0,2,7-9", {0, 2, 7, 8, 9}),
        (" 3 - 5 , 7 ", {3, 4, 5, 7}),
        ("4-4", {4}),
        ("1-3,2-4", {1, 2, 3, 4}),
        ("10-12", {10, 11, 12}),
    ],
)
def test_parse_layers(text: str, expected: set[int]) -> None:
    assert parse_layers(text) == frozenset(expected)


@pytest.mark.parametrize("text", ["5-3", "a", "", "1-", "-1", "1,", "1-2-3", "1..3", "3-a", ","])
def test_parse_layers_refuses(text: str) -> None:
    with pytest.raises(FragmenterError):
        parse_layers(text)


def test_parse_layers_names_the_bad_part() -> None:
    with pytest.raises(FragmenterError, match="'x'"):
        parse_layers("1-2, x")
    with pytest.raises(FragmenterError, match="empty layer range: '5-3'"):
        parse_layers("0,5-3")


# ---- tensor_group ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("blk.0.attn_q.weight", 0),
        ("blk.17.ffn_down.weight", 17),
        ("token_embd.weight", EMBEDDINGS),
        ("position_embd.weight", EMBEDDINGS),
        ("per_layer_token_embd.weight", EMBEDDINGS),
        ("token_types.weight", EMBEDDINGS),
        ("output.weight", OUTPUT),
        ("output_norm.weight", OUTPUT),
        ("output_norm.bias", OUTPUT),
        ("output", OUTPUT),
        ("cls.weight", OUTPUT),
        ("rope_freqs.weight", OTHER),
        ("blk.x.attn_q.weight", OTHER),
        ("blkk.1.weight", OTHER),
        ("outputs_something", OTHER),
    ],
)
def test_tensor_group(name: str, group: int | str) -> None:
    assert tensor_group(name) == group


# ---- Selection.wants / fragments ------------------------------------------------


def test_the_whole_selection_is_every_fragment(manifest: Manifest) -> None:
    whole = Selection()
    assert whole.whole
    assert whole.fragments(manifest) == list(range(len(manifest.fragments)))
    assert not Selection(with_output=True).whole and not Selection(layers=frozenset({0})).whole


def test_layers_take_their_tensors_and_the_shared_ones_only(manifest: Manifest) -> None:
    sel = Selection(layers=parse_layers("1-2"))
    chosen = sel.fragments(manifest)
    assert chosen == sorted(chosen)  # manifest order
    assert chosen == indexes_of(manifest, lambda n: tensor_group(n) in (1, 2, OTHER))
    assert names(manifest, chosen) == {
        "blk.1.attn_q.weight",
        "blk.1.attn_norm.weight",
        "blk.2.attn_q.weight",
        "blk.2.attn_norm.weight",
        "rope_freqs.weight",
    }
    # every shard of a selected tensor
    assert sum(manifest.fragments[i].tensor_name == "blk.1.attn_q.weight" for i in chosen) == sum(
        f.tensor_name == "blk.1.attn_q.weight" for f in manifest.fragments
    )
    assert not sel.wants("token_embd.weight") and not sel.wants("output.weight") and not sel.wants("blk.0.x")


def test_embeddings_and_output_only_when_asked(manifest: Manifest) -> None:
    first = Selection(layers=frozenset({0}), with_embeddings=True).fragments(manifest)
    assert names(manifest, first) == {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_norm.weight"} | {
        "rope_freqs.weight"
    }
    last = Selection(layers=frozenset({5}), with_output=True).fragments(manifest)
    assert names(manifest, last) == {
        "blk.5.attn_q.weight",
        "blk.5.attn_norm.weight",
        "output_norm.weight",
        "output.weight",
        "rope_freqs.weight",
    }
    # without any layer: only the head, and no shared tensor (nobody runs a layer)
    head = Selection(with_output=True).fragments(manifest)
    assert names(manifest, head) == {"output_norm.weight", "output.weight"}
    assert names(manifest, Selection(with_embeddings=True).fragments(manifest)) == {"token_embd.weight"}


def test_tensor_globs(manifest: Manifest) -> None:
    sel = Selection(tensors=("blk.*.attn_norm.weight",))
    assert names(manifest, sel.fragments(manifest)) == {f"blk.{i}.attn_norm.weight" for i in range(N_LAYERS)}
    assert not sel.wants("rope_freqs.weight")  # shared tensors come with layers, not with globs
    both = Selection(layers=frozenset({3}), tensors=("output.*", "blk.4.attn_q.weight"))
    assert names(manifest, both.fragments(manifest)) == {
        "blk.3.attn_q.weight",
        "blk.3.attn_norm.weight",
        "rope_freqs.weight",
        "output.weight",
        "blk.4.attn_q.weight",
    }
    assert not both.wants("output_norm.weight")  # the glob is "output.*", not "output*"
    assert Selection(tensors=("Blk.*",)).wants("blk.0.x") is False  # case-sensitive, as tensor names are


def test_a_layer_the_model_lacks_is_an_error(manifest: Manifest) -> None:
    assert model_layers(manifest) == list(range(N_LAYERS))
    with pytest.raises(FragmenterError, match=r"no layer 9-10 \(its layers: 0-5\)"):
        Selection(layers=parse_layers("9-10")).fragments(manifest)
    with pytest.raises(FragmenterError, match=r"no layer 6,8 \(its layers: 0-5\)"):
        Selection(layers=parse_layers("4-6,8")).fragments(manifest)


def test_a_glob_matching_nothing_is_an_error(manifest: Manifest) -> None:
    with pytest.raises(FragmenterError, match=r"no tensor of the model matches 'nope\.\*'"):
        Selection(tensors=("nope.*",)).fragments(manifest)
    with pytest.raises(FragmenterError, match="'blk.9.*'"):
        Selection(layers=frozenset({1}), tensors=("blk.1.*", "blk.9.*")).fragments(manifest)


# ---- held_summary / Holding.describe / describe_fragments -------------------------


def test_held_summary_of_a_partial_replica(manifest: Manifest) -> None:
    sel = Selection(layers=parse_layers("0-1,4"), with_output=True)
    chosen = set(sel.fragments(manifest))
    have = [i in chosen for i in range(len(manifest.fragments))]
    holding = held_summary(manifest, have)
    assert holding == Holding(
        layers="0-1,4",
        embeddings=False,
        output=True,
        bytes=sum(manifest.fragments[i].size for i in chosen),
    )
    assert holding.describe() == "layers 0-1,4, output"


def test_a_layer_partly_held_does_not_count(manifest: Manifest) -> None:
    have = [tensor_group(f.tensor_name) in (0, 1, 2, EMBEDDINGS, OUTPUT) for f in manifest.fragments]
    # drop one shard of layer 1's two-shard tensor, and one of the embeddings'
    k = next(i for i, f in enumerate(manifest.fragments) if f.tensor_name == "blk.1.attn_q.weight")
    e = next(i for i, f in enumerate(manifest.fragments) if f.tensor_name == "token_embd.weight")
    have[k] = have[e] = False
    holding = held_summary(manifest, have)
    assert holding.layers == "0,2"
    assert not holding.embeddings and holding.output
    assert holding.bytes == sum(f.size for f, h in zip(manifest.fragments, have, strict=True) if h)
    assert holding.describe() == "layers 0,2, output"


def test_held_summary_of_nothing_and_everything(manifest: Manifest) -> None:
    n = len(manifest.fragments)
    none = held_summary(manifest, [False] * n)
    assert none == Holding("", False, False, 0) and none.describe() == "no whole layer"
    full = held_summary(manifest, [True] * n)
    assert full == Holding(f"0-{N_LAYERS - 1}", True, True, manifest.total_bytes)
    assert full.describe() == "layers 0-5, embeddings, output"
    only_embd = held_summary(manifest, [tensor_group(f.tensor_name) == EMBEDDINGS for f in manifest.fragments])
    assert only_embd.describe() == "no whole layer, embeddings"
    with pytest.raises(ValueError):
        held_summary(manifest, [True] * (n - 1))  # a have-list of the wrong length is a bug, not a summary


def test_describe_fragments(manifest: Manifest) -> None:
    def of(pred: Callable[[str], bool]) -> str:
        return describe_fragments(manifest, indexes_of(manifest, pred))

    assert of(lambda n: tensor_group(n) in (2, 3, 5, EMBEDDINGS, OUTPUT)) == "embeddings, layers 2-3,5, output"
    assert of(lambda n: n == "blk.3.attn_q.weight") == "layer 3"
    assert of(lambda n: tensor_group(n) in (OTHER, 0)) == "layer 0, other"
    assert of(lambda n: True) == "embeddings, layers 0-5, output, other"
    assert describe_fragments(manifest, []) == ""
    # repeated indexes (several shards of one tensor) are one group
    assert describe_fragments(manifest, [0, 0, 1]) == "embeddings"


def test_with_output_on_a_model_with_tied_embeddings_takes_the_head(tmp_path_factory: pytest.TempPathFactory) -> None:
    d = tmp_path_factory.mktemp("tied")
    tied = [t for t in _tensors() if t[0] != "output.weight"]
    fr.fragment_model(write_model(d / "m.gguf", tied, vocab=False), d / "frag", chunk_size=8 * 1024)
    manifest = fr.read_manifest(d / "frag")
    chosen = Selection(layers=frozenset({5}), with_output=True).fragments(manifest)
    assert "token_embd.weight" in names(manifest, chosen)
    # Holding the output norm without token_embd is not holding the output stage.
    norm_only = [f.tensor_name == "output_norm.weight" for f in manifest.fragments]
    assert not held_summary(manifest, norm_only).output
    have = [k in set(chosen) for k in range(len(manifest.fragments))]
    assert held_summary(manifest, have).output
