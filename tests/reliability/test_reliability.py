"""The reliability suite at CI size (`make reliability` runs it in full): a `qaserve serve` subprocess under load,
a cancellation storm, short deadlines and bad input; an in-process server for faults. Known server bugs are
xfail(strict=True): they fail here until fixed, and the fix makes them fail loudly until the mark is dropped."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from . import cases, http_cases, phases
from .harness import MODEL, InProcessServer, Row, SubprocessServer, table, write_models_config

CONFIG = phases.CI


def check(rows: list[Row]) -> None:
    assert all(row.passed for row in rows), "\n" + table(rows)


def marked(case: cases.Case | cases.Fault) -> pytest.ParameterSet:
    marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.fixture(scope="module")
async def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SubprocessServer]:
    workdir = tmp_path_factory.mktemp("reliability")
    models_config = write_models_config(workdir / "models.toml", [(MODEL, tiny_model_dir, True)])
    qaserve = SubprocessServer(models_config, workdir / "server.log", max_in_flight=CONFIG.max_in_flight)
    await qaserve.start()
    yield qaserve
    await qaserve.stop()


@pytest.fixture(scope="module")
async def bad_input_context(server: SubprocessServer, tiny_model_dir: Path) -> AsyncIterator[cases.Context]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        yield cases.Context(server, channel, tiny_model_dir)


async def test_load_ends_every_request_answered_or_resource_exhausted(server: SubprocessServer) -> None:
    check([await phases.load(server, CONFIG)])


async def test_overload_gets_resource_exhausted_with_retry_info(server: SubprocessServer) -> None:
    check([await phases.overload(server, CONFIG)])


async def test_cancellation_storm_leaves_nothing_queued_and_memory_flat(server: SubprocessServer) -> None:
    check([await phases.cancellation_storm(server, CONFIG)])


async def test_short_deadlines_are_exceeded_before_their_windows_run(server: SubprocessServer) -> None:
    check(await phases.deadlines(server, CONFIG))


@pytest.mark.parametrize("case", [marked(c) for c in (*cases.BAD_INPUT, *http_cases.BAD_INPUT)])
async def test_bad_input_gets_its_documented_status(bad_input_context: cases.Context, case: cases.Case) -> None:
    check([await cases.bad_input(bad_input_context, case)])


def test_the_bad_input_table_has_at_least_30_cases() -> None:
    assert len(cases.BAD_INPUT) >= 30


@pytest.fixture(scope="module")
async def fault_context(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[cases.FaultContext]:
    workdir = tmp_path_factory.mktemp("faults")
    copies = {name: workdir / name for name in (MODEL, "spare", "gone")}
    for copy in copies.values():
        shutil.copytree(tiny_model_dir, copy)
    models_config = write_models_config(
        workdir / "models.toml",
        [(MODEL, copies[MODEL], True), ("spare", copies["spare"], False), ("gone", copies["gone"], False)],
    )
    qaserve = InProcessServer(models_config, **cases.FAULT_SERVER_SETTINGS)
    await qaserve.start()
    async with grpc.aio.insecure_channel(qaserve.target) as channel:
        yield cases.FaultContext(qaserve, channel, tiny_model_dir, model_dirs=copies)
    await qaserve.stop()


@pytest.mark.parametrize("case", [marked(f) for f in cases.FAULTS])
async def test_fault_fails_only_what_it_touches(fault_context: cases.FaultContext, case: cases.Fault) -> None:
    check([await cases.fault(fault_context, case)])
