"""`make reliability`: the whole suite against a `qaserve serve` subprocess (faults: an in-process server) on a tiny
random-weight model, loopback only; prints one table and exits non-zero when a row fails.

    PYTHONPATH=tests python -m reliability [--ci] [--requests N] [--concurrency N] [--cancellations N]
                                           [--markdown FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc

from . import cases, http_cases, phases
from .harness import MODEL, InProcessServer, Row, SubprocessServer, table, write_models_config
from qaserve_testing import build_tiny_model


def prepare_models(workdir: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny model, and copies of it for the fault cases to break: {tiny, spare, gone}."""
    model_dir = build_tiny_model(workdir / "tiny", "bert")
    copies = {name: workdir / "faults" / name for name in (MODEL, "spare", "gone")}
    for copy in copies.values():
        shutil.copytree(model_dir, copy)
    return model_dir, copies


async def black_box(workdir: Path, model_dir: Path, config: phases.Config, out: list[Row]) -> None:
    """Load, cancellations, deadlines and bad input against a server seen only from outside."""
    models_config = write_models_config(workdir / "models.toml", [(MODEL, model_dir, True)])
    server = SubprocessServer(models_config, workdir / "server.log", max_in_flight=config.max_in_flight)
    await server.start()
    try:
        for phase in (phases.load, phases.overload, phases.cancellation_storm):
            out.append(await phase(server, config))
            print(table(out[-1:]), file=sys.stderr)
        out.extend(await phases.deadlines(server, config))
        async with grpc.aio.insecure_channel(server.target) as channel:
            ctx = cases.Context(server, channel, model_dir)
            for case in (*cases.BAD_INPUT, *http_cases.BAD_INPUT):
                out.append(await cases.bad_input(ctx, case))
    finally:
        await server.stop()


async def faults(workdir: Path, model_dir: Path, copies: dict[str, Path], out: list[Row]) -> None:
    """Faults need a hand inside the server (a forward pass that raises): an in-process server."""
    models_config = write_models_config(
        workdir / "faults.toml",
        [(MODEL, copies[MODEL], True), ("spare", copies["spare"], False), ("gone", copies["gone"], False)],
    )
    server = InProcessServer(models_config, **cases.FAULT_SERVER_SETTINGS)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            ctx = cases.FaultContext(server, channel, model_dir, model_dirs=copies)
            for case in cases.FAULTS:
                out.append(await cases.fault(ctx, case))
    finally:
        await server.stop()


async def run(config: phases.Config, workdir: Path) -> list[Row]:
    model_dir, copies = prepare_models(workdir)
    rows: list[Row] = []
    await black_box(workdir, model_dir, config, rows)
    await faults(workdir, model_dir, copies, rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability", description=__doc__.splitlines()[0])
    parser.add_argument("--ci", action="store_true", help="the small sizes CI runs")
    parser.add_argument("--requests", type=int, help="load: requests in all")
    parser.add_argument("--concurrency", type=int, help="load and cancellations: calls in flight")
    parser.add_argument("--max-in-flight", type=int, help="the server's --max-in-flight")
    parser.add_argument("--cancellations", type=int, help="cancellation storm: calls")
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown to this file")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (server log, models)")
    args = parser.parse_args(argv)
    config = phases.CI if args.ci else phases.FULL
    overrides = {
        k: v
        for k in ("requests", "concurrency", "max_in_flight", "cancellations")
        if (v := getattr(args, k)) is not None
    }
    config = dataclasses.replace(config, **overrides)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # The fault cases make the in-process server log tracebacks on purpose.
    logging.getLogger("qaserve").setLevel(logging.CRITICAL)

    started = time.perf_counter()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        rows = asyncio.run(run(config, args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="qaserve-reliability-") as tmp:
            rows = asyncio.run(run(config, Path(tmp)))
    print(table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows)} cases, {sum(r.passed for r in rows)} passed, "
          f"{sum(bool(r.bug) and not r.passed for r in rows)} known bugs, {len(failed)} failed, "
          f"in {time.perf_counter() - started:.0f}s")  # fmt: skip
    if args.markdown:
        args.markdown.write_text(table(rows, markdown=True) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
