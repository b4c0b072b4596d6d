"""The qaserve-client command line: ask a question, answer a JSONL file of questions, or check health."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from qaserve_client.channel import create_channel, tls_credentials
from qaserve_client.client import DEFAULT_TARGET, DEFAULT_TIMEOUT, QAClient
from qaserve_client.errors import QAServeError
from qaserve_client.items import ManyItem
from qaserve_client.models import LOAD_TIMEOUT
from qaserve_client.results import AnswerResult, Progress

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 2

_BATCH_STR_FIELDS = ("question", "context", "model")
_BATCH_INT_FIELDS = ("top_k", "max_answer_len", "max_seq_len", "doc_stride", "max_question_len")
_BATCH_BOOL_FIELDS = ("handle_impossible_answer", "align_to_words")
_BATCH_FIELDS = frozenset(("id", *_BATCH_STR_FIELDS, *_BATCH_INT_FIELDS, *_BATCH_BOOL_FIELDS))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI with `argv` (default sys.argv[1:]) and returns the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        channel = _channel(args)
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    try:
        with channel, QAClient(channel=channel, timeout=args.timeout) as client:
            if args.command == "health":
                return _health(client, args)
            if args.command == "models":
                return _models(client, args)
            if args.command == "batch":
                return _batch(client, args)
            return _ask(client, args)
    except QAServeError as error:
        print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
        for field, description in error.field_violations:
            print(f"  {field}: {description}", file=sys.stderr)
        return _exit_status(error)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qaserve-client",
        description="Ask a qaserve server a question or a file of questions, or check its health.",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("QASERVE_TARGET", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help=f"server address, or dns:///NAME:PORT to spread calls over every address of NAME "
        f"(default: $QASERVE_TARGET or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"deadline of each call; of the whole stream for ask --stream and batch (default: {DEFAULT_TIMEOUT:g})",
    )
    _add_connection_options(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    ask = commands.add_parser("ask", help="answer a question about a context")
    ask.add_argument("--question", required=True, help="the question")
    context = ask.add_mutually_exclusive_group(required=True)
    context.add_argument("--context", help="the text to find the answer in")
    context.add_argument("--context-file", metavar="FILE", help="read the context from FILE (UTF-8); - for stdin")
    ask.add_argument("--model", default="", help="configured model name (default: the server's default)")
    ask.add_argument("--top-k", type=int, metavar="K", help="number of answers (server default: 1)")
    ask.add_argument("--max-answer-len", type=int, metavar="N", help="longest answer, in tokens")
    ask.add_argument("--max-seq-len", type=int, metavar="N", help="tokens per window")
    ask.add_argument("--doc-stride", type=int, metavar="N", help="overlap between windows, in tokens")
    ask.add_argument("--max-question-len", type=int, metavar="N", help="longest question accepted, in tokens")
    ask.add_argument(
        "--handle-impossible-answer", action="store_true", help="let the empty answer compete with the spans"
    )
    ask.add_argument(
        "--no-align-to-words",
        dest="align_to_words",
        action="store_const",
        const=False,
        default=None,
        help="do not widen answers to whole words",
    )
    ask.add_argument("--json", action="store_true", help="print the result as JSON")
    ask.add_argument(
        "--stream",
        action="store_true",
        help="print the best answer so far as each group of windows is scored, then the result "
        '(with --json: one JSON object per line, {"partial": ...} then {"final": ...})',
    )

    batch = commands.add_parser(
        "batch",
        help="answer the questions of a JSONL file over one stream, printing one JSON result per line",
        description="Sends every line of FILE over one AnswerMany stream and prints one JSON line per result, "
        "in the order they complete: the answers, or an error. Exits 0 when all succeed, 1 when any fails.",
    )
    batch.add_argument(
        "file",
        metavar="FILE",
        help='JSONL, one object per line: {"id", "question", "context"} plus optional "model", '
        + ", ".join(f'"{name}"' for name in (*_BATCH_INT_FIELDS, *_BATCH_BOOL_FIELDS))
        + "; id defaults to the line number; - for stdin",
    )

    health = commands.add_parser("health", help="print the grpc.health.v1 status; exit 0 only when SERVING")
    health.add_argument("--service", default="", help="service to check (default: the whole server)")

    models = commands.add_parser("models", help="list, load or unload the server's configured models")
    actions = models.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every configured model with its state")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for action, text in (("load", "load a configured model (retries a failed one)"), ("unload", "unload a model")):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("name", help="a configured model name")
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    security = parser.add_argument_group(
        "TLS and tokens",
        "Each option also reads the variable named in its help. The token itself is read from $QASERVE_TOKEN "
        "or --token-file, never from a flag, which would show in process listings.",
    )
    security.add_argument(
        "--tls", action="store_true", help="connect over TLS, checking the server with the system's CAs"
    )
    for flag, env, text in (
        ("--ca-file", "QASERVE_CA_FILE", "PEM CA bundle to check the server's certificate with (implies --tls)"),
        ("--cert-file", "QASERVE_CERT_FILE", "PEM client certificate for mutual TLS (implies --tls; with --key-file)"),
        ("--key-file", "QASERVE_KEY_FILE", "PEM private key of --cert-file"),
        ("--server-name", "QASERVE_SERVER_NAME", "name the server's certificate must carry, if not the target's host"),
        ("--token-file", "QASERVE_TOKEN_FILE", "file holding the bearer token to send"),
    ):
        metavar = "NAME" if flag == "--server-name" else "FILE"
        security.add_argument(flag, default=os.environ.get(env) or None, metavar=metavar, help=f"{text} [${env}]")


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """The channel the connection options describe; OSError when a file cannot be read."""
    token = os.environ.get("QASERVE_TOKEN") or None
    if args.token_file:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty")
    credentials = None
    if args.tls or args.ca_file or args.cert_file or args.key_file:
        credentials = tls_credentials(args.ca_file, args.cert_file, args.key_file)
    return create_channel(args.target, credentials=credentials, token=token, server_name=args.server_name)


def _ask(client: QAClient, args: argparse.Namespace) -> int:
    if args.context is not None:
        context: str = args.context
    else:
        try:
            context = _read_text(args.context_file)
        except (OSError, UnicodeDecodeError) as error:
            print(f"error: cannot read context from {args.context_file}: {error}", file=sys.stderr)
            return EXIT_FAILED
    options: dict[str, Any] = {
        "model": args.model,
        "top_k": args.top_k,
        "max_answer_len": args.max_answer_len,
        "max_seq_len": args.max_seq_len,
        "doc_stride": args.doc_stride,
        "max_question_len": args.max_question_len,
        "handle_impossible_answer": args.handle_impossible_answer,
        "align_to_words": args.align_to_words,
    }
    if args.stream:
        return _ask_stream(client, args.question, context, options, as_json=args.json)
    result = client.answer(args.question, context, **options)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_table(result)
    return EXIT_OK


def _ask_stream(client: QAClient, question: str, context: str, options: dict[str, Any], *, as_json: bool) -> int:
    # flush=True: each update is worth seeing as it arrives, also through a pipe.
    for update in client.answer_progressive(question, context, **options):
        if isinstance(update, Progress):
            if as_json:
                print(json.dumps({"partial": update.to_dict()}), flush=True)
            else:
                print(_progress_line(update), flush=True)
        elif as_json:
            print(json.dumps({"final": update.to_dict()}), flush=True)
        else:
            _print_table(update)
    return EXIT_OK


def _batch(client: QAClient, args: argparse.Namespace) -> int:
    try:
        text = _read_text(args.file)
    except (OSError, UnicodeDecodeError) as error:
        print(f"error: cannot read {args.file}: {error}", file=sys.stderr)
        return EXIT_FAILED
    try:
        items = _parse_batch(text)
    except ValueError as error:
        print(f"error: {args.file}: {error}", file=sys.stderr)
        return EXIT_FAILED
    pending = {item.id for item in items}
    failed = False
    for outcome in client.answer_many(items):
        pending.discard(outcome.id)
        failed = failed or outcome.error is not None
        print(json.dumps(outcome.to_dict()), flush=True)
    if pending:
        print(f"error: the stream ended without a result for {len(pending)} item(s)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if failed else EXIT_OK


def _parse_batch(text: str) -> list[ManyItem]:
    """Parses every line of a batch file before anything is sent; raises ValueError naming the bad line."""
    items: list[ManyItem] = []
    first_line_of: dict[str, int] = {}
    # Split on "\n" alone: str.splitlines would also split on U+2028 and others, which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = _batch_item(line, number)
        except ValueError as error:
            raise ValueError(f"line {number}: {error}") from None
        if item.id in first_line_of:
            raise ValueError(f"line {number}: duplicate id {item.id!r}, first on line {first_line_of[item.id]}")
        first_line_of[item.id] = number
        items.append(item)
    return items


def _batch_item(line: str, number: int) -> ManyItem:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    unknown = sorted(set(data) - _BATCH_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")
    item_id = data.get("id", number)
    # bool is an int in Python but not an id, nor a count in the integer options below.
    if isinstance(item_id, bool) or not isinstance(item_id, str | int):
        raise ValueError('"id" must be a string or an integer')
    for name in ("question", "context"):
        if name not in data:
            raise ValueError(f'missing "{name}"')
    for name in _BATCH_STR_FIELDS:
        if name in data and not isinstance(data[name], str):
            raise ValueError(f'"{name}" must be a string')
    for name in _BATCH_INT_FIELDS:
        if data.get(name) is not None and (isinstance(data[name], bool) or not isinstance(data[name], int)):
            raise ValueError(f'"{name}" must be an integer')
    for name in _BATCH_BOOL_FIELDS:
        if data.get(name) is not None and not isinstance(data[name], bool):
            raise ValueError(f'"{name}" must be true or false')
    return ManyItem(
        id=str(item_id),
        question=data["question"],
        context=data["context"],
        model=data.get("model", ""),
        top_k=data.get("top_k"),
        max_answer_len=data.get("max_answer_len"),
        max_seq_len=data.get("max_seq_len"),
        doc_stride=data.get("doc_stride"),
        max_question_len=data.get("max_question_len"),
        handle_impossible_answer=data.get("handle_impossible_answer") or False,
        align_to_words=data.get("align_to_words"),
    )


def _health(client: QAClient, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    print(status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILED


def _models(client: QAClient, args: argparse.Namespace) -> int:
    if args.action == "list":
        infos = client.list_models()
    elif args.action == "load":
        infos = [client.load_model(args.name, timeout=max(args.timeout, LOAD_TIMEOUT))]
    else:
        infos = [client.unload_model(args.name, timeout=max(args.timeout, LOAD_TIMEOUT))]
    if args.json:
        print(json.dumps([info.to_dict() for info in infos] if args.action == "list" else infos[0].to_dict()))
        return EXIT_OK
    print(f"{'name':<24} {'state':<9} {'default':<7} {'pinned':<6} {'devices':<12} {'MB':>8}  error")
    for info in infos:
        print(
            f"{info.name:<24} {info.state:<9} {'yes' if info.is_default else '':<7} {'yes' if info.pinned else '':<6} "
            f"{','.join(info.devices):<12} {info.bytes / 1e6:>8.1f}  {info.error}"
        )
    return EXIT_OK


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    return Path(path).read_text(encoding="utf-8")


def _progress_line(progress: Progress) -> str:
    if progress.answers:
        best = progress.answers[0]
        text = f"{best.answer or '(no answer)'} ({best.score:.4f})"
    else:
        text = "(none yet)"
    return f"[{progress.windows_done}/{progress.windows_total}] best: {text}"


def _print_table(result: AnswerResult) -> None:
    if not result.answers:
        print("no answers")
        return
    spans = [f"{a.start}-{a.end}" for a in result.answers]
    width = max(len("span"), *(len(span) for span in spans))
    print(f"{'score':<8}{'span':<{width + 2}}answer")
    for answer, span in zip(result.answers, spans, strict=True):
        text = answer.answer if answer.answer else "(no answer)"
        print(f"{answer.score:<8.4f}{span:<{width + 2}}{text}")


def _exit_status(error: QAServeError) -> int:
    # UNAVAILABLE without an ErrorInfo reason comes from the transport (nothing listening, connection
    # refused), not from a qaserve server, which always names its reason (MODEL_NOT_READY, SHUTTING_DOWN).
    if error.code == grpc.StatusCode.UNAVAILABLE and error.reason is None:
        return EXIT_UNREACHABLE
    return EXIT_FAILED
