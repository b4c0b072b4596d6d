"""The batcher with a fake replica: batches, waiting, results as windows finish, failures, cancels, deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pytest
from prometheus_client import CollectorRegistry

from qaserve.errors import DeadlineTooShort, InferenceFailed, ShuttingDown
from qaserve.metrics import Metrics
from qaserve.runtime.batcher import Batcher, BatchLimits, BatchTiming, WindowResults

from qaserve_testing import PATIENCE, FakeReplica, eventually

MODEL = "fake-model"
HUNG = "still running"


@dataclass(frozen=True)
class Win:
    """One window as the fake replica sees it: which request, which window of it, how many tokens."""

    request: str
    index: int
    length: int


def output_of(window: Win) -> str:
    return f"{window.request}/{window.index}/{window.length}"


@dataclass
class Rig:
    batcher: Batcher[Win, str]
    replicas: list[FakeReplica]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    @property
    def replica(self) -> FakeReplica:
        return self.replicas[0]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    async def close(self) -> None:
        for replica in self.replicas:
            replica.release()
        try:
            await self.batcher.stop()
        finally:
            for replica in self.replicas:
                await asyncio.to_thread(replica.executor.shutdown)


class MakeRig(Protocol):
    def __call__(
        self,
        *,
        replicas: int = 1,
        max_windows: int = 32,
        max_tokens: int = 16384,
        max_wait: float = 0.002,
        spread: bool = False,
        solo: bool = False,
    ) -> Rig: ...


def build_rig(
    *,
    replicas: int = 1,
    max_windows: int = 32,
    max_tokens: int = 16384,
    max_wait: float = 0.002,
    spread: bool = False,
    solo: bool = False,
) -> Rig:
    """A started batcher over fresh fake replicas (`solo`: plus one more, the last, as its solo replica), with
    metrics on a fresh registry; call from the loop."""
    fakes = [FakeReplica(f"fake-{i}") for i in range(replicas)] + ([FakeReplica("fake-solo")] if solo else [])
    for fake in fakes:
        fake.outputs = lambda windows: [output_of(w) for w in windows]
    registry = CollectorRegistry()
    limits = BatchLimits(max_windows=max_windows, max_tokens=max_tokens, max_wait=max_wait, spread=spread)
    batcher: Batcher[Win, str] = Batcher(MODEL, fakes, limits, Metrics(registry), solo=fakes[-1] if solo else None)
    batcher.start()
    return Rig(batcher, fakes, registry)


@pytest.fixture
async def make_rig() -> AsyncIterator[MakeRig]:
    rigs: list[Rig] = []

    def make(**kwargs: Any) -> Rig:
        rig = build_rig(**kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.close()


Step = list[tuple[int, str]]


async def collect(results: WindowResults[Win, str], steps: list[Step] | None = None) -> tuple[list[str], BatchTiming]:
    """Iterates a request's results to the end: its outputs in window order, and its timing."""
    outputs: dict[int, str] = {}
    async with results:
        async for finished in results:
            assert finished, "a step hands out at least one window"
            assert not set(dict(finished)) & set(outputs), "a window handed out twice"
            outputs.update(finished)
            if steps is not None:
                steps.append(finished)
    return [outputs[i] for i in sorted(outputs)], results.timing


async def run(
    batcher: Batcher[Win, str], request: str, lengths: Sequence[int], deadline: float | None = None
) -> tuple[list[str], BatchTiming]:
    windows = [Win(request, i, n) for i, n in enumerate(lengths)]
    return await collect(batcher.run(windows, lengths, deadline))


def submit(
    batcher: Batcher[Win, str], request: str, lengths: Sequence[int], **kwargs: Any
) -> asyncio.Task[tuple[list[str], BatchTiming]]:
    return asyncio.create_task(run(batcher, request, lengths, **kwargs), name=request)


def expected(request: str, lengths: Sequence[int]) -> list[str]:
    return [output_of(Win(request, i, n)) for i, n in enumerate(lengths)]


