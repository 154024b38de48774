"""Tests for spotrun.jobs: the job record and JobStore against moto DynamoDB."""

from __future__ import annotations

from decimal import Decimal

import pytest

from spotrun.errors import JobConflictError, JobNotFoundError
from spotrun.jobs import JobRecord, JobStore, derived_job_id, new_job_id
from spotrun.status import JobStatus


def make_record(status: JobStatus = JobStatus.SUBMITTED, **fields) -> JobRecord:
    return JobRecord(
        job_id=fields.pop("job_id", new_job_id()),
        status=status,
        spec=fields.pop("spec", {"name": "tiny-lm", "max_spot_price": 0.35}),
        **fields,
    )


def test_job_ids_have_the_contract_form():
    # GIVEN random and derived ids
    ids = [new_job_id(), derived_job_id("s3", "bucket", "jobs/a.json", "etag")]
    # THEN both are "j-" and 20 lowercase hex characters; derivation is stable
    for job_id in ids:
        assert job_id.startswith("j-") and len(job_id) == 22
        int(job_id[2:], 16)
    assert derived_job_id("a", "b") == derived_job_id("a", "b") != derived_job_id("ab", "")


def test_store_create_then_get_round_trips_floats_and_nesting(store: JobStore):
    # GIVEN a record with floats in nested places
    record = make_record(
        cost_usd=1.25,
        attempts=[{"attempt": 1, "price_per_hour": 0.3071, "outcome": None}],
        metrics={"loss": 2.5, "steps": 200},
    )
    # WHEN it is created and read back
    assert store.create(record) is True
    loaded = store.get(record.job_id)
    # THEN everything comes back as written, floats as floats and ints as ints
    assert loaded == record
    assert isinstance(loaded.metrics["steps"], int)
    assert loaded.spec["max_spot_price"] == 0.35


def test_store_create_existing_returns_false_and_keeps_the_record(store: JobStore):
    # GIVEN a stored record
    record = make_record(reason="first")
    store.create(record)
    # WHEN a record with the same id is created again
    created = store.create(make_record(job_id=record.job_id, reason="second"))
    # THEN nothing is overwritten
    assert created is False
    assert store.get(record.job_id).reason == "first"


def test_store_get_unknown_raises_not_found(store: JobStore):
    with pytest.raises(JobNotFoundError) as caught:
        store.get("j-00000000000000000000")
    assert caught.value.job_id == "j-00000000000000000000"


def test_store_get_ignores_idempotency_records(store: JobStore, dynamodb):
    # GIVEN an idempotency record in the shared table
    dynamodb.put_item(
        TableName=store.table_name,
        Item={"job_id": {"S": "fn.submit#abc"}, "idempotency_status": {"S": "COMPLETED"}},
    )
    # THEN it is not a job
    with pytest.raises(JobNotFoundError):
        store.get("fn.submit#abc")


def test_store_update_sets_adds_and_appends_in_one_write(store: JobStore):
    # GIVEN a stored record
    record = make_record()
    store.create(record)
    # WHEN fields are set, counters added to and lists appended to
    updated = store.update(
        record.job_id,
        set={"execution_arn": "arn:aws:states:us-east-1:1:execution:sm:x", "reason": None},
        add={"interruptions": 1, "cost_usd": 0.125},
        append={"attempts": [{"attempt": 1, "instance_id": "i-1"}]},
    )
    again = store.update(
        record.job_id,
        add={"cost_usd": 0.25},
        append={"attempts": [{"attempt": 2, "instance_id": "i-2"}]},
    )
    # THEN the returned record and the stored one agree
    assert updated.execution_arn.endswith(":x")
    assert again.interruptions == 1
    assert again.cost_usd == pytest.approx(0.375)
    assert [a["instance_id"] for a in again.attempts] == ["i-1", "i-2"]
    assert store.get(record.job_id) == again
    assert again.updated_at >= record.updated_at


def test_store_update_expect_status_conflict_changes_nothing(store: JobStore):
    # GIVEN a SUBMITTED record
    record = make_record()
    store.create(record)
    # WHEN an update expects RUNNING
    with pytest.raises(JobConflictError) as caught:
        store.update(record.job_id, set={"reason": "x"}, expect_status=[JobStatus.RUNNING])
    # THEN it fails naming the current status, and the record is untouched
    assert caught.value.status == "SUBMITTED"
    assert store.get(record.job_id) == record


def test_store_update_unknown_job_raises_not_found_and_creates_nothing(store: JobStore):
    with pytest.raises(JobNotFoundError):
        store.update("j-00000000000000000001", set={"reason": "x"})
    with pytest.raises(JobNotFoundError):
        store.get("j-00000000000000000001")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"set": {"no_such_field": 1}},
        {"add": {"reason": 1}},
        {"append": {"interruptions": [1]}},
    ],
)
def test_store_update_rejects_unknown_or_mistyped_fields(store: JobStore, kwargs):
    record = make_record()
    store.create(record)
    with pytest.raises(ValueError):
        store.update(record.job_id, **kwargs)
    assert store.get(record.job_id) == record


