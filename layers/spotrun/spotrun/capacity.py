"""Finding capacity: candidate pools, one instance through EC2 Fleet, backoff when none.

A *pool* is an instance type in one subnet (so one AZ). Pools are tried one
subnet at a time, cheapest subnet first: each try is an instant EC2 Fleet
(``Type=instant``) with one override per instance type offered there, so EC2's
``price-capacity-optimized`` strategy picks among the types of that AZ, and a
failure names its pools in the response's ``Errors``. Instant fleets report
insufficient capacity in ``Errors``, not as an exception:
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instant-fleet.html
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from spotrun import budget, pricing, tags
from spotrun.errors import CapacityUnavailable, JobConflictError, JobInvalid
from spotrun.jobs import JobStore, utc_now
from spotrun.spec import JobSpec
from spotrun.status import JobStatus

SPOT = "spot"
ON_DEMAND = "on-demand"
# Tries per market before moving on (spot -> on-demand when allowed -> give up).
TRIES_PER_MARKET = 4
MAX_WAIT_SECONDS = 900
# Error codes an instant fleet returns for "no capacity for you here, now".
CAPACITY_ERROR_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "UnfulfillableCapacity",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        "Unsupported",
    }
)


@dataclass(frozen=True)
class Pool:
    """Where an instance may come from."""

    instance_type: str
    subnet_id: str
    availability_zone: str


@dataclass(frozen=True)
class Grant:
    """The instance a fleet launched."""

    instance_id: str
    instance_type: str
    subnet_id: str
    availability_zone: str
    market: str
    price_per_hour: float | None


@dataclass
class PoolErrors:
    """Why pools refused, kept for the reason a job finally fails with."""

    errors: dict[str, str] = field(default_factory=dict)

    def add(self, pool: str, code: str) -> None:
        self.errors[pool] = code

    def summary(self) -> str:
        return ", ".join(f"{pool}: {code}" for pool, code in sorted(self.errors.items()))


def candidate_pools(
    instance_types: Iterable[str], subnet_ids: Iterable[str], *, ec2_client: Any
) -> list[Pool]:
    """Every (type, subnet) pair where EC2 offers the type in the subnet's AZ."""
    subnet_ids = list(subnet_ids)
    instance_types = list(instance_types)
    subnets = ec2_client.describe_subnets(SubnetIds=subnet_ids)["Subnets"]
    zone_of = {subnet["SubnetId"]: subnet["AvailabilityZone"] for subnet in subnets}
    offered: set[tuple[str, str]] = set()
    paginator = ec2_client.get_paginator("describe_instance_type_offerings")
    for page in paginator.paginate(
        LocationType="availability-zone",
        Filters=[
            {"Name": "instance-type", "Values": instance_types},
            {"Name": "location", "Values": sorted(set(zone_of.values()))},
        ],
    ):
        for offering in page.get("InstanceTypeOfferings", []):
            offered.add((offering["InstanceType"], offering["Location"]))
    return [
        Pool(instance_type, subnet_id, zone_of[subnet_id])
        for subnet_id in subnet_ids
        if subnet_id in zone_of
        for instance_type in instance_types
        if (instance_type, zone_of[subnet_id]) in offered
    ]


def price_pools(
    pools: list[Pool], market: str, *, max_spot_price: float | None, ec2_client: Any
) -> list[tuple[Pool, float | None]]:
    """Pools with their hourly price, cheapest first; spot pools above the cap dropped."""
    if market == ON_DEMAND:
        priced = [(pool, pricing.on_demand_price(pool.instance_type)) for pool in pools]
    else:
        spot = pricing.spot_prices(
            sorted({pool.instance_type for pool in pools}),
            sorted({pool.availability_zone for pool in pools}),
            ec2_client=ec2_client,
        )
        priced = [(pool, spot.get((pool.instance_type, pool.availability_zone))) for pool in pools]
        if max_spot_price is not None:
            priced = [
                (pool, price) for pool, price in priced if price is None or price <= max_spot_price
            ]
    # Unknown prices go last; Python's sort is stable, so the spec's order breaks ties.
    return sorted(priced, key=lambda item: (item[1] is None, item[1] or 0.0))