async def occupy(rig: Rig) -> asyncio.Task[tuple[list[str], BatchTiming]]:
    """Holds the (single) replica inside a forward pass so that what is submitted next queues up."""
    rig.replica.hold()
    before = len(rig.replica.batches)
    task = submit(rig.batcher, "blocker", [1])
    await eventually(lambda: len(rig.replica.batches) > before, "the blocker to reach the replica")
    return task


async def queue_then_release(
    rig: Rig, requests: dict[str, list[int]], **kwargs: Any
) -> dict[str, asyncio.Task[tuple[list[str], BatchTiming]]]:
    """Queues every request behind a held replica, then lets it run; returns the requests' tasks."""
    blocker = await occupy(rig)
    tasks = {name: submit(rig.batcher, name, lengths, **kwargs) for name, lengths in requests.items()}
    total = sum(len(lengths) for lengths in requests.values())
    await eventually(lambda: rig.batcher.queued_windows == total, "every window to be queued")
    rig.replica.release()
    await blocker
    return tasks


async def finish(tasks: dict[str, asyncio.Task[tuple[list[str], BatchTiming]]]) -> dict[str, Any]:
    """Each task's outputs, or the exception it raised."""
    await asyncio.wait_for(asyncio.wait(tasks.values()), PATIENCE)
    return {name: task.exception() or task.result()[0] for name, task in tasks.items()}


async def settle(call: Awaitable[tuple[list[str], BatchTiming]], within: float) -> object:
    """What `call` came to: its outputs, the exception it raised, or HUNG when it had not finished in time.

    For tests of hangs: they fail on a plain assertion rather than on a deep chain of asyncio timeouts.
    """
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=within)
    if not done:
        task.cancel()
        return HUNG
    return task.exception() or task.result()[0]


def padded(batch: list[Win]) -> int:
    return max(w.length for w in batch) * len(batch)


# -- batch formation ------------------------------------------------------------------------------------------


async def test_batches_hold_at_most_max_windows(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=4)
    requests = {f"r{i}": [16] for i in range(10)}

    results = await finish(await queue_then_release(rig, requests))

    batches = rig.replica.batches[1:]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [w.request for b in batches for w in b] == list(requests)  # equal lengths: first come, first served
    assert results == {name: expected(name, lengths) for name, lengths in requests.items()}


async def test_batches_stay_within_max_tokens(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=32, max_tokens=100)
    rng = random.Random(7)
    requests = {f"r{i}": [rng.randint(5, 60) for _ in range(rng.randint(1, 3))] for i in range(20)}

    results = await finish(await queue_then_release(rig, requests))

    batches = rig.replica.batches[1:]
    assert all(padded(b) <= 100 for b in batches), [[w.length for w in b] for b in batches]
    assert any(len(b) > 1 for b in batches)
    assert results == {name: expected(name, lengths) for name, lengths in requests.items()}


async def test_window_longer_than_max_tokens_runs_alone(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=8, max_tokens=100)

    results = await finish(await queue_then_release(rig, {"small": [10, 10], "huge": [500], "after": [10]}))

    batches = [[w.length for w in b] for b in rig.replica.batches[1:]]
    assert [500] in batches
    assert sorted(batches) == [[10, 10, 10], [500]]
    assert results["huge"] == expected("huge", [500])


async def test_windows_of_similar_length_are_batched_together(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=4)
    requests = {f"r{i}": [10 if i % 2 == 0 else 100] for i in range(16)}

    results = await finish(await queue_then_release(rig, requests))

    batches = rig.replica.batches[1:]
    assert [sorted({w.length for w in b}) for b in batches] == [[10], [100], [10], [100]]
    arrival = [lengths[0] for lengths in requests.values()]
    fifo = sum(max(arrival[i : i + 4]) * 4 for i in range(0, 16, 4))
    assert sum(map(padded, batches)) < fifo  # 880 padded tokens instead of 1600
    assert results == {name: expected(name, lengths) for name, lengths in requests.items()}