def test_store_set_status_moves_between_non_terminal_states(store: JobStore):
    record = make_record()
    store.create(record)
    moved = store.set_status(
        record.job_id, JobStatus.RUNNING, expect_status=[JobStatus.SUBMITTED, JobStatus.STARTING]
    )
    assert moved.status is JobStatus.RUNNING


def test_store_set_status_never_leaves_a_terminal_status(store: JobStore):
    # GIVEN a job that has succeeded
    record = make_record(JobStatus.SUCCEEDED, reason="done")
    store.create(record)
    # WHEN something tries to move it on
    with pytest.raises(JobConflictError):
        store.set_status(record.job_id, JobStatus.RUNNING)
    with pytest.raises(JobConflictError):
        store.set_status(record.job_id, JobStatus.FAILED, reason="late failure")
    # THEN it is still SUCCEEDED with its reason
    assert store.get(record.job_id).status is JobStatus.SUCCEEDED
    assert store.get(record.job_id).reason == "done"


def test_store_set_status_same_terminal_status_is_a_no_op(store: JobStore):
    # GIVEN a cancelled job
    record = make_record(JobStatus.CANCELLED, reason="cancelled")
    store.create(record)
    # WHEN a redelivered event cancels it again
    again = store.set_status(record.job_id, JobStatus.CANCELLED, reason="other")
    # THEN it answers with the record unchanged
    assert again.reason == "cancelled"
    assert store.get(record.job_id) == record


def test_store_set_status_expect_status_conflict(store: JobStore):
    record = make_record(JobStatus.RUNNING)
    store.create(record)
    with pytest.raises(JobConflictError):
        store.set_status(record.job_id, JobStatus.STARTING, expect_status=JobStatus.SUBMITTED)
    assert store.get(record.job_id).status is JobStatus.RUNNING


def test_store_commit_checkpoint_never_goes_backwards(store: JobStore):
    # GIVEN a job with checkpoint 120 committed
    record = make_record(JobStatus.RUNNING)
    store.create(record)
    assert store.commit_checkpoint(record.job_id, {"step": 120, "volume_id": "vol-1"}) is True
    # WHEN a late report of step 80 arrives, then the same step gains a snapshot
    older = store.commit_checkpoint(record.job_id, {"step": 80, "volume_id": "vol-0"})
    same = store.commit_checkpoint(
        record.job_id, {"step": 120, "volume_id": "vol-1", "snapshot_id": "snap-1"}
    )
    newer = store.commit_checkpoint(record.job_id, {"step": 121, "s3_uri": "s3://b/c/"})
    # THEN the older one is refused, the others are written
    assert (older, same, newer) == (False, True, True)
    assert store.get(record.job_id).checkpoint == {"step": 121, "s3_uri": "s3://b/c/"}


def test_store_commit_checkpoint_unknown_job_and_bad_step(store: JobStore):
    with pytest.raises(JobNotFoundError):
        store.commit_checkpoint("j-00000000000000000002", {"step": 1})
    with pytest.raises(ValueError):
        store.commit_checkpoint("j-00000000000000000002", {"step": "1"})


def test_store_list_jobs_pages_filters_and_skips_other_items(store: JobStore, dynamodb):
    # GIVEN seven running and three failed jobs, plus an idempotency record
    running = {make_record(JobStatus.RUNNING).job_id for _ in range(7)}
    for job_id in running:
        store.create(make_record(JobStatus.RUNNING, job_id=job_id))
    for _ in range(3):
        store.create(make_record(JobStatus.FAILED))
    dynamodb.put_item(
        TableName=store.table_name,
        Item={"job_id": {"S": "fn.submit#abc"}, "idempotency_status": {"S": "COMPLETED"}},
    )
    # WHEN all jobs are listed three at a time
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = store.list_jobs(limit=3, cursor=cursor)
        seen.extend(page)
        pages += 1
        if cursor is None:
            break
    # THEN every job comes exactly once and nothing else does
    assert len(seen) == 10 == len({r.job_id for r in seen})
    assert pages >= 4
    # AND a status filter returns only those
    filtered, _ = store.list_jobs(status=JobStatus.RUNNING, limit=50)
    assert {r.job_id for r in filtered} == running
    both, _ = store.list_jobs(status=[JobStatus.RUNNING, JobStatus.FAILED])
    assert len(both) == 10


def test_store_list_jobs_bad_cursor_raises_value_error(store: JobStore):
    with pytest.raises(ValueError):
        store.list_jobs(cursor="not-a-cursor")


def test_record_item_has_no_floats_and_drops_none(store: JobStore):
    # GIVEN a record with a float and None fields
    item = make_record(cost_usd=0.1).to_item()
    # THEN DynamoDB gets a decimal string, not a float, and no NULLs
    assert item["cost_usd"] == {"N": "0.1"}
    assert "execution_arn" not in item
    assert item["kind"] == {"S": "job"}
    assert Decimal(item["cost_usd"]["N"]) == Decimal("0.1")
