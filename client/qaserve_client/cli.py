"""The qaserve-client command line: ask a question, or check the server's health."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from qaserve_client.client import DEFAULT_TARGET, DEFAULT_TIMEOUT, QAClient
from qaserve_client.errors import QAServeError
from qaserve_client.results import AnswerResult

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI with `argv` (default sys.argv[1:]) and returns the process exit status."""
    args = _parser().parse_args(argv)
    try:
        with QAClient(args.target, timeout=args.timeout) as client:
            if args.command == "health":
                return _health(client, args)
            return _ask(client, args)
    except QAServeError as error:
        print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
        for field, description in error.field_violations:
            print(f"  {field}: {description}", file=sys.stderr)
        return _exit_status(error)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qaserve-client", description="Ask a qaserve server a question, or check its health."
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("QASERVE_TARGET", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help=f"server address (default: $QASERVE_TARGET or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"deadline of each call (default: {DEFAULT_TIMEOUT:g})",
    )
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

    health = commands.add_parser("health", help="print the grpc.health.v1 status; exit 0 only when SERVING")
    health.add_argument("--service", default="", help="service to check (default: the whole server)")
    return parser


def _ask(client: QAClient, args: argparse.Namespace) -> int:
    if args.context is not None:
        context: str = args.context
    else:
        try:
            context = _read_context(args.context_file)
        except (OSError, UnicodeDecodeError) as error:
            print(f"error: cannot read context from {args.context_file}: {error}", file=sys.stderr)
            return EXIT_FAILED
    result = client.answer(
        args.question,
        context,
        model=args.model,
        top_k=args.top_k,
        max_answer_len=args.max_answer_len,
        max_seq_len=args.max_seq_len,
        doc_stride=args.doc_stride,
        max_question_len=args.max_question_len,
        handle_impossible_answer=args.handle_impossible_answer,
        align_to_words=args.align_to_words,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_table(result)
    return EXIT_OK


def _health(client: QAClient, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    print(status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILED


def _read_context(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    return Path(path).read_text(encoding="utf-8")


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