async def test_oldest_queued_window_is_always_in_the_next_batch(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=4, max_tokens=400)
    rng = random.Random(11)
    # One window per request, so the request's number is the window's age; length 0..199 mixes near and far.
    lengths = [rng.randint(1, 199) for _ in range(40)]
    requests = {f"r{i:02d}": [n] for i, n in enumerate(lengths)}

    await finish(await queue_then_release(rig, requests))

    waiting = list(requests)
    for batch in rig.replica.batches[1:]:
        names = [w.request for w in batch]
        assert waiting[0] in names, f"oldest {waiting[0]} left out of {names}"
        assert len(batch) <= 4
        assert len(batch) == 1 or padded(batch) <= 400
        waiting = [name for name in waiting if name not in names]
    assert waiting == []


async def test_oldest_window_leads_even_when_its_length_is_an_outlier(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=4, max_tokens=1000)

    await finish(await queue_then_release(rig, {"long": [500], **{f"short{i}": [10] for i in range(6)}}))

    first = rig.replica.batches[1]
    assert [w.request for w in first] == ["long", "short0"]  # 500 x 2 fits; a third window would not


async def test_replicas_run_batches_at_the_same_time(make_rig: MakeRig) -> None:
    rig = make_rig(replicas=2)
    for replica in rig.replicas:
        replica.hold()

    first = submit(rig.batcher, "first", [10])
    await eventually(lambda: sum(len(r.batches) for r in rig.replicas) == 1, "one replica to start")
    second = submit(rig.batcher, "second", [10])
    await eventually(lambda: all(r.batches for r in rig.replicas), "the other replica to start too")
    for replica in rig.replicas:
        replica.release()

    assert (await first)[0] == expected("first", [10])
    assert (await second)[0] == expected("second", [10])


# -- the CPU policy: lanes, their share of the queue, and the solo replica ------------------------------------


async def test_spread_batches_take_only_equal_lengths_and_at_most_a_lanes_share(make_rig: MakeRig) -> None:
    rig = make_rig(replicas=2, spread=True)
    for replica in rig.replicas:
        replica.hold()
    blockers = [submit(rig.batcher, f"blocker-{i}", [1]) for i in range(2)]
    await eventually(lambda: all(r.batches for r in rig.replicas), "both lanes to be busy")
    long = submit(rig.batcher, "long", [384, 384, 384, 384, 200])
    short = submit(rig.batcher, "short", [50])
    await eventually(lambda: rig.batcher.queued_windows == 6, "every window to be queued")
    first, second = rig.replicas
    first.release()  # the second lane stays busy: what the first takes next is its share alone
    await eventually(lambda: len(first.batches) > 1, "the free lane to take a batch")
    assert first.batches[1] == [Win("long", i, 384) for i in range(3)]  # 6 windows over 2 lanes: 3, not all 4 384s
    second.release()

    assert (await long)[0] == expected("long", [384, 384, 384, 384, 200])
    assert (await short)[0] == expected("short", [50])
    await asyncio.gather(*blockers)
    batches = [batch for r in rig.replicas for batch in r.batches]
    assert all(len({w.length for w in batch}) == 1 for batch in batches), "a CPU batch takes no padding"
    assert max(len(batch) for batch in batches) == 3


async def test_lone_window_on_idle_lanes_runs_on_the_solo_replica(make_rig: MakeRig) -> None:
    rig = make_rig(replicas=2, spread=True, solo=True)
    *lanes, solo = rig.replicas

    assert (await asyncio.wait_for(run(rig.batcher, "lone", [30]), PATIENCE))[0] == expected("lone", [30])

    assert solo.seen() == [Win("lone", 0, 30)]
    assert not any(lane.batches for lane in lanes)


async def test_a_lone_requests_windows_run_on_the_solo_replica_one_at_a_time(make_rig: MakeRig) -> None:
    rig = make_rig(replicas=2, spread=True, solo=True)
    *lanes, solo = rig.replicas

    result = await asyncio.wait_for(run(rig.batcher, "long", [384, 384, 384, 200]), PATIENCE)

    assert result[0] == expected("long", [384, 384, 384, 200])
    assert solo.batches == [[Win("long", i, n)] for i, n in enumerate([384, 384, 384, 200])]
    assert not any(lane.batches for lane in lanes)


