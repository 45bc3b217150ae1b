"""Command-line front of the fragmenter: argument parsing and one-line errors.

`gguf-swarm` (node/cli.py) registers these subcommands next to the node's;
`python -m fragmenter MODEL.gguf --output DIR` runs `fragment` alone.
"""

from __future__ import annotations

import argparse
import json
import mmap
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .assembly import AssembleResult, assemble
from .errors import FragmenterError
from .folder import verify_folder
from .fragment import DEFAULT_CHUNK_SIZE, fragment_model
from .gguf_header import check_tensor_data, parse_header
from .progress import ProgressBar, human_bytes
from .rebuild import rebuild_manifest
from .split import check_holds_metadata
from .tensors import validate_folder
from .tokenizer import write_tokenizer_files

_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "KIB": 1024,
    "KI": 1024,
    "M": 1000**2,
    "MB": 1000**2,
    "MIB": 1024**2,
    "MI": 1024**2,
    "G": 1000**3,
    "GB": 1000**3,
    "GIB": 1024**3,
    "GI": 1024**3,
}


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m or (m.group(2) or "").upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 10MiB, 4194304)")
    n = int(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if n <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return n


MIN_CHUNK_SIZE = 4 << 10  # a 400 GB model in 8 KiB chunks is 50 M files already
MAX_CHUNK_SIZE = 1 << 30  # a fragment's block digests must fit one protocol frame


def parse_chunk_size(text: str) -> int:
    n = parse_size(text)
    if not MIN_CHUNK_SIZE <= n <= MAX_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(f"chunk size must be from 4KiB to 1GiB, not {text}")
    return n


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the work the way Ctrl-C does: staging folders are cleaned
    up on the way out, instead of left behind by an abrupt exit."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def emit(args: argparse.Namespace, text: str, **fields: Any) -> None:
    """One human line, or one JSON object with --json."""
    if getattr(args, "json", False):
        print(json.dumps(fields), flush=True)
    else:
        print(text, flush=True)


def progress_bar(args: argparse.Namespace, label: str) -> ProgressBar | None:
    return None if getattr(args, "json", False) or getattr(args, "quiet", False) else ProgressBar(label)


def cmd_fragment(args: argparse.Namespace) -> int:
    bar = progress_bar(args, "fragment")
    with sigterm_as_interrupt():
        models = [Path(m) for m in args.model]  # a split model's parts, or one of them
        result = fragment_model(
            models[0] if len(models) == 1 else models, Path(args.output), args.chunk_size, args.force, bar
        )
    if bar:
        bar.close()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    speed = result.file_size / max(result.seconds, 1e-9)
    of_parts = f" ({result.parts} parts)" if result.parts > 1 else ""
    emit(
        args,
        f"{result.model_cid}\n{result.fragments} fragments, {human_bytes(result.file_size)}{of_parts} in "
        f"{result.seconds:.1f} s ({human_bytes(speed)}/s) -> {result.folder}",
        event="fragmented",
        model_cid=result.model_cid,
        folder=str(result.folder),
        fragments=result.fragments,
        parts=result.parts,
        file_size=result.file_size,
        file_sha256=result.file_sha256,
        seconds=round(result.seconds, 3),
        tokenizer_files=result.tokenizer_files,
        warnings=result.warnings,
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    bar = progress_bar(args, "verify")
    report = verify_folder(Path(args.folder), bar)
    if bar:
        bar.close()
    for fid in report.missing:
        emit(args, f"missing: {fid}", event="missing", fragment_id=fid)
    for fid, reason in report.bad:
        emit(args, f"bad: {fid}: {reason}", event="bad", fragment_id=fid, reason=reason)
    verdict = "ok" if report.ok else "FAILED"
    emit(
        args,
        f"{verdict}: {report.checked} fragments checked, {len(report.bad)} bad, {len(report.missing)} missing",
        event="verified",
        ok=report.ok,
        checked=report.checked,
        bad=len(report.bad),
        missing=len(report.missing),
    )
    return 0 if report.ok else 1


def cmd_assemble(args: argparse.Namespace) -> int:
    bar = progress_bar(args, "assemble")
    with sigterm_as_interrupt():  # the staging file is removed on the way out
        result = assemble(Path(args.folder), Path(args.output), args.force, bar, merge=args.merge)
    if bar:
        bar.close()
    if result.merged:
        checked = "merged from the parts, every fragment checked"
    elif result.files:
        checked = f"{len(result.files)} parts, each matches its file_sha256"
    elif result.checked_against_manifest:
        checked = "matches file_sha256"
    else:
        checked = "no file_sha256 to check against"
    emit(
        args,
        f"{result.output} ({human_bytes(result.file_size)}, sha256 {result.file_sha256}, {checked})",
        event="assembled",
        **assembled_fields(result),
    )
    return 0


def assembled_fields(result: AssembleResult) -> dict[str, Any]:
    """The JSON fields of an "assembled" event (`assemble`, and `pull --output`)."""
    return {
        "output": str(result.output),
        "file_size": result.file_size,
        "file_sha256": result.file_sha256,
        "checked": result.checked_against_manifest,
        "files": [str(f) for f in result.files],
        "merged": result.merged,
    }


def cmd_manifest(args: argparse.Namespace) -> int:
    cid, n = rebuild_manifest(Path(args.folder))
    emit(args, f"{cid}\nmanifest.json written: {n} fragments", event="manifest", model_cid=cid, fragments=n)
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    path = Path(args.model)
    try:
        with open(path, "rb") as f:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                header = parse_header(m)
                check_tensor_data(header, len(m))  # a cut-short model is refused, as llama.cpp does
                check_holds_metadata(header, path)  # a split model's vocabulary is in part 1
                Path(args.folder).mkdir(parents=True, exist_ok=True)
                names = write_tokenizer_files(header, Path(args.folder))
    except (OSError, ValueError) as e:
        raise FragmenterError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not names:
        raise FragmenterError(f"{path}: this model has no vocabulary")
    emit(args, "wrote " + ", ".join(names), event="tokenizer", files=names)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    bar = progress_bar(args, "validate")
    report = validate_folder(Path(args.folder), bar)
    if bar:
        bar.close()
    for problem in report.problems:
        emit(args, f"problem: {problem}", event="problem", problem=problem)
    verdict = "ok" if report.ok else "FAILED"
    emit(
        args,
        f"{verdict}: {report.tensors} tensors dequantized, {len(report.problems)} problems",
        event="validated",
        ok=report.ok,
        tensors=report.tensors,
        problems=len(report.problems),
    )
    return 0 if report.ok else 1


def add_fragmenter_commands(sub: Any) -> None:
    p = sub.add_parser("fragment", help="cut a GGUF model into verified fragments; prints the model CID")
    add_fragment_arguments(p)
    p = sub.add_parser("manifest", help="(re)build manifest.json from gguf_header.dat and the fragments")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_manifest)
    p = sub.add_parser("tokenizer", help="write tokenizer.json and its Hugging Face companions from a GGUF vocabulary")
    p.add_argument("model")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_tokenizer)
    p = sub.add_parser("verify", help="check every fragment against the manifest")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser(
        "assemble", help="put the original GGUF back together, byte-identical (a split model: its parts, in a folder)"
    )
    p.add_argument("folder")
    p.add_argument("--output", "-o", required=True, help="the file; for a split model, the folder for its parts")
    p.add_argument("--merge", action="store_true", help="a split model: write one unsplit GGUF file instead")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_assemble)
    p = sub.add_parser("validate", help="dequantize every tensor from its fragments")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_validate)


def add_fragment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="+",
        help="the GGUF file; for a split model (NAME-00001-of-0000N.gguf ...) its first part, or all its parts",
    )
    p.add_argument("--output", "-o", required=True, help="folder to write (must not exist or be empty)")
    p.add_argument(
        "--chunk-size", type=parse_chunk_size, default=DEFAULT_CHUNK_SIZE, help="fragment size (default 10MiB)"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_fragment)


def run(args: argparse.Namespace, func: Callable[[argparse.Namespace], int]) -> int:
    """Run a command; turn every expected failure into one line on stderr."""
    try:
        return func(args)
    except FragmenterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        where = f" {e.filename}:" if getattr(e, "filename", None) else ""
        print(f"error:{where} {e.strerror or e}", file=sys.stderr)
        return 1


def main_fragment(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fragmenter", description="Cut a GGUF model into fragments.")
    add_fragment_arguments(parser)
    args = parser.parse_args(argv)
    return run(args, args.func)