def launch_instance(
    priced_pools: list[tuple[Pool, float | None]],
    *,
    market: str,
    launch_template_id: str,
    resource_tags: Mapping[str, str],
    max_spot_price: float | None,
    client_token: str,
    ec2_client: Any,
) -> Grant:
    """Launch one instance in the first subnet that has capacity; raise Capacity.Unavailable."""
    by_subnet: dict[str, list[tuple[Pool, float | None]]] = {}
    for pool, price in priced_pools:
        by_subnet.setdefault(pool.subnet_id, []).append((pool, price))
    refusals = PoolErrors()
    for subnet_id, pools in by_subnet.items():
        overrides = []
        for pool, _price in pools:
            override: dict[str, Any] = {"InstanceType": pool.instance_type, "SubnetId": subnet_id}
            if market == SPOT and max_spot_price is not None:
                override["MaxPrice"] = f"{max_spot_price:.5f}"
            overrides.append(override)
        request: dict[str, Any] = {
            # Same token on a Lambda retry -> EC2 returns the same fleet, not a second
            # instance. Hashed: tokens are limited to 64 characters.
            "ClientToken": _token(client_token, subnet_id),
            "Type": "instant",
            "LaunchTemplateConfigs": [
                {
                    "LaunchTemplateSpecification": {
                        "LaunchTemplateId": launch_template_id,
                        "Version": "$Latest",
                    },
                    "Overrides": overrides,
                }
            ],
            "TargetCapacitySpecification": {
                "TotalTargetCapacity": 1,
                "DefaultTargetCapacityType": market,
            },
            "TagSpecifications": [
                *tags.tag_specifications("instance", resource_tags),
                *tags.tag_specifications("fleet", resource_tags),
            ],
        }
        if market == SPOT:
            request["SpotOptions"] = {"AllocationStrategy": "price-capacity-optimized"}
        else:
            request["OnDemandOptions"] = {"AllocationStrategy": "lowest-price"}
        try:
            response = ec2_client.create_fleet(**request)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in CAPACITY_ERROR_CODES:
                raise
            refusals.add(subnet_id, code)
            continue
        granted = _granted_instance(response)
        if granted is not None:
            instance_id, instance_type = granted
            pool, price = next(
                ((pool, price) for pool, price in pools if pool.instance_type == instance_type),
                pools[0],
            )
            return Grant(
                instance_id=instance_id,
                instance_type=instance_type,
                subnet_id=subnet_id,
                availability_zone=pool.availability_zone,
                market=market,
                price_per_hour=price,
            )
        for error in response.get("Errors", []) or [{"ErrorCode": "NoInstances"}]:
            overrides_of = (error.get("LaunchTemplateAndOverrides") or {}).get("Overrides") or {}
            name = f"{overrides_of.get('InstanceType', '*')}@{subnet_id}"
            refusals.add(name, error.get("ErrorCode", "Unknown"))
    raise CapacityUnavailable(
        f"no {market} capacity in {len(priced_pools)} pools"
        + (f" ({refusals.summary()})" if refusals.errors else "")
    )


def _token(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:48]


def _granted_instance(response: Mapping[str, Any]) -> tuple[str, str] | None:
    for entry in response.get("Instances", []) or []:
        for instance_id in entry.get("InstanceIds", []) or []:
            return instance_id, entry.get("InstanceType", "")
    return None


def backoff_seconds(try_number: int, base_seconds: float) -> int:
    """Exponential backoff with jitter: about base x 2^try, capped at 15 minutes.

    "Equal jitter" (half fixed, half random) keeps a floor under the wait, so a
    storm of jobs without capacity spreads out but none retries at once:
    https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/
    """
    ceiling = min(MAX_WAIT_SECONDS, base_seconds * (2**try_number))
    return round(ceiling / 2 + random.uniform(0, ceiling / 2))