async def test_a_request_arriving_beside_a_lone_one_sends_both_to_the_lanes(make_rig: MakeRig) -> None:
    rig = make_rig(replicas=2, spread=True, solo=True)
    *lanes, solo = rig.replicas
    solo.hold()
    long = submit(rig.batcher, "long", [384, 384, 384])
    await eventually(lambda: bool(solo.batches), "the lone request's first window to reach the solo replica")
    short = submit(rig.batcher, "short", [50])
    await eventually(lambda: rig.batcher.queued_windows == 3, "the new request to be queued")
    solo.release()

    assert (await long)[0] == expected("long", [384, 384, 384])
    assert (await short)[0] == expected("short", [50])
    assert solo.seen() == [Win("long", 0, 384)]
    on_lanes = [w for lane in lanes for w in lane.seen()]
    assert sorted(on_lanes, key=output_of) == [Win("long", 1, 384), Win("long", 2, 384), Win("short", 0, 50)]


async def test_lanes_never_run_beside_the_solo_replica_and_take_what_queues_behind_it(make_rig: MakeRig) -> None:
    rig = make_rig(replicas=2, spread=True, solo=True)
    *lanes, solo = rig.replicas
    solo.hold()
    lone = submit(rig.batcher, "lone", [30])
    await eventually(lambda: bool(solo.batches), "the lone window to reach the solo replica")
    pair = [submit(rig.batcher, name, [20]) for name in ("first", "second")]
    await eventually(lambda: rig.batcher.queued_windows == 2, "both requests to be queued")
    await asyncio.sleep(0.05)
    assert not any(lane.batches for lane in lanes), "a lane started while the solo replica held every core"
    solo.release()

    assert (await lone)[0] == expected("lone", [30])
    assert [(await task)[0] for task in pair] == [expected("first", [20]), expected("second", [20])]
    assert solo.seen() == [Win("lone", 0, 30)]
    assert sorted(len(lane.seen()) for lane in lanes) == [1, 1], "the two requests ran side by side on the lanes"


async def test_a_second_window_goes_to_a_free_lane_while_another_lane_runs(make_rig: MakeRig) -> None:
    rig = make_rig(replicas=2, spread=True, solo=True)
    *lanes, solo = rig.replicas
    for lane in lanes:
        lane.hold()
    pair = [submit(rig.batcher, name, [20]) for name in ("first", "second")]  # queued together: not a lone request
    await eventually(lambda: all(lane.batches for lane in lanes), "both lanes to take a window")
    lanes[0].release()
    third = submit(rig.batcher, "third", [10])  # a lone request, but a lane still runs: not the solo's turn

    await eventually(lambda: len(lanes[0].batches) == 2, "the free lane to take it")
    lanes[1].release()
    assert (await third)[0] == expected("third", [10])
    assert [(await task)[0] for task in pair] == [expected("first", [20]), expected("second", [20])]
    assert not solo.batches


async def test_forward_time_counts_passes_running_side_by_side_once(make_rig: MakeRig) -> None:
    rig = make_rig(replicas=2, spread=True)
    for replica in rig.replicas:
        replica.hold()
    started = time.perf_counter()
    pair = submit(rig.batcher, "pair", [20, 20])
    await eventually(lambda: all(r.batches for r in rig.replicas), "both lanes to run a window")
    await asyncio.sleep(0.05)
    for replica in rig.replicas:
        replica.release()

    _, timing = await pair
    elapsed = time.perf_counter() - started
    passes = [rig.sample("qaserve_forward_duration_seconds_sum", model=MODEL, device=r.device) for r in rig.replicas]
    assert timing.batch_sizes == (1, 1)
    assert timing.forward < sum(p or 0.0 for p in passes)  # the passes overlapped: their shared time counts once
    assert timing.queue + timing.forward <= elapsed


def test_the_solo_replica_is_one_of_the_replicas() -> None:
    with pytest.raises(ValueError, match="solo replica"):
        Batcher(MODEL, [FakeReplica()], BatchLimits(), Metrics(CollectorRegistry()), solo=FakeReplica("other"))


