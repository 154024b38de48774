"""StartTrainerFunction and spotrun.tickets: the token on the record, the ticket in S3."""

from __future__ import annotations

from typing import Any

import pytest

from spotrun.errors import JobInvalid
from spotrun.jobs import JobStore
from spotrun.status import JobStatus
from tests.control.conftest import BUCKET_NAME, TRAINER_IMAGE, load_handler
from tests.control.function_helpers import (
    JOB_ID,
    create_job,
    sample,
    ticket,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:No application metrics"),
    pytest.mark.usefixtures("shared_service_models"),
]


def test_start_trainer_writes_the_ticket_of_the_contract(
    execution_env: dict, store: JobStore, s3: Any, lambda_context: Any
) -> None:
    # GIVEN a job with an S3 dataset and a checkpoint interval
    create_job(
        store,
        dataset={"s3_uri": "s3://datasets/tiny/"},
        checkpoint={"interval": {"steps": 50}},
        environment={"SPOTRUN_EXAMPLE_STEPS": "200"},
    )
    event = sample("start_trainer", "run_trainer")

    # WHEN the trainer is started
    result = load_handler("start_trainer").lambda_handler(event, lambda_context)

    # THEN the ticket is where the bootstrap looks, with every contract field
    assert result["ticket_uri"] == f"s3://{BUCKET_NAME}/tickets/{event['instance_id']}.json"
    written = ticket(s3, BUCKET_NAME, event["instance_id"])
    assert written == {
        "ticket_version": 1,
        "job_id": JOB_ID,
        "attempt": 1,
        "instance_id": event["instance_id"],
        "region": "us-east-1",
        "task_token": event["task_token"],
        "image": TRAINER_IMAGE,
        "command": ["python", "-m", "spotrun_trainer.examples.tiny_lm"],
        "environment": {"SPOTRUN_EXAMPLE_STEPS": "200"},
        "volumes": event["volumes"],
        "dataset": {"s3_uri": "s3://datasets/tiny/"},
        "resume": {"enabled": False, "checkpoint_step": None},
        "checkpoint": {
            "dir": "/mnt/spotrun/checkpoint",
            "s3_uri": f"s3://{BUCKET_NAME}/checkpoints/{JOB_ID}/",
            "interval": {"steps": 50},
            "keep": 3,
            "expected_interruption_seconds": 3600,
            "interruptions_seen": 0,
        },
        "output": {"model_uri": f"s3://{BUCKET_NAME}/models/{JOB_ID}/model.pt"},
        "heartbeat_seconds": 100,
        "notice_poll_seconds": 2,
    }
    # AND the token is on the record for the event functions
    record = store.get(JOB_ID)
    assert record.task_token == event["task_token"]
    assert record.current_instance_id == event["instance_id"]
    assert record.status is JobStatus.RUNNING


def test_start_trainer_resumes_from_the_committed_step(
    execution_env: dict, store: JobStore, s3: Any, lambda_context: Any
) -> None:
    create_job(store, checkpoint={"s3_mirror": False})
    store.commit_checkpoint(JOB_ID, {"step": 120})
    event = sample("start_trainer", "run_trainer", attempt=2)
    load_handler("start_trainer").lambda_handler(event, lambda_context)
    written = ticket(s3, BUCKET_NAME, event["instance_id"])
    assert written["resume"] == {"enabled": True, "checkpoint_step": 120}
    assert written["checkpoint"]["s3_uri"] is None and written["dataset"] is None


def test_start_trainer_refuses_an_ended_job(
    execution_env: dict, store: JobStore, s3: Any, lambda_context: Any
) -> None:
    create_job(store, status=JobStatus.CANCELLED)
    event = sample("start_trainer", "run_trainer")
    with pytest.raises(JobInvalid):
        load_handler("start_trainer").lambda_handler(event, lambda_context)
    assert s3.list_objects_v2(Bucket=BUCKET_NAME, Prefix="tickets/").get("KeyCount") == 0
