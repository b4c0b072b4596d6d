"""The qaserve-client command line: ask a question, read passages, answer a JSONL file of questions, check health,
manage models."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from qaserve_client._version import __version__
from qaserve_client.channel import create_channel, tls_credentials
from qaserve_client.client import DEFAULT_TARGET, DEFAULT_TIMEOUT, QAClient
from qaserve_client.errors import QAServeError
from qaserve_client.items import ManyItem
from qaserve_client.models import LOAD_TIMEOUT
from qaserve_client.options import (
    OPTION_NAMES,
    READ_OPTION_NAMES,
    AnswerOptions,
    DecodingOptions,
    ReadOptions,
    options_of_request,
)
from qaserve_client.results import Answer, ManyResult, PassageAnswer, Progress, ReadResult
from qaserve_client.v1 import question_answering_pb2 as pb

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RPC_BASE = 64


def exit_status(code: grpc.StatusCode) -> int:
    """The exit status of a call that failed with `code`: 64 + the code's number, grpcurl's convention."""
    number: int = code.value[0]
    return EXIT_RPC_BASE + number


def _exit_codes_epilog() -> str:
    codes = [code for code in grpc.StatusCode if code != grpc.StatusCode.OK]
    listing = [f"{exit_status(code)} {code.name}" for code in codes]
    rows = ["  " + ", ".join(listing[i : i + 4]) for i in range(0, len(listing), 4)]
    return "\n".join(
        [
            "exit status:",
            "  0       success (health: SERVING)",
            "  1       failed without an RPC error: an input that cannot be read or parsed, a health status other",
            "          than SERVING, a batch in which any item failed (its summary counts them by code)",
            "  2       usage error: a bad flag or flag value",
            "  64 + N  the call failed with gRPC status code N (grpcurl's convention); 78 UNAVAILABLE also means",
            "          that the server could not be reached",
            *rows,
            "",
            "With --json, results go to stdout and a failure goes to stderr as one JSON object",
            '{"error": {"code", "code_number", "message", "reason", "field_violations", "retry_after", "request_id"}}.',
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI with `argv` (default sys.argv[1:]) and returns the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    out = _Output(as_json=args.json, verbose=args.verbose)
    try:
        channel = _channel(args)
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        out.failure(str(error))
        return EXIT_FAILED
    metadata = args.header or ()
    try:
        with channel, QAClient(channel=channel, timeout=args.timeout, metadata=metadata) as client:
            command: Callable[[QAClient, argparse.Namespace, _Output], int] = args.run
            return command(client, args, out)
    except QAServeError as error:
        out.rpc_failure(error)
        return exit_status(error.code)
    except _Failure as failure:
        out.failure(str(failure))
        return EXIT_FAILED


class _Failure(Exception):
    """A failure that is not an RPC error, such as an input that cannot be read: main reports it, exit status 1."""


class _Output:
    """Where results, failures and request ids go: results on stdout, the rest on stderr; JSON with --json."""

    def __init__(self, *, as_json: bool, verbose: bool) -> None:
        self.as_json = as_json
        self.verbose = verbose

    def result(self, data: Any) -> None:
        # flush=True: each line is worth seeing as it arrives, also through a pipe.
        print(json.dumps(data), flush=True)

    def failure(self, message: str) -> None:
        """A failure that is not an RPC error."""
        if self.as_json:
            print(json.dumps({"error": {"message": message}}), file=sys.stderr)
        else:
            print(f"error: {message}", file=sys.stderr)

    def rpc_failure(self, error: QAServeError) -> None:
        if self.as_json:
            print(json.dumps({"error": error.to_dict()}), file=sys.stderr)
            return
        print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
        for field, description in error.field_violations:
            print(f"  {field}: {description}", file=sys.stderr)
        if error.retry_after is not None:
            print(f"  retry after {error.retry_after:g} s", file=sys.stderr)
        if self.verbose and error.request_id:
            print(f"  request id: {error.request_id}", file=sys.stderr)

    def request_id(self, request_id: str) -> None:
        """Reports a call's request id with -v."""
        if self.verbose and request_id:
            print(f"request id: {request_id}", file=sys.stderr)


_HEADER_NAME = re.compile(r"[0-9a-z_.-]+")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")