# -- waiting for requests being tokenized ---------------------------------------------------------------------


async def test_lone_request_on_an_idle_batcher_does_not_wait(make_rig: MakeRig) -> None:
    rig = make_rig(max_wait=1.0)
    loop = asyncio.get_running_loop()

    started = loop.time()
    outputs, timing = await asyncio.wait_for(run(rig.batcher, "lone", [8]), PATIENCE)

    assert loop.time() - started < 0.5  # nothing else is on its way, so max_wait does not apply
    assert outputs == expected("lone", [8])
    assert timing.forward >= 0 and timing.queue >= 0


async def test_free_replica_waits_for_an_incoming_request_to_share_the_batch(make_rig: MakeRig) -> None:
    rig = make_rig(max_wait=1.0)
    loop = asyncio.get_running_loop()

    async def late_request() -> list[str]:
        with rig.batcher.incoming():
            await asyncio.sleep(0.05)  # tokenizing
        outputs, _ = await run(rig.batcher, "late", [20])
        return outputs

    late = asyncio.create_task(late_request())
    await asyncio.sleep(0)  # let it announce itself
    started = loop.time()
    early_outputs, _ = await asyncio.wait_for(run(rig.batcher, "early", [10]), PATIENCE)
    waited = loop.time() - started

    assert await late == expected("late", [20])
    assert early_outputs == expected("early", [10])
    assert [[w.request for w in b] for b in rig.replica.batches] == [["early", "late"]]
    assert waited < 0.5  # it stopped waiting as soon as the incoming request submitted, well before max_wait


async def test_free_replica_stops_waiting_after_max_wait(make_rig: MakeRig) -> None:
    rig = make_rig(max_wait=0.2)
    loop = asyncio.get_running_loop()

    with rig.batcher.incoming():  # announced, but never submits
        started = loop.time()
        outputs, _ = await asyncio.wait_for(run(rig.batcher, "waits", [10]), PATIENCE)
        waited = loop.time() - started

    assert outputs == expected("waits", [10])
    assert waited >= 0.2 * 0.9  # it did give the incoming request its chance


async def test_full_batch_does_not_wait_for_incoming_requests(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=2, max_wait=1.0)
    loop = asyncio.get_running_loop()

    with rig.batcher.incoming():
        started = loop.time()
        outputs, _ = await asyncio.wait_for(run(rig.batcher, "full", [10, 10]), 2)
        waited = loop.time() - started

    assert outputs == expected("full", [10, 10])
    assert waited < 0.5


# -- results --------------------------------------------------------------------------------------------------


async def test_results_reach_their_requests_one_step_per_forward_pass(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=3)
    requests = {"a": [30, 10, 20, 10, 30], "b": [10], "c": [20, 20, 20, 20], "d": [30, 10]}
    steps: dict[str, list[Step]] = {name: [] for name in requests}

    def start(name: str, lengths: list[int]) -> asyncio.Task[tuple[list[str], BatchTiming]]:
        windows = [Win(name, i, n) for i, n in enumerate(lengths)]
        return asyncio.create_task(collect(rig.batcher.run(windows, lengths), steps[name]))

    blocker = await occupy(rig)
    tasks = {name: start(name, lengths) for name, lengths in requests.items()}
    await eventually(lambda: rig.batcher.queued_windows == 12, "every window to be queued")
    rig.replica.release()
    await blocker
    results = await finish(tasks)

    assert results == {name: expected(name, lengths) for name, lengths in requests.items()}
    assert sum(any(w.request == "a" for w in b) for b in rig.replica.batches) > 1  # "a" was split across batches
    for name in requests:
        by_batch = [[(w.index, output_of(w)) for w in b if w.request == name] for b in rig.replica.batches]
        assert steps[name] == [step for step in by_batch if step], name