def request_capacity(
    job_id: str,
    try_number: int,
    market: str,
    *,
    store: JobStore,
    ec2_client: Any,
    launch_template_id: str,
    retry_base_seconds: float,
    now: datetime | None = None,
) -> dict[str, Any]:
    """One try at an instance for the job's next attempt (the "Request Spot Capacity" state).

    Returns the state's ``capacity`` object (docs/state-machine.md): granted, or
    not granted with the next try, market and how long to wait. Raises
    ``Capacity.Unavailable`` when the tries are used up (and on-demand is not
    allowed or also failed), ``Job.Invalid`` when the job has ended meanwhile.
    """
    now = now or datetime.now(UTC)
    record = store.get(job_id)
    if record.status.is_terminal():
        raise JobInvalid(f"job {job_id} is {record.status.value}; not launching")
    spec = JobSpec.model_validate(record.spec)
    attempt = len(record.attempts) + 1
    pools = candidate_pools(spec.instance_types, spec.subnets, ec2_client=ec2_client)
    priced = price_pools(pools, market, max_spot_price=spec.max_spot_price, ec2_client=ec2_client)
    try:
        if not priced:
            raise CapacityUnavailable(
                f"none of {spec.instance_types} is offered (within max_spot_price) in the AZs "
                f"of {spec.subnets}"
            )
        grant = launch_instance(
            priced,
            market=market,
            launch_template_id=launch_template_id,
            resource_tags=tags.resource_tags(job_id, attempt, spec.tags),
            max_spot_price=spec.max_spot_price,
            client_token=f"{job_id}-{attempt}-{market}-{try_number}",
            ec2_client=ec2_client,
        )
    except CapacityUnavailable as exc:
        store.update(job_id, add={"capacity_failures": 1})
        return _next_try(exc, try_number, market, spec, record, retry_base_seconds, now)

    started_at = utc_now()
    opened = {
        "attempt": attempt,
        "instance_id": grant.instance_id,
        "instance_type": grant.instance_type,
        "availability_zone": grant.availability_zone,
        "subnet_id": grant.subnet_id,
        "market": grant.market,
        "price_per_hour": grant.price_per_hour,
        "started_at": started_at,
        "ended_at": None,
        "outcome": None,
        "cost_usd": None,
    }
    try:
        record = store.update(
            job_id,
            set={
                "status": JobStatus.STARTING if attempt == 1 else JobStatus.RECOVERING,
                "current_instance_id": grant.instance_id,
            },
            append={"attempts": [opened]},
            expect_status=[s for s in JobStatus if not s.is_terminal()],
        )
    except JobConflictError:
        # Cancelled while we launched: give the instance back before anyone is billed.
        ec2_client.terminate_instances(InstanceIds=[grant.instance_id])
        raise JobInvalid(f"job {job_id} ended while capacity was granted") from None
    return {
        "granted": True,
        "try": try_number,
        "market": grant.market,
        "wait_seconds": 0,
        "attempt": attempt,
        "instance_id": grant.instance_id,
        "instance_type": grant.instance_type,
        "availability_zone": grant.availability_zone,
        "subnet_id": grant.subnet_id,
        "price_per_hour": grant.price_per_hour,
        "run_timeout_seconds": budget.run_timeout_seconds(
            record,
            spec,
            grant.price_per_hour,
            now=now,
            heartbeat_timeout_seconds=int(spec.heartbeat_timeout_seconds or 300),
        ),
    }


def _next_try(
    exc: Exception,
    try_number: int,
    market: str,
    spec: JobSpec,
    record: Any,
    retry_base_seconds: float,
    now: datetime,
) -> dict[str, Any]:
    next_try, next_market = try_number + 1, market
    if next_try >= TRIES_PER_MARKET:
        if market == SPOT and spec.on_demand_fallback:
            next_try, next_market = 0, ON_DEMAND
        else:
            allowed = (
                "" if spec.on_demand_fallback or market != SPOT else "; on_demand_fallback is off"
            )
            raise CapacityUnavailable(f"{exc} after {TRIES_PER_MARKET} tries{allowed}") from None
    wait = 0 if next_market != market else backoff_seconds(try_number, retry_base_seconds)
    limit = budget.exhausted(record, spec, now=now)
    if limit is None and spec.deadline is not None and (spec.deadline - now).total_seconds() < wait:
        limit = f"deadline {spec.deadline.isoformat()} falls within the next capacity backoff"
    if limit:
        raise CapacityUnavailable(f"{exc}; {limit}") from None
    return {
        "granted": False,
        "try": next_try,
        "market": next_market,
        "wait_seconds": wait,
        "attempt": None,
        "instance_id": None,
        "instance_type": None,
        "availability_zone": None,
        "subnet_id": None,
        "price_per_hour": None,
        "run_timeout_seconds": None,
    }
