"""`qaserve serve`: the process: arguments, logging, signals and exit codes around qaserve.server."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence

from qaserve import __version__
from qaserve.config import ConfigError, Settings, models_config, parse_settings
from qaserve.logs import configure_logging
from qaserve.metrics import http_address
from qaserve.runtime.spec import ModelsConfig
from qaserve.server import create_server
from qaserve.tracing import Tracing, tracing_from_environment

log = logging.getLogger("qaserve")


def run_loop(main: Coroutine[object, object, int]) -> int:
    """Runs the server's coroutine on uvloop where it is installed (a dependency but on Windows), asyncio's loop
    otherwise. uvloop wakes its loop from other threads (every forward pass's result comes from a replica thread)
    more cheaply: the default backend's q/s at concurrency 8, as a ratio to the bare int8 model's in the same run,
    was 1.2-1.4x asyncio's in three interleaved rounds on a busy shared host (docs/performance.md)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def serve(settings: Settings, models: ModelsConfig) -> int:
    """Serves `models` (main() read and checked them) until SIGINT/SIGTERM, then stops gracefully; returns the
    exit status (1 when start-up failed)."""
    try:
        tracing = tracing_from_environment(settings.otlp_endpoint)
        server, port = create_server(settings, tracing=tracing, models=models)
    except (OSError, ValueError) as error:  # a bad models file, certificate or token file: nothing has started
        log.error("invalid configuration: %s", error)
        return 2
    stop = asyncio.Event()
    hurry = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        (hurry if stop.is_set() else stop).set()

    reloads: set[asyncio.Task[object]] = set()

    def on_hangup() -> None:  # re-read the models file; QAServer runs reloads one after another
        log.info("SIGHUP: reloading the models file")
        task: asyncio.Task[object] = asyncio.create_task(server.reload_models())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    log.info("settings: %s", settings.describe())
    log.info(
        "gRPC on %s:%d (%s%s), HTTP %s, health-only port %s, metrics %s",
        settings.host,
        port,
        "mutual TLS" if settings.tls_client_ca else "TLS" if settings.tls_cert else "plaintext",
        ", bearer tokens" if settings.auth_tokens or settings.auth_tokens_file else "",
        f"on port {server.http_port}" if server.http_port else "off",
        settings.health_port or "off",
        f"on {_host_port(http_address(settings.metrics_host or settings.host), settings.metrics_port)}/metrics"
        if settings.metrics_port
        else "off",
    )
    log.info("tracing %s", "on (OTLP/OTEL_* settings)" if tracing is not None else "off")
    log.info("event loop: %s", type(loop).__module__.split(".")[0])
    if (settings.auth_tokens or settings.auth_tokens_file) and not settings.tls_cert:
        log.warning("bearer tokens without TLS cross the network in the clear unless a proxy or mesh encrypts it")
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and not starting.cancelled() and (failure := starting.exception()) is not None:
        # A preloaded model that cannot load leaves nothing to serve: exit, so the operator (or kubelet) sees it.
        log.error("start-up failed: %s", failure)
        stopping.cancel()
        await server.stop()
        await _flush(tracing)
        return 1
    await stopping
    loop.remove_signal_handler(signal.SIGHUP)
    for task in reloads:  # a reload half done when the server stops has nothing left to serve
        task.cancel()
    # SIGTERM (Kubernetes, docker stop) drains: endpoints and client-side balancers need a moment to stop sending
    # here. SIGINT (Ctrl-C) and a second signal skip the drain.
    if received[0] == signal.SIGTERM and server.serving and settings.drain_seconds > 0:
        log.info(
            "SIGTERM: health NOT_SERVING, still serving for %.1fs, then in-flight requests get %.1fs",
            settings.drain_seconds,
            settings.grace_seconds,
        )
        await server.drain(settings.drain_seconds, cut_short=hurry)
    log.info("stopping: in-flight requests get up to %.1fs", settings.grace_seconds)
    starting.cancel()
    await server.stop()
    await _flush(tracing)
    log.info("stopped")
    return 0


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _flush(tracing: Tracing | None) -> None:
    """Exports the spans still buffered (off the loop: an unreachable collector takes its export timeout)."""
    if tracing is not None:
        await asyncio.to_thread(tracing.shutdown)


USAGE = (
    "usage: qaserve serve [--FLAG VALUE ...] | qaserve export MODEL_DIR OUT_DIR [--quantize int8] | qaserve --version"
    "   (qaserve serve --help, qaserve export --help)"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qaserve` command: exit 0 after a clean stop, 2 for bad configuration (one line naming
    the flag, variable or models-file key), 1 when the server could not start or run."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "export":
        from qaserve.export import main as export

        return export(args[1:])
    if args[:1] in (["--version"], ["-V"]):
        print(f"qaserve {__version__}")
        return 0
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not args or args[0] != "serve":
        print(USAGE, file=sys.stderr)
        return 2
    settings = parse_settings(args[1:])  # exits 2 with one line on a bad flag or QASERVE_* value
    try:
        models = models_config(settings)  # the models file is checked before anything loads
    except ConfigError as error:
        print(f"qaserve serve: error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        return run_loop(serve(settings, models))
    except RuntimeError as error:
        if not str(error).startswith("Failed to bind"):  # grpc's words for a port it cannot listen on
            raise
        log.error("cannot listen: %s (in use, or not an address of this host)", str(error).split(";")[0])
        return 1


if __name__ == "__main__":
    sys.exit(main())
