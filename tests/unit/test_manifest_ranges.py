"""The plan of a manifest fetched in ranges from several holders (pure logic)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from node.manifest_ranges import RangePlan


def test_holders_get_the_lowest_ranges_nobody_fetches_then_share_the_last() -> None:
    plan = RangePlan(total=10, chunk=4)
    assert plan.count == 3 and plan.range_of(2) == (8, 2)
    assert [plan.next_for("a"), plan.next_for("b"), plan.next_for("a")] == [0, 1, 2]
    assert plan.next_for("c") == 0  # endgame: every range is on its way; c doubles one
    assert plan.received(0, "c") and not plan.received(0, "a")  # the first copy is kept, the second dropped
    assert plan.next_for("c") == 1
    assert plan.next_for("c") == 2
    assert plan.next_for("c") is None  # it asked for all that is left
    assert plan.received(1, "b") and plan.received(2, "c") and plan.complete


def test_a_failed_holder_gives_its_ranges_back() -> None:
    plan = RangePlan(total=8, chunk=4)
    assert plan.next_for("a") == 0 and plan.next_for("a") == 1
    plan.failed("a")
    assert plan.next_for("b") == 0 and plan.next_for("b") == 1


def test_an_empty_manifest_is_one_empty_range() -> None:
    plan = RangePlan(total=0, chunk=4)
    assert plan.count == 1 and plan.range_of(0) == (0, 0)


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(0, 5000),
    chunk=st.integers(1, 700),
    events=st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from(["ask", "get", "fail"])), max_size=300),
)
def test_any_order_of_asks_arrivals_and_failures_keeps_the_plan_consistent(
    total: int, chunk: int, events: list[tuple[str, str]]
) -> None:
    plan = RangePlan(total, chunk)
    in_flight: dict[str, list[int]] = {h: [] for h in "abcd"}
    kept: list[int] = []
    for holder, what in [*events, *[(h, "drain") for h in "abcd"]]:
        if what == "ask":
            i = plan.next_for(holder)
            if i is not None:
                assert i not in in_flight[holder]  # never the same range twice at once from one holder
                in_flight[holder].append(i)
        elif what == "get" and in_flight[holder]:
            i = in_flight[holder].pop(0)
            if plan.received(i, holder):
                kept.append(i)
        elif what == "fail":
            plan.failed(holder)
            in_flight[holder].clear()
        assert plan.left == plan.count - len(kept)
    # One holder that keeps asking gets everything still missing, each range once.
    while (i := plan.next_for("z")) is not None:
        assert plan.received(i, "z")
        kept.append(i)
    assert plan.complete and sorted(kept) == list(range(plan.count))
    assert sum(plan.range_of(i)[1] for i in kept) == total