async def test_results_are_handed_out_while_later_windows_still_run(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=1)
    rig.replica.held_for = lambda windows: windows[0].index > 0
    rig.replica.hold()
    windows = [Win("long", i, 10) for i in range(3)]

    async with rig.batcher.run(windows, [10, 10, 10]) as results:
        first = await asyncio.wait_for(anext(results), PATIENCE)
        assert first == [(0, output_of(windows[0]))]
        await eventually(lambda: len(rig.replica.batches) == 2, "the second window to reach the replica")
        rig.replica.release()
        rest = [step async for step in results]

    assert rest == [[(1, output_of(windows[1]))], [(2, output_of(windows[2]))]]
    assert results.timing.forward > 0


async def test_closing_the_results_early_withdraws_the_queued_windows(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=1)
    rig.replica.held_for = lambda windows: windows[0].index > 0
    rig.replica.hold()
    windows = [Win("early", i, 10) for i in range(4)]

    async with rig.batcher.run(windows, [10] * 4) as results:
        await asyncio.wait_for(anext(results), PATIENCE)
        await eventually(lambda: len(rig.replica.batches) == 2, "the second window to reach the replica")
        assert rig.batcher.queued_windows == 2
    assert rig.batcher.queued_windows == 0
    assert rig.sample("qaserve_queue_depth_windows", model=MODEL) == 0
    rig.replica.release()

    outputs, _ = await asyncio.wait_for(run(rig.batcher, "next", [10]), PATIENCE)
    assert outputs == expected("next", [10])
    assert [(w.request, w.index) for w in rig.replica.seen()] == [("early", 0), ("early", 1), ("next", 0)]
    assert [step async for step in results] == []  # a closed request hands out nothing more


async def test_results_are_queued_only_once_iterated(make_rig: MakeRig) -> None:
    rig = make_rig()

    results = rig.batcher.run([Win("lazy", 0, 10)], [10])
    assert rig.batcher.queued_windows == 0  # never iterated: it can never leave windows behind

    assert await asyncio.wait_for(collect(results), PATIENCE) == (expected("lazy", [10]), results.timing)


# -- failures -------------------------------------------------------------------------------------------------


async def test_failing_batch_fails_only_its_requests(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=2)
    rig.replica.fail_if = lambda windows: any(w.request == "poison" for w in windows)
    requests = {"poison": [10], "neighbour": [10], "long1": [100], "long2": [100]}

    results = await finish(await queue_then_release(rig, requests))

    assert [[w.request for w in b] for b in rig.replica.batches[1:]] == [["poison", "neighbour"], ["long1", "long2"]]
    assert isinstance(results["poison"], InferenceFailed)
    assert isinstance(results["neighbour"], InferenceFailed)  # shared the failed forward pass
    assert "fake forward pass failed" not in str(results["poison"])  # the cause is logged, never sent
    assert results["long1"] == expected("long1", [100])
    assert results["long2"] == expected("long2", [100])

    outputs, _ = await asyncio.wait_for(run(rig.batcher, "later", [10]), PATIENCE)
    assert outputs == expected("later", [10])
    assert rig.batcher.queued_windows == 0


async def test_failure_of_part_of_a_request_fails_it_and_drops_its_other_windows(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=2)
    rig.replica.fail_if = lambda windows: any(w.request == "split" and w.index == 2 for w in windows)

    results = await finish(await queue_then_release(rig, {"split": [10] * 5, "other": [10]}))

    assert isinstance(results["split"], InferenceFailed)
    assert results["other"] == expected("other", [10])
    ran = [(w.request, w.index) for w in rig.replica.seen()[1:]]
    assert ("split", 4) not in ran  # queued behind the failed batch; withdrawn with its request
    assert ran == [("split", 0), ("split", 1), ("split", 2), ("split", 3), ("other", 0)]


async def test_forward_returning_the_wrong_number_of_outputs_fails_the_batch_and_keeps_serving() -> None:
    rig = build_rig()
    rig.replica.outputs = lambda windows: [output_of(w) for w in windows][:-1]
    try:
        short = await settle(run(rig.batcher, "short", [5, 5]), 1.0)
        assert isinstance(short, InferenceFailed), short
        rig.replica.outputs = lambda windows: [output_of(w) for w in windows]
        assert await settle(run(rig.batcher, "next", [5]), 1.0) == expected("next", [5])
    finally:
        with contextlib.suppress(Exception):  # stop() re-raises the dead consumer's ValueError
            await rig.close()


