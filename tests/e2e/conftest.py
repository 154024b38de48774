"""End-to-end fixtures: one local cloud per module, and a leak check after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_support import NOTICE_SECONDS

from spotrun_local.cloud import CloudConfig, LocalCloud


@pytest.fixture(scope="module")
def cloud(tmp_path_factory) -> Iterator[LocalCloud]:
    """The real template.yaml, handlers, ASL and trainer on one local cloud for the module."""
    config = CloudConfig(
        root=tmp_path_factory.mktemp("local-cloud"),
        notice_seconds=NOTICE_SECONDS,
        shutdown_grace_seconds=2.0,
        instance_environment={"SPOTRUN_TICKET_POLL_SECONDS": "0.5"},
    )
    with LocalCloud(config) as running:
        yield running


@pytest.fixture
def jobs(cloud: LocalCloud) -> Iterator[list[str]]:
    """Job ids a test started; afterwards none may leave an instance, volume or process."""
    started: list[str] = []
    yield started
    cloud.chaos.arm(None, faults=[], random_rate_per_minute=0.0)
    cloud.capacity.clear()
    leaks = {job_id: cloud.wait_no_leaks(job_id, timeout=30) for job_id in started}
    left = {job_id: leak for job_id, leak in leaks.items() if any(leak.values())}
    assert not left, f"left behind: {left}"
    stray = [
        instance.instance_id
        for instance in cloud.runner.instances.values()
        if instance.process_alive() and instance.ended is not None
    ]
    assert not stray, f"processes of ended instances still run: {stray}"
