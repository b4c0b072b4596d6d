"""The batching policy: the replicas a model runs per device, with their threads, and how CPU batches form."""

from __future__ import annotations

import pytest

from qaserve.runtime.policy import ReplicaPlan, replica_plan, spreads_windows


@pytest.mark.parametrize(
    ("cores", "plan"),
    [
        (1, ReplicaPlan((1,))),  # one core: one lane and nothing to give a lone request on top
        (2, ReplicaPlan((1, 1), solo=2)),
        (8, ReplicaPlan((1,) * 8, solo=8)),
    ],
)
def test_a_cpu_gets_a_single_threaded_lane_per_core_and_a_solo_replica_with_every_core(
    cores: int, plan: ReplicaPlan
) -> None:
    assert replica_plan("cpu", 0, 0, cores=cores) == plan
    assert plan.count == len(plan.lanes) + (1 if plan.solo else 0)


@pytest.mark.parametrize(
    ("replicas", "threads", "plan"),
    [
        (1, 0, ReplicaPlan((4,))),  # one replica with the cores: the pre-policy default
        (2, 0, ReplicaPlan((2, 2))),
        (0, 1, ReplicaPlan((1, 1, 1, 1))),
        (0, 2, ReplicaPlan((2, 2))),
        (3, 1, ReplicaPlan((1, 1, 1))),
    ],
)
def test_explicit_replicas_or_threads_are_served_as_set_without_a_solo_replica(
    replicas: int, threads: int, plan: ReplicaPlan
) -> None:
    assert replica_plan("cpu", replicas, threads, cores=4) == plan


def test_a_gpu_gets_one_replica_unless_told_and_batches_by_token_budget() -> None:
    assert replica_plan("cuda:0", 0, 0, cores=16) == ReplicaPlan((1,))
    assert replica_plan("cuda:1", 2, 0, cores=16) == ReplicaPlan((1, 1))
    assert spreads_windows("cpu") and not spreads_windows("cuda:0") and not spreads_windows("mps")
