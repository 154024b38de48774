"""Jobs carried across interruptions on the local cloud (real template, ASL, handlers, trainer)."""

from __future__ import annotations

import hashlib
import json

import pytest
from e2e_support import CHECKPOINT_INTERVAL_STEPS, job_spec, wait_until

from spotrun_local.chaos import Fault
from spotrun_local.metrics import JobTimeline

pytestmark = pytest.mark.e2e

# Long enough that the last notice comes well before the end (the trainer polls IMDS every 2 s).
STEPS = 90


def _submit(cloud, jobs: list[str], spec: dict) -> str:
    response = cloud.submit(spec)
    assert response.status in (200, 201), response.body
    jobs.append(response.body["job_id"])
    return response.body["job_id"]


def _story(job: dict) -> str:
    """The parts of a job record that explain an outcome, for assertion messages."""
    attempts = [
        {key: attempt.get(key) for key in ("attempt", "instance_id", "outcome", "error")}
        for attempt in job.get("attempts") or []
    ]
    return json.dumps(
        {"status": job.get("status"), "reason": job.get("reason"), "attempts": attempts}
    )


def _digest(cloud, job_id: str, tmp_path) -> str:
    path = cloud.download_model(job_id, tmp_path / job_id / "model.pt")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_three_interruptions_succeed_with_the_same_model_as_none(cloud, jobs, tmp_path):
    # GIVEN the same job twice: one left alone, one interrupted three times
    baseline = _submit(cloud, jobs, job_spec("baseline", steps=STEPS))
    interrupted = _submit(cloud, jobs, job_spec("interrupted", steps=STEPS))
    cloud.chaos.arm(interrupted, [Fault(at_step=step) for step in (15, 35, 55)])
    # WHEN both run to the end
    finished = {
        job_id: cloud.wait_for_job(job_id, timeout=240) for job_id in (baseline, interrupted)
    }
    # THEN both succeed, the interrupted one after three spot interruptions
    assert finished[baseline]["status"] == "SUCCEEDED", _story(finished[baseline])
    assert finished[interrupted]["status"] == "SUCCEEDED", _story(finished[interrupted])
    delivered = [fault for fault in cloud.chaos.delivered if fault.job_id == interrupted]
    assert [fault.kind for fault in delivered] == ["interrupt"] * 3
    assert finished[interrupted]["interruptions"] == 3, _story(finished[interrupted])
    assert len(finished[interrupted]["attempts"]) == 4
    timeline = JobTimeline.collect(interrupted, cloud.runner.instances.values(), delivered)
    for outcome in timeline.interruptions():
        assert outcome.time_to_safe_seconds is not None, outcome
        # the notice's checkpoint is what the next attempt resumes from: nothing redone
        assert outcome.steps_lost == 0, outcome
        assert outcome.resumed_from == outcome.safe_step, outcome
    # and the final model is bitwise the model of the uninterrupted run
    assert _digest(cloud, interrupted, tmp_path) == _digest(cloud, baseline, tmp_path)


def test_instance_killed_without_notice_resumes_after_heartbeat_timeout(cloud, jobs):
    # GIVEN a job with a short heartbeat timeout (still longer than an instance takes to
    # boot and start the trainer, about 10 s here: the first heartbeat comes from it)
    spec = job_spec("killed", steps=STEPS, heartbeat_timeout_seconds=20)
    job_id = _submit(cloud, jobs, spec)
    # WHEN its instance dies at step 35 with no notice (moto still says "running")
    cloud.chaos.arm(job_id, [Fault(kind="kill", at_step=35)])
    final = cloud.wait_for_job(job_id, timeout=180)
    # THEN the heartbeat timeout catches it and the job resumes and succeeds
    assert final["status"] == "SUCCEEDED", _story(final)
    (kill,) = [fault for fault in cloud.chaos.delivered if fault.job_id == job_id]
    first, second = final["attempts"][:2]
    assert first["instance_id"] == kill.instance_id
    assert first["outcome"] != "succeeded"
    timeline = JobTimeline.collect(job_id, cloud.runner.instances.values(), [kill])
    (outcome,) = timeline.interruptions()
    # from the last periodic checkpoint: no more than one interval lost
    assert outcome.resumed_from is not None and outcome.resumed_from > 0
    assert outcome.steps_lost is not None
    assert outcome.steps_lost <= CHECKPOINT_INTERVAL_STEPS, outcome
    assert second["instance_id"] != kill.instance_id
    wait_until(lambda: not cloud.runner.get(kill.instance_id).process_alive(), timeout=10)