def _header(text: str) -> tuple[str, str]:
    """KEY:VALUE -> (key, value), as gRPC metadata takes them: the key in lower case, ASCII only."""
    key, colon, value = text.partition(":")
    key, value = key.strip().lower(), value.strip()
    if not colon or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY:VALUE")
    if not _HEADER_NAME.fullmatch(key):
        raise argparse.ArgumentTypeError(f"{key!r}: a header name holds only letters, digits, '-', '_' and '.'")
    if key.startswith("grpc-"):
        raise argparse.ArgumentTypeError(f"{key!r}: grpc- headers are reserved for gRPC itself")
    if key.endswith("-bin"):
        raise argparse.ArgumentTypeError(f"{key!r}: binary (-bin) headers are not supported")
    if not _HEADER_VALUE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{key!r}: a header value holds only printable ASCII")
    return key, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qaserve-client",
        description="Ask a qaserve server a question or a file of questions, read passages for a question, check "
        "its health, manage its models.",
        epilog=_exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qaserve-client {__version__}")
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
    parser.add_argument(
        "-H",
        "--header",
        type=_header,
        action="append",
        metavar="KEY:VALUE",
        help="send this metadata with every call; repeatable. x-request-id:ID chooses the request id",
    )
    # Also accepted after the command (qaserve-client ask ... --json): SUPPRESS keeps a command's parser from
    # overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    for parent, default in ((parser, False), (common, argparse.SUPPRESS)):
        parent.add_argument("--json", action="store_true", default=default, help="print results and errors as JSON")
        parent.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=default,
            help="print the request id of each answer and of a failure on stderr",
        )
    _add_connection_options(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    ask = commands.add_parser("ask", parents=[common], help="answer a question about a context")
    ask.set_defaults(run=_ask)
    ask.add_argument("--question", required=True, help="the question")
    context = ask.add_mutually_exclusive_group(required=True)
    context.add_argument("--context", help="the text to find the answer in")
    context.add_argument("--context-file", metavar="FILE", help="read the context from FILE (UTF-8); - for stdin")
    _add_option_flags(ask, AnswerOptions, "answer options")
    ask.add_argument(
        "--stream",
        action="store_true",
        help="print the best answer so far as each group of windows is scored, then the result "
        '(with --json: one JSON object per line, {"partial": ...} then {"final": ...})',
    )

    read = commands.add_parser(
        "read",
        parents=[common],
        help="find the best answers to a question across several passages (a retrieval pipeline's reader)",
        description="Reads every --passage for --question in one call and prints the best answers across them, "
        "each with the index (from 0) of its passage. Calibrated scores (the default) compare across passages.",
    )
    read.set_defaults(run=_read)
    read.add_argument("--question", required=True, help="the question")
    read.add_argument(
        "--passage",
        action="append",
        required=True,
        metavar="TEXT",
        help="a passage to read; repeat the flag for each passage, in order",
    )
    _add_option_flags(read, ReadOptions, "read options")

    batch = commands.add_parser(
        "batch",
        parents=[common],
        help="answer the questions of a JSONL file over one stream, printing one JSON result per line",
        description="Sends every line of FILE over one AnswerMany stream and prints one JSON line per result, "
        "in the order they complete: the answers, or an error. On stderr: progress while stderr is a terminal, "
        "then a summary (items, failures by code, questions per second). Exits 0 when all succeed, 1 when any "
        "fails.",
    )
    batch.set_defaults(run=_batch)
    batch.add_argument(
        "file",
        metavar="FILE",
        help='JSONL, one object per line: "id" plus the proto JSON of an AnswerRequest, i.e. "question", "context" '
        "and optionally " + ", ".join(f'"{name}"' for name in OPTION_NAMES) + "; id defaults to the line number; "
        "- for stdin",
    )

    health = commands.add_parser(
        "health", parents=[common], help="print the grpc.health.v1 status; exit 0 only when SERVING"
    )
    health.set_defaults(run=_health)
    health.add_argument("--service", default="", help="service to check (default: the whole server)")

    models = commands.add_parser("models", help="list, load or unload the server's configured models")
    actions = models.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[common], help="every configured model with its state")
    listing.set_defaults(run=_models)
    for action, text in (("load", "load a configured model (retries a failed one)"), ("unload", "unload a model")):
        sub = actions.add_parser(action, parents=[common], help=text)
        sub.set_defaults(run=_models)
        sub.add_argument("name", help="a configured model name")
    return parser


