"""What an instance costs per hour: spot prices from EC2, on-demand prices from a small table."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

# On-demand Linux prices in us-east-1 (USD/hour, 2026). The Price List API needs a
# separate endpoint in two regions and a large response for one number; the ledger
# is an estimate and says so, so a table of the types spotrun is used with is enough.
ON_DEMAND_USD_PER_HOUR: dict[str, float] = {
    "g4dn.xlarge": 0.526,
    "g4dn.2xlarge": 0.752,
    "g4dn.12xlarge": 3.912,
    "g5.xlarge": 1.006,
    "g5.2xlarge": 1.212,
    "g5.4xlarge": 1.624,
    "g5.12xlarge": 5.672,
    "g5.48xlarge": 16.288,
    "g6.xlarge": 0.805,
    "g6.2xlarge": 0.978,
    "g6.12xlarge": 4.602,
    "g6e.xlarge": 1.861,
    "p3.2xlarge": 3.06,
    "p4d.24xlarge": 32.773,
    "p5.48xlarge": 98.32,
    "c6i.large": 0.085,
    "c7g.large": 0.0725,
    "m5.large": 0.096,
    "t3.micro": 0.0104,
    "t3.medium": 0.0416,
}


def on_demand_price(instance_type: str) -> float | None:
    """The on-demand hourly price of ``instance_type``, or None when not in the table."""
    return ON_DEMAND_USD_PER_HOUR.get(instance_type)


def spot_prices(
    instance_types: list[str], availability_zones: list[str], *, ec2_client: Any
) -> dict[tuple[str, str], float]:
    """The current spot price of each (instance type, AZ) pool that EC2 reports.

    ``DescribeSpotPriceHistory`` with ``StartTime=now`` returns the price in effect
    now for each pool (one entry per pool and product), newest first.
    """
    if not instance_types:
        return {}
    prices: dict[tuple[str, str], float] = {}
    paginator = ec2_client.get_paginator("describe_spot_price_history")
    pages = paginator.paginate(
        InstanceTypes=list(instance_types),
        ProductDescriptions=["Linux/UNIX"],
        StartTime=datetime.now(UTC),
    )
    wanted = set(availability_zones)
    for page in pages:
        for entry in page.get("SpotPriceHistory", []):
            pool = (entry["InstanceType"], entry["AvailabilityZone"])
            if pool[1] in wanted and pool not in prices:
                prices[pool] = float(entry["SpotPrice"])
    return prices


def attempt_cost(price_per_hour: float | None, started_at: str, ended_at: str) -> float:
    """What an attempt cost: price x wall time (0 when the price is unknown)."""
    if not price_per_hour:
        return 0.0
    seconds = max(0.0, (_parse_time(ended_at) - _parse_time(started_at)).total_seconds())
    return round(price_per_hour * seconds / 3600.0, 6)


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
