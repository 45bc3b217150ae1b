"""`seed --adopt`: keep every fragment of a model at k copies or more, by
taking on the rarest ones, up to a byte budget.

Each round surveys the swarm (survey.py: who holds what), lets the pure
`Adopter` (adoption.py) decide what to take, and asks the model's swarm to
fetch it like a partial pull. Adopters coordinate through the same snapshot
and rendezvous ranks, never through a server. Rounds repeat every `interval`
seconds, sooner when a back-off deadline comes due, so copies lost when a
holder leaves are restored without anyone asking.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .adoption import Adopter, AdoptionPlan, FragmentInfo
from .host import NodeError
from .node import Node
from .store import LocalModel
from .survey import Survey, survey

log = logging.getLogger(__name__)
JOIN_PAUSE = 5.0  # after announcing ourselves, before the first plan: other adopters find us meanwhile
SETTLE_ROUNDS = 4  # at most this many such pauses, while each survey finds peers the last did not
MISSES_FORGIVEN = 2  # rounds a still-connected holder may go unheard before its copies stop counting
Event = dict[str, Any]


@dataclass
class AdoptOptions:
    model_cid: str
    budget: int  # bytes of the model this node may hold
    min_copies: int = 2
    interval: float = 30.0  # seconds between surveys of the swarm
    backoff: float = 30.0  # a lower-ranked adopter waits this long per rank before stepping in
    find_timeout: float = 10.0
    on_event: Callable[[Event], None] = lambda e: None


async def adopt(node: Node, opts: AdoptOptions) -> None:
    """Run rounds until cancelled. A round that fails (nobody reachable) is
    reported and retried; it never ends the node."""
    adopter = Adopter(str(node.peer_id), opts.min_copies, opts.budget, opts.backoff)
    rng = random.Random()
    last: tuple[int, ...] = ()
    joined = False
    settling = SETTLE_ROUNDS
    seen: set[str] = set()
    missed: dict[str, int] = {}
    previous: Survey | None = None
    while True:
        pause = opts.interval
        try:
            found = await survey(node, opts.model_cid, find_timeout=opts.find_timeout)
            connected = {str(p) for p in node.connected_peers()}
            found, missed = carry_missed(previous, found, connected, missed)
            previous = found
            if not joined:
                await _join(node, opts.model_cid, found)
                joined = True
                _report(opts, {"event": "adopt_joined", "model_cid": opts.model_cid, "holders": len(found.holdings)})
            # Nothing taken until the swarm we see stops growing: adopters that start
            # together would otherwise each see only the holders and all take the same.
            if settling and set(found.holdings) != seen:
                seen = set(found.holdings)
                settling -= 1
                await trio.sleep(min(opts.interval, JOIN_PAUSE))
                continue
            settling = 0
            plan = await _round(node, opts.model_cid, adopter, found, rng)
            if plan.next_deadline is not None:
                pause = max(1.0, min(pause, plan.next_deadline - trio.current_time()))
            summary = (len(plan.take), len(plan.waiting), len(plan.lost), len(plan.over_budget))
            if plan.take or summary != last:
                last = summary
                _report(opts, _event(opts.model_cid, found, plan))
        except Exception as e:  # nobody reachable, a full disk, a bad manifest: reported, retried, never fatal
            if not isinstance(e, NodeError | OSError):
                log.exception("adopt %s: round failed", opts.model_cid)
            _report(opts, {"event": "adopt_error", "model_cid": opts.model_cid, "error": _describe(e)})
        await trio.sleep(pause)


def carry_missed(
    previous: Survey | None, found: Survey, connected: set[str], missed: dict[str, int]
) -> tuple[Survey, dict[str, int]]:
    """`found`, plus the holdings of last round's holders that did not answer
    this time but are still connected, for up to MISSES_FORGIVEN rounds in a
    row; and the new miss counts. A holder busy serving can let one have-request
    time out; counting its copies as gone would make every adopter take a
    duplicate of all it holds. A holder that leaves closes its connection and
    stops counting at once."""
    if previous is None:
        return found, {}
    holdings, fetching, peers = dict(found.holdings), dict(found.fetching), dict(found.peers)
    counts: dict[str, int] = {}
    for peer, have in previous.holdings.items():
        if peer in holdings or peer not in connected or peer not in previous.peers:
            continue
        misses = missed.get(peer, 0) + 1
        if misses > MISSES_FORGIVEN or len(have) != len(found.manifest.fragments):
            continue
        counts[peer] = misses
        holdings[peer], peers[peer] = have, previous.peers[peer]
        if peer in previous.fetching:
            fetching[peer] = previous.fetching[peer]
    return Survey(found.manifest, found.manifest_bytes, holdings, fetching, peers), counts


def _report(opts: AdoptOptions, event: Event) -> None:
    try:
        opts.on_event(event)
    except Exception:
        log.exception("adopt event callback failed on %r", event)


def _describe(e: Exception) -> str:
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return str(e) or type(e).__name__


async def _join(node: Node, model_cid: str, found: Survey) -> None:
    """The model's folder (manifest only, if new) and its announcement: a
    candidate from now on, which other adopters rank."""
    model = node.store.models.get(model_cid)
    if model is None:
        model = await trio.to_thread.run_sync(node.store.begin_model, model_cid, found.manifest_bytes)
    node.announce_model(model)


async def _round(node: Node, model_cid: str, adopter: Adopter, found: Survey, rng: random.Random) -> AdoptionPlan:
    model = node.store.models[model_cid]
    swarm = node.swarms.get(model_cid)
    if swarm is not None and swarm.failure is not None:
        failure = swarm.failure
        await node.swarm_for(model)  # a fresh swarm for the next round; this one's wants are dropped
        raise NodeError(f"fetching adopted fragments failed: {failure}")
    swarm = await node.swarm_for(model)
    fetching = {k for k in swarm.wanted if k < len(model.have) and not model.have[k]}
    mine = {k for k, h in enumerate(model.have) if h} | fetching
    me = str(node.peer_id)
    fragments = [FragmentInfo(_key(model, k), e.size) for k, e in enumerate(model.manifest.fragments)]
    # A copy on its way counts: another adopter that took a fragment a round ago
    # is still fetching it, and a second copy is not needed.
    coming = {p: f for p, f in found.fetching.items() if p != me}
    holders = [
        {p for p, have in found.holdings.items() if p != me and (have[k] or (p in coming and coming[p][k]))}
        for k in range(len(fragments))
    ]
    plan = adopter.plan(fragments, holders, set(found.holdings) | {me}, mine, trio.current_time(), rng)
    if plan.take or fetching:  # the holders of this round: those of earlier takes may have left
        swarm.add_peers([found.peers[p] for p in found.holdings if p in found.peers])
    if plan.take:
        swarm.want([*plan.take, len(model.have)])  # and the header: a folder with it can be read and served
    return plan


def _key(model: LocalModel, k: int) -> str:
    return model.fragment_cid(k) or model.manifest.fragments[k].fragment_id


def _event(model_cid: str, found: Survey, plan: AdoptionPlan) -> Event:
    sizes = [f.size for f in found.manifest.fragments]
    return {
        "event": "adopt",
        "model_cid": model_cid,
        "holders": len(found.holdings),
        "taking": len(plan.take),
        "taking_bytes": sum(sizes[k] for k in plan.take),
        "waiting": len(plan.waiting),
        "lost": len(plan.lost),
        "over_budget": len(plan.over_budget),
    }
