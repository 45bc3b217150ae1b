"""`gguf-swarm`: the one console script. Fragmenter commands and node commands.

Configuration is read once here (TOML file, then flags over it) and passed
down as a NodeConfig; nothing below reads files or the environment.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from fragmenter import FragmenterError, assemble, fragment_model
from fragmenter.assembly import AssembleResult
from fragmenter.cli import (
    add_fragmenter_commands,
    assembled_fields,
    emit,
    parse_chunk_size,
    parse_size,
    progress_bar,
    run,
    sigterm_as_interrupt,
)
from fragmenter.heap import keep_freed_memory
from fragmenter.progress import human_bytes
from fragmenter.quick_exit import quick_exit
from fragmenter.selection import Selection, held_summary, parse_layers
from fragmenter.stdout_reader import stop_when_stdout_reader_leaves
from protocol import is_cid
from protocol.names import InvalidName, parse_target, peer_id_text, validate_name

from . import logs
from .config import DEFAULT_LISTEN, ENVIRONMENT, load_node_config, parse_rate, read_settings
from .config import data_dir as layered_data_dir
from .coverage import coverage, render, to_json
from .errors import NodeError, first_leaf
from .store import Store, published_folder

# The node's own modules (py-libp2p, about a second to import) are imported in
# the commands that run a node: `fragment`, `assemble`, `verify` and `--help`
# start in a third of a second.
if TYPE_CHECKING:
    from .node import Node, NodeConfig

# `where`'s exit status while some layer has fewer copies than asked: not 1, so a
# script can tell an under-replicated model from an error (nobody reachable).
SHORT_OF_COPIES = 3


def version() -> str:
    try:
        return importlib.metadata.version("gguf-swarm")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def load_config(args: argparse.Namespace, default_data_dir: str | None = None) -> NodeConfig:
    """The config file, GGUF_SWARM_* over it, flags over both (node/config.py);
    `default_data_dir` if none names a data dir."""
    return load_node_config(args, os.environ, default_data_dir)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"seconds must be a positive finite number, not {text!r}")
    return value


def _copies(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"copies must be a whole number >= 1, not {text!r}")
    return int(text)


def _name(text: str) -> str:
    try:
        return validate_name(text)
    except InvalidName as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _rate(text: str) -> int:
    return parse_rate(text)


def _metrics_addr(text: str) -> str:
    from .metrics import parse_metrics_addr

    try:
        parse_metrics_addr(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("metrics: ")) from None
    return text


def _print_addrs(args: argparse.Namespace, node: Node) -> None:
    addrs = node.addrs()
    if args.json:
        emit(args, "", event="listening", peer_id=str(node.peer_id), addrs=addrs)
    else:
        for a in addrs:
            print(a, flush=True)


async def _serve_forever(args: argparse.Namespace, node: Node) -> None:
    async with trio.open_nursery() as nursery:
        if args.json:
            nursery.start_soon(_report_stats, node)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                emit(args, "stopping", event="stopping")
                nursery.cancel_scope.cancel()
                return


async def _stop_on_signal(args: argparse.Namespace, body: Any, node: Node) -> int:
    """`body(node)`, stopped cleanly (exit 0) by SIGTERM or Ctrl-C at any point:
    a seed is stopped while it indexes, or just after it printed its addresses,
    as readily as when it serves."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for _ in signals:
                    emit(args, "stopping", event="stopping")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            code = int(await body(node))
            nursery.cancel_scope.cancel()
            return code
    return 0  # stopped by a signal


async def _report_stats(node: Node, every: float = 5.0) -> None:
    """--json: what the node has served so far, every few seconds (for dashboards and benchmarks)."""
    while True:
        await trio.sleep(every)
        swarms = list(node.swarms.values())
        event = {
            "event": "stats",
            "uploaded": node.uploaded_bytes,
            "sessions": sum(len(s.links) for s in swarms),
            "unchoked": sum(1 for s in swarms for link in s.links.values() if not link.session.am_choking),
        }
        print(json.dumps(event), flush=True)