# -- cancellation ---------------------------------------------------------------------------------------------


async def test_cancelled_requests_never_reach_the_replica(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=4)
    blocker = await occupy(rig)
    tasks = {f"r{i}": submit(rig.batcher, f"r{i}", [10, 10]) for i in range(6)}
    await eventually(lambda: rig.batcher.queued_windows == 12, "every window to be queued")

    cancelled = {"r1", "r3", "r4"}
    for name in cancelled:
        tasks[name].cancel()
    await asyncio.wait([tasks[name] for name in cancelled])
    assert rig.batcher.queued_windows == 6
    rig.replica.release()
    await blocker

    live = {name: task for name, task in tasks.items() if name not in cancelled}
    assert await finish(live) == {name: expected(name, [10, 10]) for name in live}
    assert all(tasks[name].cancelled() for name in cancelled)
    assert not {w.request for w in rig.replica.seen()} & cancelled
    assert rig.batcher.queued_windows == 0


async def test_request_cancelled_mid_forward_is_dropped_and_the_batcher_keeps_serving(make_rig: MakeRig) -> None:
    rig = make_rig()
    running = await occupy(rig)

    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    rig.replica.release()

    outputs, _ = await asyncio.wait_for(run(rig.batcher, "next", [10]), PATIENCE)
    assert outputs == expected("next", [10])
    assert rig.batcher.queued_windows == 0


async def test_burst_of_cancellations_leaves_the_queue_empty(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=8)
    blocker = await occupy(rig)
    tasks = [submit(rig.batcher, f"r{i}", [10 + i % 7]) for i in range(200)]
    await eventually(lambda: rig.batcher.queued_windows == 200, "every window to be queued")
    assert rig.sample("qaserve_queue_depth_windows", model=MODEL) == 200

    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)

    assert all(task.cancelled() for task in tasks)
    assert rig.batcher.queued_windows == 0
    assert rig.sample("qaserve_queue_depth_windows", model=MODEL) == 0
    rig.replica.release()
    await blocker
    outputs, _ = await asyncio.wait_for(run(rig.batcher, "after", [10]), PATIENCE)
    assert outputs == expected("after", [10])
    assert [w.request for w in rig.replica.seen()] == ["blocker", "after"]


# -- deadlines ------------------------------------------------------------------------------------------------


async def test_request_past_its_deadline_is_rejected_without_running(make_rig: MakeRig) -> None:
    rig = make_rig()
    loop = asyncio.get_running_loop()

    with pytest.raises(DeadlineTooShort):
        await asyncio.wait_for(run(rig.batcher, "late", [10], deadline=loop.time() - 1), PATIENCE)

    assert rig.replica.batches == []
    assert rig.batcher.queued_windows == 0
    assert rig.sample("qaserve_rejections_total", reason="deadline") == 1


async def test_request_whose_deadline_passes_while_queued_is_rejected_without_running(make_rig: MakeRig) -> None:
    rig = make_rig()
    loop = asyncio.get_running_loop()
    blocker = await occupy(rig)
    doomed = submit(rig.batcher, "doomed", [10, 10], deadline=loop.time() + 0.05)
    patient = submit(rig.batcher, "patient", [10], deadline=loop.time() + 60)
    await asyncio.sleep(0.1)
    rig.replica.release()
    await blocker

    results = await finish({"doomed": doomed, "patient": patient})

    assert isinstance(results["doomed"], DeadlineTooShort)
    assert results["patient"] == expected("patient", [10])
    assert "doomed" not in {w.request for w in rig.replica.seen()}
    assert rig.sample("qaserve_rejections_total", reason="deadline") == 1  # once per request, not per window


