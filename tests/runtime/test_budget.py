"""The model cache's budget and the reconfigure plan: pure functions of what is held and what is configured."""

from __future__ import annotations

import pytest

from qaserve.runtime.budget import Budget, Holding
from qaserve.runtime.reconfigure import ReconfigurePlan, plan_reconfigure
from qaserve.runtime.spec import ModelsConfig, ModelSpec

MB = 1_000_000


def held(name: str, nbytes: int = 100 * MB, devices: tuple[str, ...] = ("cpu",), evictable: bool = True) -> Holding:
    return Holding(name, devices, nbytes, evictable)


def test_a_model_fits_while_the_count_and_every_device_have_room() -> None:
    budget = Budget(max_models=3, max_bytes_per_device=300 * MB)
    holdings = [held("a"), held("b", devices=("cuda:0",))]

    assert budget.fits(holdings, ["cpu"], 200 * MB)
    assert budget.shortfall(holdings, ["cpu"], 201 * MB) == f"{300 * MB} bytes per device"
    assert budget.fits(holdings, ["cuda:1"], 300 * MB)  # bytes count per device
    assert not budget.fits(holdings, ["cpu", "cuda:0"], 250 * MB)  # every device of the model must have room
    assert budget.shortfall([*holdings, held("c")], ["cuda:1"], 1) == "3 models"


def test_no_byte_limit_counts_models_only() -> None:
    budget = Budget(max_models=2)
    assert budget.fits([held("a", nbytes=10**15)], ["cpu"], 10**15)
    assert not budget.fits([held("a"), held("b")], ["cpu"], 0)


def test_the_victim_is_the_least_recently_used_model_that_may_go() -> None:
    lru = [held("pinned", evictable=False), held("old"), held("new")]
    assert Budget.victim(lru) == "old"
    assert Budget.victim([held("pinned", evictable=False)]) is None


def test_usage_counts_models_and_bytes_per_device() -> None:
    holdings = [held("a", 100, ("cpu",)), held("b", 30, ("cuda:0", "cuda:1")), held("c", 5, ("cuda:0",))]
    assert Budget.usage(holdings) == {"cpu": (1, 100), "cuda:0": (2, 35), "cuda:1": (1, 30)}
    assert Budget.usage([]) == {}


def spec(name: str, **keys: object) -> ModelSpec:
    return ModelSpec(name, f"/models/{name}", **keys)  # type: ignore[arg-type]


def test_the_plan_names_added_removed_and_changed_models_in_configuration_order() -> None:
    current = {"a": spec("a"), "b": spec("b"), "c": spec("c")}
    new = ModelsConfig((spec("d"), spec("c", top_k=3), spec("a"), spec("e")), default="a")

    assert plan_reconfigure(current, new) == ReconfigurePlan(added=("d", "e"), removed=("b",), changed=("c",))
    assert plan_reconfigure(current, ModelsConfig(tuple(current.values()), "a")) == ReconfigurePlan((), (), ())


def test_the_plan_refuses_a_default_that_is_not_configured() -> None:
    with pytest.raises(ValueError, match="default model 'x' is not among the configured models"):
        plan_reconfigure({}, ModelsConfig((spec("a"),), default="x"))
