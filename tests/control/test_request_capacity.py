"""RequestCapacityFunction and spotrun.capacity: pools, the instant fleet, backoff."""

from __future__ import annotations

from typing import Any

import pytest

from spotrun import capacity
from spotrun.errors import CapacityUnavailable, JobInvalid
from spotrun.jobs import JobStore
from spotrun.status import JobStatus
from tests.control.conftest import load_handler
from tests.control.function_helpers import (
    JOB_ID,
    create_job,
    refuse_every_fleet,
    sample,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:No application metrics"),
    pytest.mark.usefixtures("shared_service_models"),
]


def test_request_capacity_grants_a_tagged_spot_instance(
    execution_env: dict, store: JobStore, ec2: Any, subnets: list[str], lambda_context: Any
) -> None:
    # GIVEN a submitted job
    create_job(store)
    # WHEN the first try runs
    result = load_handler("request_capacity").lambda_handler(
        sample("request_capacity", "first_try"), lambda_context
    )
    # THEN one instance of the first pool, recorded as attempt 1
    assert result["granted"] is True and result["attempt"] == 1
    assert result["market"] == "spot" and result["instance_type"] == "g5.xlarge"
    assert result["subnet_id"] in subnets
    assert result["run_timeout_seconds"] > 300
    record = store.get(JOB_ID)
    assert record.status is JobStatus.STARTING
    assert record.current_instance_id == result["instance_id"]
    assert record.attempts[0]["market"] == "spot" and record.attempts[0]["ended_at"] is None
    (reservation,) = ec2.describe_instances(InstanceIds=[result["instance_id"]])["Reservations"]
    found = {t["Key"]: t["Value"] for t in reservation["Instances"][0]["Tags"]}
    assert found["spotrun:job-id"] == JOB_ID and found["spotrun:attempt"] == "1"
    assert found["spotrun:managed"] == "true"


def test_request_capacity_on_demand_market(
    execution_env: dict, store: JobStore, lambda_context: Any
) -> None:
    create_job(store, on_demand_fallback=True)
    result = load_handler("request_capacity").lambda_handler(
        sample("request_capacity", "on_demand_fallback"), lambda_context
    )
    # THEN the cheapest on-demand pool: g6.xlarge at $0.805 beats g5.xlarge at $1.006
    assert result["granted"] is True and result["market"] == "on-demand"
    assert result["instance_type"] == "g6.xlarge"
    assert result["price_per_hour"] == pytest.approx(0.805)


def test_request_capacity_backs_off_then_gives_up(
    execution_env: dict, store: JobStore, lambda_context: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN no capacity in any pool and a real-sized backoff base
    create_job(store)
    monkeypatch.setenv("CAPACITY_RETRY_BASE_SECONDS", "30")
    handler = load_handler("request_capacity")
    refuse_every_fleet()
    # WHEN it tries
    result = handler.lambda_handler(sample("request_capacity", "first_try"), lambda_context)
    # THEN it asks the state machine to wait (15-30 s on the first try) and try again
    assert result["granted"] is False and result["try"] == 1 and result["market"] == "spot"
    assert 15 <= result["wait_seconds"] <= 30
    # AND after the last try, without on-demand allowed, Capacity.Unavailable
    with pytest.raises(CapacityUnavailable, match="on_demand_fallback is off"):
        handler.lambda_handler(
            sample("request_capacity", "first_try", **{"try": 3}), lambda_context
        )
    assert store.get(JOB_ID).capacity_failures == 2


def test_request_capacity_moves_to_on_demand_when_allowed(
    execution_env: dict, store: JobStore, lambda_context: Any
) -> None:
    create_job(store, on_demand_fallback=True)
    handler = load_handler("request_capacity")
    refuse_every_fleet()
    result = handler.lambda_handler(
        sample("request_capacity", "first_try", **{"try": 3}), lambda_context
    )
    assert result == {**result, "granted": False, "try": 0, "market": "on-demand"}
    assert result["wait_seconds"] == 0


def test_request_capacity_refuses_an_ended_job(
    execution_env: dict, store: JobStore, lambda_context: Any
) -> None:
    create_job(store, status=JobStatus.CANCELLED)
    with pytest.raises(JobInvalid):
        load_handler("request_capacity").lambda_handler(
            sample("request_capacity", "first_try"), lambda_context
        )


def test_capacity_candidate_pools_skip_types_not_offered(ec2: Any, subnets: list[str]) -> None:
    pools = capacity.candidate_pools(["g5.xlarge", "not.atype"], subnets, ec2_client=ec2)
    assert {pool.instance_type for pool in pools} == {"g5.xlarge"}
    assert {pool.subnet_id for pool in pools} == set(subnets)


def test_capacity_price_pools_drop_spot_above_the_cap(ec2: Any, subnets: list[str]) -> None:
    pools = capacity.candidate_pools(["g5.xlarge"], subnets, ec2_client=ec2)
    assert capacity.price_pools(pools, "spot", max_spot_price=1e-9, ec2_client=ec2) == []
    priced = capacity.price_pools(pools, "spot", max_spot_price=None, ec2_client=ec2)
    prices = [price for _, price in priced]
    assert prices == sorted(prices)


@pytest.mark.parametrize("try_number", [0, 1, 2, 5, 12])
def test_capacity_backoff_is_bounded(try_number: int) -> None:
    ceiling = min(capacity.MAX_WAIT_SECONDS, 30 * 2**try_number)
    for _ in range(20):
        assert ceiling / 2 - 1 <= capacity.backoff_seconds(try_number, 30) <= ceiling
    assert capacity.backoff_seconds(try_number, 0) == 0
