"""Capacity refused in some pools, and a job cancelled mid-training, on the local cloud."""

from __future__ import annotations

import pytest
from e2e_support import job_spec, wait_until

from spotrun_local.capacity import CapacityFault

pytestmark = pytest.mark.e2e


def test_capacity_errors_in_the_first_pools_launch_in_another_pool(cloud, jobs):
    # GIVEN no spot capacity in two AZs (the cheapest pools come first in them)
    refused_zones = {"us-east-1a", "us-east-1b"}
    for zone in sorted(refused_zones):
        cloud.inject_capacity_errors(CapacityFault(availability_zone=zone, market="spot"))
    # WHEN a job is submitted
    response = cloud.submit(job_spec("capacity", steps=20))
    assert response.status in (200, 201), response.body
    job_id = response.body["job_id"]
    jobs.append(job_id)
    final = cloud.wait_for_job(job_id, timeout=180)
    # THEN EC2 refused pools (as InsufficientInstanceCapacity), and the job ran elsewhere
    assert final["status"] == "SUCCEEDED", final
    assert cloud.capacity.refusals, "no pool was refused: the test proves nothing"
    assert {refusal.availability_zone for refusal in cloud.capacity.refusals} <= refused_zones
    (attempt,) = final["attempts"]
    assert attempt["availability_zone"] not in refused_zones
    (instance,) = cloud.runner.of_job(job_id)
    assert instance.availability_zone == attempt["availability_zone"]


def test_cancel_mid_training_leaves_nothing(cloud, jobs):
    # GIVEN a job that trains
    response = cloud.submit(job_spec("cancelled", steps=2000))
    assert response.status in (200, 201), response.body
    job_id = response.body["job_id"]
    jobs.append(job_id)

    def training():
        return any(
            line.event.get("event") == "step"
            for instance in cloud.runner.of_job(job_id)
            for line in instance.lines
        )

    wait_until(training, timeout=90)
    # WHEN it is cancelled through the API
    cancelled = cloud.client.cancel(job_id)
    assert cancelled.status in (200, 202), cancelled.body
    # THEN it ends CANCELLED, and the leak check (fixture) finds nothing of it
    final = cloud.wait_for_job(job_id, timeout=90)
    assert final["status"] == "CANCELLED", final
    execution = cloud.sfn.describe_execution(executionArn=final["execution_arn"])
    assert execution["status"] == "ABORTED"