def _add_option_flags(parser: argparse.ArgumentParser, kind: type[DecodingOptions], title: str) -> None:
    """One flag per field of `kind` (AnswerOptions, ReadOptions): --top-k for top_k; unset flags leave the
    server's defaults."""
    group = parser.add_argument_group(title, "Options left out take the server's defaults.")
    hints = typing.get_type_hints(kind)
    for field in dataclasses.fields(kind):
        flag = "--" + field.name.replace("_", "-")
        kinds = set(typing.get_args(hints[field.name])) or {hints[field.name]}
        choices = [k for k in kinds if typing.get_origin(k) is typing.Literal]
        text, metavar = field.metadata["help"], field.metadata["metavar"]
        if kinds == {bool}:
            group.add_argument(flag, action="store_true", help=text)
        elif kinds == {bool, types.NoneType}:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kinds == {int, types.NoneType}:
            group.add_argument(flag, type=int, metavar=metavar, help=text)
        elif kinds == {float, types.NoneType}:
            group.add_argument(flag, type=float, metavar=metavar, help=text)
        elif kinds == {str}:
            group.add_argument(flag, default=field.default, metavar=metavar, help=text)
        elif len(choices) == 1 and kinds == {*choices, types.NoneType}:
            group.add_argument(flag, choices=typing.get_args(choices[0]), help=text)
        else:
            raise TypeError(f"{kind.__name__}.{field.name}: no command-line flag for {hints[field.name]}")


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


def _ask(client: QAClient, args: argparse.Namespace, out: _Output) -> int:
    if args.context is not None:
        context: str = args.context
    else:
        context = _read_text(args.context_file, f"context from {args.context_file}")
    options = AnswerOptions(**{name: getattr(args, name) for name in OPTION_NAMES})
    if args.stream:
        return _ask_stream(client, args.question, context, options, out)
    result = client.answer(args.question, context, options)
    if out.as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_table(result.answers)
    out.request_id(result.request_id)
    return EXIT_OK


def _read(client: QAClient, args: argparse.Namespace, out: _Output) -> int:
    options = ReadOptions(**{name: getattr(args, name) for name in READ_OPTION_NAMES})
    result: ReadResult = client.read(args.question, args.passage, options)
    if out.as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_table(result.answers)
        if result.no_answer_score is not None:
            print(f"no answer: {result.no_answer_score:.4f}")
    out.request_id(result.request_id)
    return EXIT_OK


def _ask_stream(client: QAClient, question: str, context: str, options: AnswerOptions, out: _Output) -> int:
    for update in client.answer_progressive(question, context, options):
        if isinstance(update, Progress):
            if out.as_json:
                out.result({"partial": update.to_dict()})
            else:
                print(_progress_line(update), flush=True)
        else:
            if out.as_json:
                out.result({"final": update.to_dict()})
            else:
                _print_table(update.answers)
            out.request_id(update.request_id)
    return EXIT_OK


def _batch(client: QAClient, args: argparse.Namespace, out: _Output) -> int:
    text = _read_text(args.file, args.file)
    try:
        items = _parse_batch(text)
    except ValueError as error:
        raise _Failure(f"{args.file}: {error}") from None
    summary = _BatchSummary(items=len(items), show_progress=sys.stderr.isatty())
    pending = {item.id for item in items}
    try:
        for outcome in client.answer_many(items):
            pending.discard(outcome.id)
            out.result(outcome.to_dict())
            summary.add(outcome)
    finally:
        summary.report(out)
    if pending:
        raise _Failure(f"the stream ended without a result for {len(pending)} item(s)")
    return EXIT_FAILED if summary.failed else EXIT_OK