def _run_node(
    args: argparse.Namespace,
    body: Any,
    config: NodeConfig | None = None,
    quiet: bool = False,
    wait_for_index: bool = True,
    serving: bool = False,
) -> int:
    """Run `body(node)` in a started node; `serving`: it runs until a signal
    stops it, which it may do from the moment the node is up (exit 0)."""

    async def main() -> int:
        from .node import open_node

        # The ~90,000 objects the imports made live as long as the process: the
        # collector's full passes need not walk them again (two a Gemma pull).
        gc.freeze()
        async with open_node(config or load_config(args), wait_for_index) as node:
            if serving:
                return await _stop_on_signal(args, lambda n: _announced_then(args, body, n), node)
            return await _announced_then(args, body, node)

    async def _announced_then(args: argparse.Namespace, body: Any, node: Node) -> int:
        if not quiet:
            _print_addrs(args, node)
        if node.metrics_url:
            emit(args, f"metrics {node.metrics_url}", event="metrics", url=node.metrics_url)
        if node.dashboard_url:
            emit(args, f"dashboard {node.dashboard_url}", event="dashboard", url=node.dashboard_url)
        return int(await body(node))

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        # trio nurseries wrap errors in groups; report the first user-facing one.
        leaf = first_leaf(group, (NodeError, FragmenterError, KeyboardInterrupt, OSError))
        if leaf is None:
            raise
        if isinstance(leaf, KeyboardInterrupt | OSError):
            raise leaf from None  # run() reports it: "interrupted", or one line (a full disk, say)
        print(f"error: {leaf}", file=sys.stderr)
        return 1
    except (NodeError, FragmenterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _models_line(node: Node) -> list[dict[str, Any]]:
    return [
        {"model_cid": m.cid, "name": m.name, "complete": m.complete, "fragments": sum(m.have), "of": len(m.have)}
        for m in node.store.models.values()
    ]


def cmd_seed(args: argparse.Namespace, config: NodeConfig | None = None) -> int:
    from .adopt import AdoptOptions, adopt
    from .names import keep_names_published

    adopting = getattr(args, "adopt", None) or []
    for cid in adopting:
        if not is_cid(cid):
            print(f"error: --adopt: not a model CID (CIDv1 raw sha2-256, bafk...): {cid!r}", file=sys.stderr)
            return 2
    if adopting and args.budget is None:
        print("error: --adopt needs --budget (the bytes of each adopted model this node may hold)", file=sys.stderr)
        return 2
    if not adopting and getattr(args, "budget", None) is not None:
        print("error: --budget is the room for --adopt MODEL_CID, which is missing", file=sys.stderr)
        return 2

    async def body(node: Node) -> int:
        await node.indexed.wait()  # listening already: each model is served as soon as it is read
        for m in _models_line(node):
            emit(
                args,
                f"serving {m['model_cid']} {m['name']} ({m['fragments']}/{m['of']} fragments)",
                event="serving",
                **m,
            )
        emit(
            args,
            f"indexed {len(node.store.models)} model(s) in {node.index_seconds:.1f} s",
            event="indexed",
            models=len(node.store.models),
            seconds=round(node.index_seconds, 3),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_names_published, node, lambda e: _name_line(args, e))  # names.json, if any
            for cid in adopting:
                options = AdoptOptions(
                    cid, args.budget, args.min_copies, args.adopt_interval, on_event=lambda e: _adopt_line(args, e)
                )
                nursery.start_soon(adopt, node, options)
            if args.json:
                nursery.start_soon(_report_stats, node)
            await trio.sleep_forever()  # until _stop_on_signal cancels it
        return 0

    return _run_node(args, body, config, wait_for_index=False, serving=True)


def _adopt_line(args: argparse.Namespace, event: dict[str, Any]) -> None:
    cid = event["model_cid"]
    if event["event"] == "adopt_error":
        text = f"adopt {cid}: {event['error']} (retrying)"
    else:
        text = (
            f"adopt {cid}: taking {event['taking']} fragment(s) ({human_bytes(event['taking_bytes'])}) "
            f"among {event['holders']} holder(s); {event['waiting']} waiting for others first, "
            f"{event['over_budget']} over budget, {event['lost']} lost (no copy left)"
        )
    emit(args, text, **event)


def cmd_publish(args: argparse.Namespace) -> int:
    """Fragment into the data dir the node then serves: --data-dir, else the
    config's data_dir, else the working directory."""
    from .names import point_name

    try:
        config = load_config(args, default_data_dir=".")
    except NodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model = Path(args.model)
    folder = published_folder(config.data_dir, model)
    bar = progress_bar(args, "fragment")
    with sigterm_as_interrupt():
        result = fragment_model(model, folder, args.chunk_size, args.force, bar)
    if bar:
        bar.close()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    emit(
        args,
        f"published {result.model_cid} ({result.fragments} fragments) from {folder}",
        event="published",
        model_cid=result.model_cid,
        folder=str(folder),
        fragments=result.fragments,
    )
    if args.name:
        entry = point_name(Store(config.data_dir).state_dir, args.name, result.model_cid)
        emit(
            args,
            f"name {args.name} -> {result.model_cid} (sequence {entry.seq}); published once the node runs",
            event="name",
            name=args.name,
            model_cid=result.model_cid,
            sequence=entry.seq,
        )
    return cmd_seed(args, config)


def _name_line(args: argparse.Namespace, event: dict[str, Any]) -> None:
    if event["event"] == "name_error":
        text = f"name {event['name']}: not published: {event['error']} (retrying)"
    else:
        text = (
            f"name {event['name']} -> {event['model_cid']} (sequence {event['sequence']}, "
            f"stored at {event['stored']} other node(s))"
        )
    emit(args, text, **event)


def _aliases_path() -> Path:
    """The alias file: $XDG_CONFIG_HOME/gguf-swarm/aliases.toml (~/.config/... without it)."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "gguf-swarm" / "aliases.toml"


def cmd_alias(args: argparse.Namespace) -> int:
    from .names import add_alias, load_aliases

    path = _aliases_path()
    try:
        if args.alias is None:
            for alias, peer in sorted(load_aliases(path).items()):
                print(f"{alias} {peer}")
            return 0
        if args.peer_id is None:
            print("error: alias needs NAME PEER_ID (or no argument, to list them)", file=sys.stderr)
            return 2
        add_alias(path, args.alias, args.peer_id)
    except NodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.alias} -> {args.peer_id} (in {path})")
    return 0


def cmd_name(args: argparse.Namespace) -> int:
    """Point a name at a model CID in the data dir's names.json; the node running
    from that data dir (or the next one) signs and publishes it."""
    from .names import point_name

    if not is_cid(args.model_cid):
        print(f"error: not a model CID (CIDv1 raw sha2-256, bafk...): {args.model_cid!r}", file=sys.stderr)
        return 2
    try:
        entry = point_name(Store(Path(args.data_dir)).state_dir, args.name, args.model_cid)
    except NodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    emit(
        args,
        f"name {args.name} -> {args.model_cid} (sequence {entry.seq}); "
        f"published by the node running from {args.data_dir} (within seconds), else by its next seed or publish",
        event="name",
        name=args.name,
        model_cid=args.model_cid,
        sequence=entry.seq,
    )
    return 0


RESOLVE_SECONDS = 10.0  # at most this long (and --timeout) to find a name's record


def _name_target(text: str) -> tuple[bytes, str]:
    """PEER_ID/NAME or ALIAS/NAME -> (publisher's peer id, name); NodeError or InvalidName."""
    from .names import load_aliases, publisher_of

    publisher, name = parse_target(text)
    return publisher_of(publisher, load_aliases(_aliases_path())), name


def cmd_pull(args: argparse.Namespace) -> int:
    from .names import resolve_name
    from .pull import PullOptions, pull_model

    target: tuple[bytes, str] | None = None
    if "/" in args.model_cid:  # PEER_ID/NAME or ALIAS/NAME
        try:
            target = _name_target(args.model_cid)
        except (InvalidName, NodeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif not is_cid(args.model_cid):
        print(f"error: not a model CID (CIDv1 raw sha2-256, bafk...): {args.model_cid!r}", file=sys.stderr)
        return 2
    try:
        selection = _selection(args)
    except FragmenterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output and not selection.whole:
        print("error: --output assembles the whole model; it cannot be used with a partial pull", file=sys.stderr)
        return 2
    if args.merge and not args.output:
        print("error: --merge needs --output (the file to merge a split model's parts into)", file=sys.stderr)
        return 2
    bar = progress_bar(args, "pull")

    def on_event(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
        elif event["event"] == "progress" and bar is not None:
            bar.extra = f" peers {event['peers']}"
            bar(event["done"], event["total"])
        elif event["event"] == "bad_peer":
            print(f"\nbanned peer {event['peer']}: {event.get('reason', 'misbehaved')}", file=sys.stderr)

    async def body(node: Node) -> int:
        options = PullOptions(
            find_timeout=args.timeout,
            stall_timeout=node.config.pull_stall_timeout,
            on_event=on_event,
            selection=selection,
        )
        model_cid = args.model_cid
        if target is not None:
            found = await resolve_name(node, *target, min(args.timeout, RESOLVE_SECONDS))
            shown = f"{peer_id_text(target[0])}/{target[1]}"
            if found.best is None:
                raise NodeError(f"name {shown} did not resolve: no valid record among {found.asked} node(s) asked")
            model_cid = found.best.value
            emit(
                args,
                f"resolved {shown} -> {model_cid} (sequence {found.best.seq})",
                event="resolved",
                name=shown,
                model_cid=model_cid,
                sequence=found.best.seq,
                expires=found.best.expires,
            )
        model, stats = await pull_model(node, model_cid, options)
        if bar:
            bar.close()
        speed = stats.bytes_fetched / max(stats.transfer_seconds, 1e-9)
        emit(
            args,
            f"pulled {model.cid} into {model.folder}: {human_bytes(stats.bytes_fetched)} in "
            f"{stats.seconds:.1f} s (transfer {stats.transfer_seconds:.1f} s, {human_bytes(speed)}/s) "
            f"from {len(stats.bytes_by_peer)} peers"
            f"{f', {len(stats.bad_peers)} banned' if stats.bad_peers else ''}",
            event="pulled",
            model_cid=model.cid,
            folder=str(model.folder),
            bytes=stats.bytes_fetched,
            seconds=round(stats.seconds, 3),
            transfer_seconds=round(stats.transfer_seconds, 3),
            peers=len(stats.bytes_by_peer),
            bytes_by_peer=stats.bytes_by_peer,
            bad_peers=sorted(stats.bad_peers),
            already_had=stats.already_had,
        )
        if args.output:
            result = await trio.to_thread.run_sync(
                lambda: assemble(model.folder, Path(args.output), True, None, merge=args.merge)
            )
            _assembled_line(args, result)
        if args.seed:
            await _serve_forever(args, node)
        return 0

    return _run_node(args, body)


def _assembled_line(args: argparse.Namespace, result: AssembleResult) -> None:
    """What `pull --output` wrote: one file, a split model's parts (in a
    folder), or those parts merged; the JSON is `assemble --json`'s event."""
    if result.merged:
        # The merged file is no file the publisher had: no file_sha256 to match, each fragment was checked.
        text = f"assembled {result.output}, the parts merged into one file (sha256 {result.file_sha256})"
    elif result.files:
        names = ", ".join(f.name for f in result.files)
        text = f"assembled {len(result.files)} parts into {result.output}: {names} (each matches its file_sha256)"
    elif result.checked_against_manifest:
        text = f"assembled {result.output} (sha256 {result.file_sha256}, matches the manifest)"
    else:
        text = f"assembled {result.output} (sha256 {result.file_sha256}; the manifest has no file_sha256)"
    emit(args, text, event="assembled", **assembled_fields(result))


def cmd_where(args: argparse.Namespace) -> int:
    """The coverage map: which peers hold which layers, with each row's copy count."""
    from .survey import survey

    if not is_cid(args.model_cid):
        print(f"error: not a model CID (CIDv1 raw sha2-256, bafk...): {args.model_cid!r}", file=sys.stderr)
        return 2

    async def body(node: Node) -> int:
        found = await survey(node, args.model_cid, find_timeout=args.timeout)
        cov = coverage(found.manifest, found.holdings)
        if args.json:
            report = to_json(cov, min_copies=args.min_copies)
            print(json.dumps({"event": "coverage", "model_cid": args.model_cid, **report}))
        else:
            color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
            print(f"{found.manifest.model_name} ({args.model_cid})")
            print(render(cov, min_copies=args.min_copies, color=color, width=shutil.get_terminal_size().columns))
        return SHORT_OF_COPIES if cov.under(args.min_copies) else 0

    with tempfile.TemporaryDirectory(prefix="gguf-swarm-where-") as scratch:
        # A throwaway identity unless --data-dir: not the config's or GGUF_SWARM_DATA_DIR's data dir,
        # which a seed on this machine may be running on (one peer id, two nodes).
        args.data_dir = args.data_dir or scratch
        try:
            config = load_config(args)
        except NodeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return _run_node(args, body, config, quiet=True)


def _selection(args: argparse.Namespace) -> Selection:
    layers = parse_layers(args.layers) if args.layers else frozenset()
    return Selection(layers, tuple(args.tensors or ()), args.with_embeddings, args.with_output)


def cmd_models(args: argparse.Namespace) -> int:
    try:
        data_dir = layered_data_dir(args, os.environ)
    except NodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not data_dir.is_dir():
        print(f"error: {data_dir} is not a folder", file=sys.stderr)
        return 1
    store = Store(data_dir)
    store.scan()
    if not store.models:
        emit(args, f"no models in {data_dir}", event="none")
    for m in store.models.values():
        held = held_summary(m.manifest, m.have)
        state = "complete" if m.complete else f"{sum(m.have)}/{len(m.have)} fragments"
        if not m.complete and any(m.have):
            state += f" ({held.describe()}; {human_bytes(held.bytes)})"
        emit(
            args,
            f"{m.cid}  {m.name}  {human_bytes(m.manifest.total_bytes)}  {state}  {m.folder}",
            event="model",
            model_cid=m.cid,
            name=m.name,
            bytes=m.manifest.total_bytes,
            complete=m.complete,
            fragments=sum(m.have),
            total_fragments=len(m.have),
            held_bytes=held.bytes,
            layers=held.layers,
            embeddings=held.embeddings,
            output=held.output,
            verified_files=store.verified_files(m),  # of fragments + header; per the saved record, nothing hashed
            folder=str(m.folder),
        )
    return 0


def _node_arguments(p: argparse.ArgumentParser, data_dir_required: bool = False) -> None:
    p.add_argument("--data-dir", help="folder of fragment folders (served; pulls land here)")
    p.add_argument("--listen", action="append", help=f"multiaddr to listen on (repeatable; default {DEFAULT_LISTEN})")
    p.add_argument("--bootstrap", action="append", help="multiaddr of a peer to join through (repeatable)")
    p.add_argument(
        "--config",
        help="TOML config file (default $GGUF_SWARM_CONFIG); GGUF_SWARM_* variables override it, flags override both",
    )
    p.add_argument(
        "--upload-rate",
        type=_rate,
        metavar="SIZE",
        help="cap on bytes served per second, all peers together (e.g. 50MB; 0: unlimited)",
    )
    p.add_argument(
        "--metrics",
        type=_metrics_addr,
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (a bare PORT: on 127.0.0.1)",
    )
    p.add_argument(
        "--web",
        metavar="HOST:PORT",
        help="serve a live dashboard on http://HOST:PORT/ (loopback only: 127.0.0.1, [::1], localhost)",
    )
    p.add_argument("--no-mdns", action="store_true", help="do not find or announce nodes on the LAN (mDNS)")
    p.add_argument("--json", action="store_true", help="events as one JSON object per line on stdout (logs: stderr)")
    _log_arguments(p)


def _log_arguments(p: argparse.ArgumentParser) -> None:
    logs_ = p.add_argument_group("logs (on stderr, apart from the events on stdout)")
    logs_.add_argument("-v", "--verbose", action="store_true", help="debug logs from our components")
    logs_.add_argument(
        "--log-level",
        type=_log_level,
        metavar="SPEC",
        help="LEVEL for our components and/or COMPONENT=LEVEL, comma-separated: e.g. info,swarm=debug,dht=info; "
        "other libraries are silent unless named (libp2p=warning). Default warning",
    )
    logs_.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="text (default), or json: one object per line (ts, level, logger, msg)",
    )


def _log_level(text: str) -> str:
    try:
        logs.parse_spec(text)
    except logs.LogSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


_SPLIT_EXAMPLES = {
    "fragment": """\
split models (llama.cpp's NAME-00001-of-0000N.gguf parts) make one folder and one CID:
  gguf-swarm fragment Qwen-00001-of-00003.gguf --output qwen   # finds parts 2 and 3 beside it""",
    "assemble": """\
a split model comes back as its parts, byte-identical, in the --output folder; or merged:
  gguf-swarm assemble qwen --output qwen-parts/           # qwen-parts/Qwen-0000{1,2,3}-of-00003.gguf
  gguf-swarm assemble qwen --output Qwen.gguf --merge     # one unsplit GGUF""",
}


def _add_split_examples(sub: Any) -> None:
    """Examples under `fragment --help` and `assemble --help` (fragmenter/cli.py
    builds those parsers; this console script is where users read them)."""
    for name, text in _SPLIT_EXAMPLES.items():
        p = sub.choices[name]
        p.epilog = text
        p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the example lines as written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gguf-swarm",
        description="Move GGUF models between machines, peer to peer.",
        epilog="node commands read a config file (--config, or GGUF_SWARM_CONFIG), then these environment variables "
        f"over it, then flags over both: {', '.join(ENVIRONMENT)}",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_fragmenter_commands(sub)
    _add_split_examples(sub)
    p = sub.add_parser("seed", help="serve every model in the data dir and keep them announced")
    keep = p.add_argument_group("keeping parts alive (take on a model's rarest fragments)")
    keep.add_argument("--adopt", action="append", metavar="MODEL_CID", help="adopt this model's rarest fragments")
    keep.add_argument("--budget", type=parse_size, metavar="SIZE", help="bytes of each adopted model to hold (2GiB)")
    keep.add_argument("--min-copies", type=_copies, default=2, metavar="K", help="copies of every fragment to keep (2)")
    keep.add_argument("--adopt-interval", type=_seconds, default=30.0, metavar="S", help="seconds between checks (30)")
    _node_arguments(p)
    p.set_defaults(func=cmd_seed)
    p = sub.add_parser("publish", help="fragment a GGUF into the data dir, then seed")
    p.add_argument("model", help="the GGUF file; for a split model (NAME-00001-of-0000N.gguf ...) any one part")
    p.add_argument("--chunk-size", type=parse_chunk_size, default=10 * 1024 * 1024)
    p.add_argument("--force", action="store_true", help="replace an existing fragment folder")
    p.add_argument(
        "--name",
        type=_name,
        help="also point this name at the model, signed by the node (pull PEER_ID/NAME), e.g. gemma-3-270m:q4_k_m",
    )
    _node_arguments(p)
    p.set_defaults(func=cmd_publish)
    p = sub.add_parser("pull", help="fetch a model (or some layers) by CID from the swarm, every fragment verified")
    p.add_argument("model_cid", metavar="MODEL", help="a model CID, or a published name: PEER_ID/NAME or ALIAS/NAME")
    p.add_argument(
        "--output",
        "-o",
        help="also assemble the GGUF here (checked against file_sha256); a split model: the folder for its parts",
    )
    p.add_argument("--merge", action="store_true", help="with --output, a split model: write one unsplit GGUF")
    p.add_argument("--timeout", type=_seconds, default=30.0, help="seconds to look for peers (default 30)")
    p.add_argument("--seed", action="store_true", help="keep serving after the pull")
    part = p.add_argument_group("partial pull (a node that runs some layers holds only those)")
    part.add_argument("--layers", metavar="RANGES", help="only these layers' tensors, e.g. 3-5 or 0,2,7-9")
    part.add_argument("--tensors", action="append", metavar="GLOB", help="only tensors matching GLOB (repeatable)")
    part.add_argument("--with-embeddings", action="store_true", help="with --layers: the token embeddings too")
    part.add_argument(
        "--with-output", action="store_true", help="with --layers: the output norm and head (token_embd if tied)"
    )
    _node_arguments(p)
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser(
        "where",
        help="map which peers hold which layers of a model, with copy counts (exit 3 while a layer has < K copies)",
    )
    p.add_argument("model_cid")
    p.add_argument("--min-copies", type=_copies, default=1, metavar="K", help="flag layers held by fewer than K peers")
    p.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to look for holders (default 10)")
    _node_arguments(p)
    p.set_defaults(func=cmd_where)
    p = sub.add_parser("name", help="point a name at a model CID, for the node of this data dir to publish")
    p.add_argument("name", type=_name)
    p.add_argument("model_cid")
    p.add_argument("--data-dir", required=True, help="the publishing node's data dir (its identity signs the name)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_name)
    p = sub.add_parser("alias", help="a short name for a publisher's peer id: pull ALIAS/NAME (no argument: list)")
    p.add_argument("alias", nargs="?", metavar="NAME")
    p.add_argument("peer_id", nargs="?", metavar="PEER_ID")
    p.set_defaults(func=cmd_alias)
    p = sub.add_parser("models", help="list local models with their CIDs")
    p.add_argument("--data-dir", help="the node's data dir (or GGUF_SWARM_DATA_DIR, or data_dir in --config)")
    p.add_argument("--config", help="TOML config file (default $GGUF_SWARM_CONFIG): its data_dir")
    p.add_argument("--json", action="store_true")
    _log_arguments(p)
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "config"):  # a node command: config file, GGUF_SWARM_* over it, flags over both
        try:
            args.settings = read_settings(args, os.environ)
        except NodeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    settings = getattr(args, "settings", None)
    if settings is not None:
        import libp2p  # noqa: F401  (a node command: py-libp2p sets up its logging as it loads; ours takes over)
    logs.configure(settings.log if settings is not None else logs.LogConfig())
    return run(args, args.func)


def entry() -> NoReturn:
    """The console script (and `python -m node.cli`): main(), then a quick exit."""
    keep_freed_memory()  # a process of its own: block buffers reused, not faulted in again (fragmenter/heap.py)
    stop_when_stdout_reader_leaves()  # `| head`: stop quietly, as SIGPIPE would (fragmenter/stdout_reader.py)
    quick_exit(main())


if __name__ == "__main__":
    entry()
