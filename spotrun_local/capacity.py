"""Capacity errors in chosen pools, injected where AWS produces them: in EC2 itself.

moto always grants capacity. The local cloud refuses it the way EC2 does, in
the server (so every caller sees it, whatever process it runs in — the
request-capacity function runs in its own worker):

* ``CreateFleet`` (instant): refused pools are left out of the launch and come
  back in the response's ``Errors`` with ``ErrorCode`` ``InsufficientInstanceCapacity``;
  when every pool is refused the fleet launches nothing.
* ``RunInstances``: a refused pool raises ``InsufficientInstanceCapacity``
  (with a request id, as every EC2 error response has).

A pool is an instance type in an availability zone; a fault names either or
both, a market, and how many launches it refuses (or all of them).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

ERROR_CODE = "InsufficientInstanceCapacity"


@dataclass
class CapacityFault:
    """Refuse launches in the pools this matches (None matches any)."""

    instance_type: str | None = None
    availability_zone: str | None = None
    market: str | None = None  # "spot", "on-demand" or None for both
    times: int | None = None  # launches to refuse; None: every one

    def matches(self, instance_type: str, zone: str, market: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        return (
            self.instance_type in (None, instance_type)
            and self.availability_zone in (None, zone)
            and self.market in (None, market)
        )


@dataclass(frozen=True)
class Refusal:
    """One pool refused once: what tests and the demo look at."""

    instance_type: str
    availability_zone: str
    market: str
    api: str
    time: float


@dataclass
class CapacityInjector:
    """Wraps moto's EC2 backend and fleet response to refuse capacity per :class:`CapacityFault`."""

    faults: list[CapacityFault] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    _fleet_errors: dict[str, list[dict]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _inside_fleet: threading.local = field(default_factory=threading.local)

    def add(self, fault: CapacityFault) -> None:
        with self._lock:
            self.faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def refuses(self, instance_type: str, zone: str, market: str, api: str) -> bool:
        """Whether a launch in this pool is refused now (and count it if so)."""
        with self._lock:
            for fault in self.faults:
                if fault.matches(instance_type, zone, market):
                    if fault.times is not None:
                        fault.times -= 1
                    self.refusals.append(Refusal(instance_type, zone, market, api, time.time()))
                    return True
        return False

    # -- installation ------------------------------------------------------------------

    def install(self, backend: Any) -> CapacityInjector:
        from moto.ec2.responses.fleets import Fleets

        self._backend = backend
        self._original_create_fleet = backend.create_fleet
        self._original_run_instances = backend.run_instances
        backend.create_fleet = self._create_fleet
        backend.run_instances = self._run_instances
        self._original_response = Fleets.create_fleet
        injector = self

        def create_fleet_response(response_self: Any) -> Any:
            result = injector._original_response(response_self)
            errors = injector._fleet_errors.pop(result.result.get("FleetId"), None)
            if errors:
                result.result["Errors"] = errors
                result.result.setdefault("Instances", [])
            return result

        Fleets.create_fleet = create_fleet_response
        return self

    def uninstall(self) -> None:
        from moto.ec2.responses.fleets import Fleets

        Fleets.create_fleet = self._original_response
        del self._backend.create_fleet
        del self._backend.run_instances

    # -- the wrapped backend methods ----------------------------------------------------

    def _zone_of(self, subnet_id: str | None, zone: str | None) -> str:
        if zone:
            return zone
        if subnet_id:
            return self._backend.get_subnet(subnet_id).availability_zone
        return f"{self._backend.region_name}a"

    def _create_fleet(self, **kwargs: Any) -> Any:
        capacity = dict(kwargs["target_capacity_specification"])
        market = capacity.get("DefaultTargetCapacityType", "on-demand")
        kept_configs, errors = [], []
        for config in kwargs["launch_template_configs"] or []:
            template = self._template_data(config["LaunchTemplateSpecification"])
            kept = []
            for override in config.get("Overrides") or [{}]:
                instance_type = override.get("InstanceType") or template.get("InstanceType", "")
                subnet = override.get("SubnetId") or _template_subnet(template)
                zone = self._zone_of(subnet, override.get("AvailabilityZone"))
                if self.refuses(instance_type, zone, market, "CreateFleet"):
                    errors.append(_fleet_error(config, override, market, instance_type, zone))
                else:
                    kept.append(override)
            if kept:
                kept_configs.append(
                    {**config, "Overrides": kept} if config.get("Overrides") else config
                )
        arguments = dict(kwargs)
        if kept_configs:
            arguments["launch_template_configs"] = kept_configs
        else:  # nothing left: AWS answers with the errors and launches nothing
            arguments["target_capacity_specification"] = {
                **capacity,
                "TotalTargetCapacity": 0,
                "SpotTargetCapacity": 0,
                "OnDemandTargetCapacity": 0,
            }
        self._inside_fleet.active = True
        try:
            fleet = self._original_create_fleet(**arguments)
        finally:
            self._inside_fleet.active = False
        if errors:
            self._fleet_errors[fleet.id] = errors
        return fleet

    def _run_instances(self, image_id: str, count: int, *args: Any, **kwargs: Any) -> Any:
        if not getattr(self._inside_fleet, "active", False):  # a fleet has decided already
            from moto.ec2.exceptions import EC2ClientError

            instance_type = kwargs.get("instance_type") or "m1.small"
            zone = self._zone_of(kwargs.get("subnet_id"), kwargs.get("placement"))
            market = "spot" if kwargs.get("instance_market_options") else "on-demand"
            if self.refuses(instance_type, zone, market, "RunInstances"):
                raise EC2ClientError(
                    ERROR_CODE,
                    f"We currently do not have sufficient {instance_type} capacity in the "
                    f"Availability Zone you requested ({zone}).",
                )
        return self._original_run_instances(image_id, count, *args, **kwargs)

    def _template_data(self, specification: dict) -> dict:
        if "LaunchTemplateId" in specification:
            template = self._backend.get_launch_template(specification["LaunchTemplateId"])
        else:
            template = self._backend.get_launch_template_by_name(
                specification["LaunchTemplateName"]
            )
        version = str(specification.get("Version", "$Default"))
        if version == "$Latest":
            version = template.latest_version_number
        elif version == "$Default":
            version = template.default_version_number
        return template.get_version(version).data


def _template_subnet(template: dict) -> str | None:
    for interface in template.get("NetworkInterfaces") or []:
        if interface.get("SubnetId"):
            return interface["SubnetId"]
    return None


def _fleet_error(config: dict, override: dict, market: str, instance_type: str, zone: str):
    return {
        "LaunchTemplateAndOverrides": {
            "LaunchTemplateSpecification": config["LaunchTemplateSpecification"],
            "Overrides": override,
        },
        "Lifecycle": market,
        "ErrorCode": ERROR_CODE,
        "ErrorMessage": (
            f"We currently do not have sufficient {instance_type} capacity in the "
            f"Availability Zone you requested ({zone})."
        ),
    }