class _BatchSummary:
    """Counts a batch's outcomes; shows progress on a terminal and reports the totals on stderr."""

    def __init__(self, *, items: int, show_progress: bool) -> None:
        self.items = items
        self.show_progress = show_progress
        self.ok = 0
        self.failed = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.request_id = ""
        self._started = time.monotonic()

    def add(self, outcome: ManyResult) -> None:
        self.request_id = self.request_id or outcome.request_id
        if outcome.error is None:
            self.ok += 1
        else:
            self.failed += 1
            self.errors[outcome.error.code.name] += 1
        if self.show_progress:
            print(f"\r{self.ok + self.failed}/{self.items} answered, {self.failed} failed", end="", file=sys.stderr)
            sys.stderr.flush()

    def report(self, out: _Output) -> None:
        if self.show_progress:
            print("\r\x1b[K", end="", file=sys.stderr)  # clear the progress line
        seconds = time.monotonic() - self._started
        done = self.ok + self.failed
        rate = done / seconds if seconds > 0 else 0.0
        if out.as_json:
            summary = {
                "items": self.items,
                "ok": self.ok,
                "failed": self.failed,
                "errors": dict(self.errors),
                "without_result": self.items - done,
                "seconds": round(seconds, 3),
                "questions_per_second": round(rate, 2),
                "request_id": self.request_id or None,
            }
            print(json.dumps({"summary": summary}), file=sys.stderr)
            return
        by_code = ", ".join(f"{code} {count}" for code, count in sorted(self.errors.items()))
        failed = f"{self.failed} failed" + (f" ({by_code})" if by_code else "")
        missing = f", {self.items - done} without a result" if done < self.items else ""
        print(
            f"{self.items} items: {self.ok} ok, {failed}{missing} in {seconds:.2f} s, {rate:.1f} questions/s",
            file=sys.stderr,
        )
        out.request_id(self.request_id)


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
    """One line: "id" plus the proto JSON of an AnswerRequest, which json_format checks field by field."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    item_id = data.pop("id", number)
    # bool is an int in Python but not an id.
    if isinstance(item_id, bool) or not isinstance(item_id, str | int):
        raise ValueError('"id" must be a string or an integer')
    for name in ("question", "context"):
        if name not in data:
            raise ValueError(f'missing "{name}"')
    request = pb.AnswerRequest()
    try:
        json_format.ParseDict(data, request)
    except json_format.ParseError as error:
        # The message names the field; the first line is enough (an unknown field also lists every known one).
        raise ValueError(str(error).split("\n")[0]) from None
    return ManyItem.of(str(item_id), request.question, request.context, options_of_request(request))


def _health(client: QAClient, args: argparse.Namespace, out: _Output) -> int:
    status = client.health(args.service)
    print(json.dumps({"status": status}) if out.as_json else status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILED


def _models(client: QAClient, args: argparse.Namespace, out: _Output) -> int:
    if args.action == "list":
        infos = client.list_models()
    else:
        change = client.load_model if args.action == "load" else client.unload_model
        infos = [change(args.name, timeout=max(args.timeout, LOAD_TIMEOUT))]
    if out.as_json:
        print(json.dumps([info.to_dict() for info in infos] if args.action == "list" else infos[0].to_dict()))
        return EXIT_OK
    print(f"{'name':<24} {'state':<9} {'default':<7} {'pinned':<6} {'devices':<12} {'MB':>8}  error")
    for info in infos:
        print(
            f"{info.name:<24} {info.state:<9} {'yes' if info.is_default else '':<7} {'yes' if info.pinned else '':<6} "
            f"{','.join(info.devices):<12} {info.bytes / 1e6:>8.1f}  {info.error}"
        )
    return EXIT_OK


def _read_text(path: str, what: str) -> str:
    """The text of `path` (- for stdin); _Failure "cannot read `what`" when it cannot be read as UTF-8."""
    try:
        if path == "-":
            return sys.stdin.read()
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise _Failure(f"cannot read {what}: {error}") from None


def _progress_line(progress: Progress) -> str:
    if progress.answers:
        best = progress.answers[0]
        text = f"{best.answer or '(no answer)'} ({best.score:.4f})"
    else:
        text = "(none yet)"
    return f"[{progress.windows_done}/{progress.windows_total}] best: {text}"


def _print_table(answers: Sequence[Answer | PassageAnswer]) -> None:
    """Score, span and text of each answer; and its passage, for a read's answers."""
    if not answers:
        print("no answers")
        return
    spans = [f"{a.start}-{a.end}" for a in answers]
    width = max(len("span"), *(len(span) for span in spans))
    passages = [f"{a.passage_index:<9}" if isinstance(a, PassageAnswer) else "" for a in answers]
    print(f"{'score':<8}{'passage  ' if passages[0] else ''}{'span':<{width + 2}}answer")
    for answer, passage, span in zip(answers, passages, spans, strict=True):
        text = answer.answer if answer.answer else "(no answer)"
        print(f"{answer.score:<8.4f}{passage}{span:<{width + 2}}{text}")
