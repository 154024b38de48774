"""Tests for spotrun.spec: the job spec model and parse_spec."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from spotrun.errors import JobInvalid, SpecError
from spotrun.spec import MAX_SPEC_BYTES, JobSpec, SpecDefaults, parse_spec

NOW = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)
DEFAULTS = SpecDefaults(
    image="123456789012.dkr.ecr.us-east-1.amazonaws.com/spotrun-trainer:latest",
    instance_types=("g5.xlarge", "g6.xlarge"),
    subnets=("subnet-0a1b2c3d", "subnet-0b1c2d3e"),
    heartbeat_timeout_seconds=240,
)

# The example of docs/contracts.md, "Job spec (version 1)", with concrete ids.
CONTRACT_EXAMPLE = {
    "spec_version": 1,
    "name": "tiny-lm",
    "image": None,
    "command": ["python", "-m", "spotrun_trainer.examples.tiny_lm"],
    "instance_types": ["g5.xlarge", "g6.xlarge"],
    "subnets": ["subnet-0a1b2c3d4e5f60718", "subnet-0b1c2d3e4f5a60718"],
    "dataset": {"snapshot_id": "snap-0123456789abcdef0"},
    "checkpoint": {
        "volume_size_gib": 50,
        "interval": "auto",
        "keep": 3,
        "s3_mirror": True,
        "s3_uri": None,
        "expected_interruption_seconds": 3600,
    },
    "max_interruptions": 10,
    "max_restarts_on_error": 2,
    "on_demand_fallback": False,
    "max_spot_price": None,
    "deadline": "2026-12-05T12:00:00Z",
    "cost_cap_usd": 25.0,
    "heartbeat_timeout_seconds": 300,
    "environment": {"SPOTRUN_EXAMPLE_STEPS": "200"},
    "tags": {"team": "nlp"},
}


def errors_of(raw, **kwargs) -> dict[str, str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(raw, defaults=kwargs.pop("defaults", DEFAULTS), now=NOW, **kwargs)
    return {error["field"]: error["reason"] for error in caught.value.errors}


def test_parse_spec_contract_example_is_valid():
    # GIVEN the contract's example spec
    # WHEN it is parsed
    spec = parse_spec(json.dumps(CONTRACT_EXAMPLE), defaults=DEFAULTS, now=NOW)
    # THEN every field is kept and only the missing image comes from the defaults
    assert spec.name == "tiny-lm"
    assert spec.image == DEFAULTS.image
    assert spec.subnets == CONTRACT_EXAMPLE["subnets"]
    assert spec.dataset is not None and spec.dataset.snapshot_id == "snap-0123456789abcdef0"
    assert spec.deadline == datetime(2026, 12, 5, 12, tzinfo=UTC)
    assert spec.heartbeat_timeout_seconds == 300
    assert spec.to_record()["deadline"] == "2026-12-05T12:00:00Z"


def test_parse_spec_name_only_fills_every_default():
    # GIVEN a spec with only a name
    # WHEN it is parsed
    spec = parse_spec(b'{"name": "tiny-lm"}', defaults=DEFAULTS, now=NOW)
    # THEN the deployment's defaults and the model's defaults fill the rest
    assert spec.image == DEFAULTS.image
    assert spec.instance_types == ["g5.xlarge", "g6.xlarge"]
    assert spec.subnets == ["subnet-0a1b2c3d", "subnet-0b1c2d3e"]
    assert spec.heartbeat_timeout_seconds == 240
    assert spec.command == ["python", "-m", "spotrun_trainer.examples.tiny_lm"]
    assert spec.checkpoint.interval == "auto"
    assert spec.checkpoint.keep == 3
    assert spec.dataset is None


def test_parse_spec_record_round_trips_through_the_model():
    # GIVEN a parsed spec in its stored form
    record = parse_spec(CONTRACT_EXAMPLE, defaults=DEFAULTS, now=NOW).to_record()
    # WHEN it is read back long after its deadline passed
    spec = JobSpec.model_validate(record)
    # THEN it validates (the future check is only for submission) and is unchanged
    assert spec.to_record() == record


@pytest.mark.parametrize(
    ("interval", "expected"),
    [("auto", "auto"), ({"seconds": 300}, {"seconds": 300}), ({"steps": 50}, {"steps": 50})],
)
def test_parse_spec_interval_accepts_the_three_forms(interval, expected):
    # GIVEN each form of checkpoint.interval
    # WHEN parsed
    spec = parse_spec({"name": "x", "checkpoint": {"interval": interval}}, defaults=DEFAULTS)
    # THEN it is kept as given
    assert spec.checkpoint.interval == expected
    assert spec.to_record()["checkpoint"]["interval"] == expected


@pytest.mark.parametrize(
    "interval",
    [
        "hourly",
        {"seconds": 0},
        {"steps": -1},
        {"minutes": 5},
        {"seconds": 1, "steps": 1},
        30,
        {"steps": True},
        {"steps": "5"},
    ],
)
def test_parse_spec_interval_rejects_other_forms(interval):
    # GIVEN a checkpoint.interval that is none of the three forms
    # WHEN parsed
    errors = errors_of({"name": "x", "checkpoint": {"interval": interval}})
    # THEN the one error names the field and the accepted forms
    assert list(errors) == ["checkpoint.interval"]
    assert '"auto"' in errors["checkpoint.interval"]


def test_parse_spec_names_every_bad_field():
    # GIVEN a spec with many problems at once
    raw = {
        "name": "tiny lm!",
        "instance_types": ["g5.xlarge", "G5"],
        "subnets": ["subnet-xyz"],
        "dataset": {"snapshot_id": "snapshot-1"},
        "checkpoint": {"keep": 0, "s3_uri": "http://bucket/x"},
        "max_spot_price": 0,
        "cost_cap_usd": -5,
        "heartbeat_timeout_seconds": 2,
        "environment": {"1BAD": "x"},
        "tags": {"spotrun:job-id": "mine", "AWS:owner": "x", "ok": "v" * 300},
        "colour": "blue",
    }
    # WHEN parsed
    errors = errors_of(raw)
    # THEN each bad field is listed with its path
    assert set(errors) == {
        "name",
        "instance_types[1]",
        "subnets[0]",
        "dataset.snapshot_id",
        "checkpoint.keep",
        "checkpoint.s3_uri",
        "max_spot_price",
        "cost_cap_usd",
        "heartbeat_timeout_seconds",
        "environment.1BAD (key)",
        "tags.spotrun:job-id (key)",
        "tags.AWS:owner (key)",
        "tags.ok",
        "colour",
    }
    assert errors["colour"] == "unknown field"
    assert "instance type" in errors["instance_types[1]"]
    assert "spotrun:" in errors["tags.spotrun:job-id (key)"]


def test_parse_spec_rejects_wrong_types_without_coercion():
    # GIVEN numbers as strings, a boolean as a count and a string as the command
    errors = errors_of(
        {"name": "x", "max_interruptions": True, "checkpoint": {"keep": "3"}, "command": "python"}
    )
    # THEN each is an error rather than silently converted
    assert set(errors) == {"max_interruptions", "checkpoint.keep", "command"}


def test_parse_spec_deadline_must_be_aware_and_in_the_future():
    # GIVEN a naive deadline and a past one
    naive = errors_of({"name": "x", "deadline": "2026-12-05T12:00:00"})
    past = errors_of({"name": "x", "deadline": (NOW - timedelta(minutes=1)).isoformat()})
    # THEN both are rejected with the reason
    assert "timezone" in naive["deadline"]
    assert "future" in past["deadline"]


def test_parse_spec_dataset_needs_exactly_one_source():
    # GIVEN a dataset with both sources, and one with none
    both = errors_of(
        {"name": "x", "dataset": {"snapshot_id": "snap-01234567", "s3_uri": "s3://bucket/d/"}}
    )
    neither = errors_of({"name": "x", "dataset": {"volume_size_gib": 10}})
    # THEN both name the dataset
    assert "exactly one" in both["dataset"]
    assert "exactly one" in neither["dataset"]


def test_parse_spec_duplicate_instance_types_rejected():
    errors = errors_of({"name": "x", "instance_types": ["g5.xlarge", "g5.xlarge"]})
    assert "repeat" in errors["instance_types"]


def test_parse_spec_too_many_tags_rejected():
    errors = errors_of({"name": "x", "tags": {f"k{i}": "v" for i in range(41)}})
    assert "tags" in errors


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"name": "x",', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"\xff\xfe", "not UTF-8"),
        ("x" * (MAX_SPEC_BYTES + 1), "limit"),
        ({"name": "x", "environment": {"BIG": "y" * MAX_SPEC_BYTES}}, "limit"),
    ],
)
def test_parse_spec_body_problems_are_one_error_on_the_body(raw, reason):
    # GIVEN a body that is not a usable JSON object
    # WHEN parsed
    errors = errors_of(raw)
    # THEN there is one error, on "$", with the reason
    assert list(errors) == ["$"]
    assert reason in errors["$"]


def test_parse_spec_missing_name_is_required():
    assert errors_of({}) == {"name": "required"}


def test_parse_spec_without_defaults_names_the_missing_variables():
    # GIVEN a deployment without defaults and a spec that relies on them
    errors = errors_of({"name": "x"}, defaults=SpecDefaults())
    # THEN each missing default is named with the variable that would supply it
    assert set(errors) == {"image", "instance_types", "subnets"}
    assert "SUBNET_IDS" in errors["subnets"]


def test_parse_spec_bad_deployment_default_is_reported_as_such():
    # GIVEN a deployment whose default subnet is malformed
    defaults = SpecDefaults(image="img", instance_types=("g5.xlarge",), subnets=("sn-1",))
    # WHEN a spec relies on it
    errors = errors_of({"name": "x"}, defaults=defaults)
    # THEN the error says it came from the deployment
    assert errors["subnets[0]"].startswith("deployment default")


def test_spec_error_is_a_job_invalid_with_a_readable_message():
    # GIVEN a SpecError
    error = SpecError([{"field": "checkpoint.keep", "reason": "too small"}])
    # THEN it is caught as Job.Invalid and reads well
    assert isinstance(error, JobInvalid)
    assert str(error) == "checkpoint.keep: too small"


def test_spec_defaults_from_env_reads_the_template_variables():
    # GIVEN the variables the template sets
    env = {
        "TRAINER_IMAGE_URI": "img:1",
        "DEFAULT_INSTANCE_TYPES": "g5.xlarge, g6.xlarge,",
        "SUBNET_IDS": "subnet-0a1b2c3d",
        "HEARTBEAT_TIMEOUT_SECONDS": "120",
    }
    # WHEN defaults are read
    defaults = SpecDefaults.from_env(env)
    # THEN lists are split and trimmed
    assert defaults == SpecDefaults(
        image="img:1",
        instance_types=("g5.xlarge", "g6.xlarge"),
        subnets=("subnet-0a1b2c3d",),
        heartbeat_timeout_seconds=120,
    )
