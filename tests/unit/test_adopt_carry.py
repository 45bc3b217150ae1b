"""`carry_missed` (node/adopt.py): a holder that is still connected but did not
answer one survey keeps counting for a few rounds; one that left stops at once."""

from __future__ import annotations

from pathlib import Path

from libp2p.peer.id import ID

import fragmenter as fr
from node.adopt import MISSES_FORGIVEN, carry_missed
from node.survey import Survey
from tests.gguf_factory import T, write_model

SEED = "seed"


def surveys(tmp_path: Path) -> tuple[Survey, Survey]:
    """A survey that heard the seed and one that did not."""
    model = write_model(
        tmp_path / "m.gguf", [("a.weight", T.F32, (64, 64)), ("b.weight", T.F32, (64, 64))], vocab=False
    )
    fr.fragment_model(model, tmp_path / "m", chunk_size=8 * 1024)
    manifest = fr.read_manifest(tmp_path / "m")
    n = len(manifest.fragments)
    seed_id = ID(b"\x00" * 34)
    heard = Survey(manifest, b"{}", {SEED: [True] * n}, {SEED: [False] * n}, {SEED: seed_id})
    unheard = Survey(manifest, b"{}", {}, {}, {})
    return heard, unheard


def test_a_connected_holder_missed_once_still_counts(tmp_path: Path) -> None:
    heard, unheard = surveys(tmp_path)
    found, missed = carry_missed(heard, unheard, {SEED}, {})
    assert found.holdings[SEED] == heard.holdings[SEED]
    assert found.peers[SEED] == heard.peers[SEED]
    assert missed == {SEED: 1}


def test_a_holder_that_disconnected_stops_counting_at_once(tmp_path: Path) -> None:
    heard, unheard = surveys(tmp_path)
    found, missed = carry_missed(heard, unheard, set(), {})
    assert SEED not in found.holdings and missed == {}


def test_a_connected_holder_unheard_for_too_long_stops_counting(tmp_path: Path) -> None:
    heard, unheard = surveys(tmp_path)
    previous, missed = heard, {}
    for _ in range(MISSES_FORGIVEN):
        previous, missed = carry_missed(previous, unheard, {SEED}, missed)
        assert SEED in previous.holdings
    found, missed = carry_missed(previous, unheard, {SEED}, missed)
    assert SEED not in found.holdings and missed == {}


def test_an_answer_resets_the_count(tmp_path: Path) -> None:
    heard, unheard = surveys(tmp_path)
    previous, missed = carry_missed(heard, unheard, {SEED}, {})
    previous, missed = carry_missed(previous, heard, {SEED}, missed)
    assert missed == {}
    found, missed = carry_missed(previous, unheard, {SEED}, missed)
    assert SEED in found.holdings and missed == {SEED: 1}


def test_the_first_survey_is_taken_as_it_is(tmp_path: Path) -> None:
    heard, _ = surveys(tmp_path)
    found, missed = carry_missed(None, heard, set(), {})
    assert found is heard and missed == {}