async def test_deadline_shorter_than_a_forward_pass_is_rejected_without_running(make_rig: MakeRig) -> None:
    rig = make_rig()
    loop = asyncio.get_running_loop()
    rig.replica.delay = 0.2
    await asyncio.wait_for(run(rig.batcher, "first", [10]), PATIENCE)  # teaches it forwards are slow

    with pytest.raises(DeadlineTooShort):
        await asyncio.wait_for(run(rig.batcher, "hasty", [10], deadline=loop.time() + 0.05), PATIENCE)
    outputs, _ = await asyncio.wait_for(run(rig.batcher, "relaxed", [10], deadline=loop.time() + 60), PATIENCE)

    assert outputs == expected("relaxed", [10])
    assert [w.request for w in rig.replica.seen()] == ["first", "relaxed"]
    assert rig.sample("qaserve_rejections_total", reason="deadline") == 1


# -- shutdown -------------------------------------------------------------------------------------------------


async def test_stop_fails_queued_work_with_shutting_down(make_rig: MakeRig) -> None:
    # A long max_wait with a request announced keeps the queued work waiting without a forward pass in flight.
    rig = make_rig(max_wait=60)
    with rig.batcher.incoming():
        tasks = {"a": submit(rig.batcher, "a", [10, 10]), "b": submit(rig.batcher, "b", [20])}
        await eventually(lambda: rig.batcher.queued_windows == 3, "every window to be queued")

        await asyncio.wait_for(rig.batcher.stop(), PATIENCE)
        results = await finish(tasks)

    assert all(isinstance(error, ShuttingDown) for error in results.values()), results
    assert rig.replica.batches == []
    assert rig.batcher.queued_windows == 0
    assert rig.sample("qaserve_queue_depth_windows", model=MODEL) == 0
    with pytest.raises(ShuttingDown):
        await run(rig.batcher, "too-late", [10])


async def test_stop_resolves_the_request_whose_batch_is_in_flight(make_rig: MakeRig) -> None:
    rig = make_rig()
    running = await occupy(rig)

    stopping = asyncio.create_task(rig.batcher.stop())
    await asyncio.sleep(0.01)
    rig.replica.release()
    await asyncio.wait_for(stopping, PATIENCE)
    done, _ = await asyncio.wait({running}, timeout=1.0)

    try:
        assert done, "the request whose batch was running at stop() never finished"
        error = running.exception()
        assert error is None or isinstance(error, ShuttingDown)
    finally:
        running.cancel()


async def test_request_without_windows_returns_at_once(make_rig: MakeRig) -> None:
    rig = make_rig()

    assert await settle(collect(rig.batcher.run([], [])), 1.0) == []


# -- metrics --------------------------------------------------------------------------------------------------


async def test_metrics_describe_each_forward_pass(make_rig: MakeRig) -> None:
    rig = make_rig(max_windows=4)

    await finish(await queue_then_release(rig, {"a": [10, 20], "b": [10], "c": [20]}))

    # Batches: the blocker [1], then [10, 10, 20, 20] -> 80 padded tokens of which 20 are padding.
    assert [[w.length for w in b] for b in rig.replica.batches] == [[1], [10, 10, 20, 20]]
    assert rig.sample("qaserve_batch_windows_count", model=MODEL) == 2
    assert rig.sample("qaserve_batch_windows_sum", model=MODEL) == 5
    assert rig.sample("qaserve_batch_tokens_sum", model=MODEL) == 1 + 80
    assert rig.sample("qaserve_padding_ratio_count", model=MODEL) == 2
    assert rig.sample("qaserve_padding_ratio_sum", model=MODEL) == pytest.approx(0.25)
    assert rig.sample("qaserve_forward_duration_seconds_count", model=MODEL, device=rig.replica.device) == 2
    assert rig.sample("qaserve_queue_depth_windows", model=MODEL) == 0


async def test_failed_forward_passes_are_not_observed_as_batches(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.replica.fail_if = lambda windows: True

    with pytest.raises(InferenceFailed):
        await asyncio.wait_for(run(rig.batcher, "x", [10]), PATIENCE)

    assert rig.sample("qaserve_batch_windows_count", model=MODEL) in (None, 0)
    assert rig.sample("qaserve_queue_depth_windows", model=MODEL) == 0
