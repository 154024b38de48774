"""Submitting a job: validate, write the record, start the execution named after the job id.

One routine for both doors (the API and job files in S3). It is safe to run twice
for the same job id: the record is written only if absent, and the execution name
is the job id, so a repeat starts nothing new.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from spotrun.errors import JobNotFoundError, SpecError
from spotrun.jobs import JobRecord, JobStore, derived_job_id
from spotrun.spec import BODY, MAX_SPEC_BYTES, JobSpec, SpecDefaults, parse_spec
from spotrun.status import JobStatus

MAX_REASON_CHARS = 2000
MAX_KEPT_SPEC_BYTES = 16 * 1024


@dataclass(frozen=True)
class SubmissionSettings:
    """What submission needs from the deployment."""

    state_machine_arn: str
    defaults: SpecDefaults = field(default_factory=SpecDefaults)
    jobs_bucket: str | None = None
    dataset_bucket: str | None = None  # another bucket the trainer role may read

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SubmissionSettings:
        """From ``STATE_MACHINE_ARN``, ``JOBS_BUCKET``, ``DATASET_BUCKET`` and the spec
        defaults' variables."""
        env = dict(os.environ if environ is None else environ)
        return cls(
            state_machine_arn=env["STATE_MACHINE_ARN"],
            defaults=SpecDefaults.from_env(env),
            jobs_bucket=env.get("JOBS_BUCKET") or None,
            dataset_bucket=env.get("DATASET_BUCKET") or None,
        )


@dataclass(frozen=True)
class Submission:
    """The outcome: the job's status and execution, and whether this call created it."""

    job_id: str
    status: JobStatus
    execution_arn: str | None
    created: bool
    reason: str | None = None
    errors: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "job_id": self.job_id,
            "status": self.status.value,
            "execution_arn": self.execution_arn,
            "created": self.created,
        }
        if self.reason:
            data["reason"] = self.reason
        if self.errors:
            data["errors"] = self.errors
        return data


def submit_job(
    spec_source: bytes | str | dict[str, Any],
    *,
    job_id: str,
    settings: SubmissionSettings,
    store: JobStore,
    sfn_client: Any,
    ec2_client: Any,
    reject_invalid: bool = False,
    source: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> Submission:
    """Submit ``spec_source`` as job ``job_id``.

    Order: an existing record wins (a repeat only makes sure its execution was
    started); else validate the spec, including against EC2 (subnets exist, every
    instance type is offered in a subnet's zone); write the SUBMITTED record; start
    the execution; store its ARN. The record comes first so that the state machine
    never runs for a job without one.

    An invalid spec raises :class:`SpecError` (the API answers 400), or with
    ``reject_invalid`` is recorded as a REJECTED job with the reason and no execution
    (S3 has nobody to answer to).
    """
    existing = _existing(store, job_id)
    if existing is not None:
        return _resume(existing, settings=settings, store=store, sfn_client=sfn_client)

    try:
        spec = parse_spec(spec_source, defaults=settings.defaults, now=now)
        check = check_against_ec2(
            spec,
            ec2_client=ec2_client,
            default_instance_types=spec.instance_types == list(settings.defaults.instance_types),
        )
        problems = check.problems + check_s3_locations(spec, settings)
        if problems:
            raise SpecError(problems)
    except SpecError as exc:
        if not reject_invalid:
            raise
        return _reject(job_id, spec_source, exc, store=store, source=source)

    spec_record = spec.to_record()
    # Only pools that exist reach the record (and so request_capacity).
    spec_record["instance_types"] = check.usable_instance_types
    checkpoint = spec_record["checkpoint"]
    if checkpoint["s3_mirror"] and checkpoint["s3_uri"] is None and settings.jobs_bucket:
        # Resolved now so the record says exactly where the mirror lives.
        checkpoint["s3_uri"] = f"s3://{settings.jobs_bucket}/checkpoints/{job_id}/"
    record = JobRecord(
        job_id=job_id,
        status=JobStatus.SUBMITTED,
        spec=spec_record,
        source=dict(source) if source else None,
    )
    if not store.create(record):
        # Another delivery of the same submission won the race; defer to it.
        return _resume(store.get(job_id), settings=settings, store=store, sfn_client=sfn_client)
    execution_arn = _start_execution(record, settings=settings, sfn_client=sfn_client)
    store.update(job_id, set={"execution_arn": execution_arn})
    return Submission(job_id, JobStatus.SUBMITTED, execution_arn, created=True)


def check_s3_locations(spec: JobSpec, settings: SubmissionSettings) -> list[dict[str, str]]:
    """S3 locations the trainer's role cannot reach, by field.

    The trainer reads a dataset from ``datasets/`` in the jobs bucket or from the
    deployment's dataset bucket, and writes its checkpoint mirror under
    ``checkpoints/`` in the jobs bucket; anything else would fail on the instance,
    after capacity was paid for.
    """
    if settings.jobs_bucket is None:
        return []  # no deployment to check against (a library caller)
    problems = []
    if spec.dataset is not None and spec.dataset.s3_uri is not None:
        uri = spec.dataset.s3_uri
        readable = [f"s3://{settings.jobs_bucket}/datasets/"]
        if settings.dataset_bucket:
            readable.append(f"s3://{settings.dataset_bucket}/")
        if not any(uri.startswith(prefix) for prefix in readable):
            problems.append(
                {
                    "field": "dataset.s3_uri",
                    "reason": f"the trainer can read datasets only under {' or '.join(readable)}"
                    " (the stack's DatasetBucket parameter adds a bucket)",
                }
            )
    if spec.checkpoint.s3_uri is not None:
        prefix = f"s3://{settings.jobs_bucket}/checkpoints/"
        if not spec.checkpoint.s3_uri.startswith(prefix):
            problems.append(
                {
                    "field": "checkpoint.s3_uri",
                    "reason": f"the checkpoint mirror must be under {prefix} (the trainer "
                    "may write nowhere else); leave it out for the job's own prefix there",
                }
            )
    return problems


@dataclass(frozen=True)
class Ec2Check:
    """What EC2 says about a spec: problems by field, and the instance types it offers."""

    problems: list[dict[str, str]]
    usable_instance_types: list[str]


def check_against_ec2(
    spec: JobSpec, *, ec2_client: Any, default_instance_types: bool = False
) -> Ec2Check:
    """Problems the model cannot see: unknown subnets, instance types not offered in the
    subnets' zones, a missing or too large dataset snapshot.

    Instance types the user named must all be offered. The deployment's defaults
    (``default_instance_types``) are a menu for every region the stack may run in,
    so the ones not offered are dropped, and only an empty result is a problem.
    """
    problems: list[dict[str, str]] = []
    subnets = ec2_client.describe_subnets(
        Filters=[{"Name": "subnet-id", "Values": list(spec.subnets)}]
    )["Subnets"]
    zone_of = {subnet["SubnetId"]: subnet["AvailabilityZone"] for subnet in subnets}
    for index, subnet_id in enumerate(spec.subnets):
        if subnet_id not in zone_of:
            problems.append({"field": f"subnets[{index}]", "reason": f"no subnet {subnet_id}"})
    zones = sorted(set(zone_of.values()))

    offered_anywhere = _offered(ec2_client, spec.instance_types, "region", None)
    offered_in_zones = (
        _offered(ec2_client, spec.instance_types, "availability-zone", zones)
        if zones
        else offered_anywhere
    )
    usable = [t for t in spec.instance_types if t in offered_in_zones]
    if default_instance_types:
        if not usable:
            problems.append(
                {
                    "field": "instance_types",
                    "reason": "not given, and none of the deployment's defaults "
                    f"({', '.join(spec.instance_types)}) is offered in the subnets' zones",
                }
            )
    else:
        for index, instance_type in enumerate(spec.instance_types):
            if instance_type not in offered_anywhere:
                reason = f"{instance_type} does not exist or is not offered in this region"
            elif instance_type not in offered_in_zones:
                reason = (
                    f"{instance_type} is not offered in the subnets' zones ({', '.join(zones)})"
                )
            else:
                continue
            problems.append({"field": f"instance_types[{index}]", "reason": reason})
    if spec.dataset is not None and spec.dataset.snapshot_id is not None:
        problems.extend(
            _check_snapshot(ec2_client, spec.dataset.snapshot_id, spec.dataset.volume_size_gib)
        )
    return Ec2Check(problems, usable)


def _check_snapshot(
    ec2_client: Any, snapshot_id: str, volume_size_gib: int | None
) -> list[dict[str, str]]:
    """The dataset snapshot must exist (ours or shared with us) and fit the volume."""
    try:
        (snapshot,) = ec2_client.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "InvalidSnapshot.NotFound":
            raise
        return [{"field": "dataset.snapshot_id", "reason": f"no snapshot {snapshot_id} visible"}]
    if volume_size_gib is not None and volume_size_gib < snapshot.get("VolumeSize", 0):
        reason = f"smaller than the snapshot ({snapshot['VolumeSize']} GiB)"
        return [{"field": "dataset.volume_size_gib", "reason": reason}]
    return []


def _offered(
    ec2_client: Any, instance_types: list[str], location_type: str, zones: list[str] | None
) -> set[str]:
    filters = [{"Name": "instance-type", "Values": list(instance_types)}]
    if zones:
        filters.append({"Name": "location", "Values": zones})
    paginator = ec2_client.get_paginator("describe_instance_type_offerings")
    offered: set[str] = set()
    for page in paginator.paginate(LocationType=location_type, Filters=filters):
        offered.update(offer["InstanceType"] for offer in page["InstanceTypeOfferings"])
    return offered


def execution_arn_for(state_machine_arn: str, job_id: str) -> str:
    """The ARN Step Functions gives the execution named ``job_id``."""
    return state_machine_arn.replace(":stateMachine:", ":execution:", 1) + f":{job_id}"


def _existing(store: JobStore, job_id: str) -> JobRecord | None:
    try:
        return store.get(job_id)
    except JobNotFoundError:
        return None


def _resume(
    record: JobRecord, *, settings: SubmissionSettings, store: JobStore, sfn_client: Any
) -> Submission:
    """A repeat submission: report the job as it is, starting its execution if a crash
    between writing the record and starting the execution left it unstarted."""
    execution_arn = record.execution_arn
    if record.status is JobStatus.SUBMITTED and execution_arn is None:
        execution_arn = _start_execution(record, settings=settings, sfn_client=sfn_client)
        record = store.update(record.job_id, set={"execution_arn": execution_arn})
    return Submission(
        record.job_id, record.status, execution_arn, created=False, reason=record.reason
    )


def _start_execution(record: JobRecord, *, settings: SubmissionSettings, sfn_client: Any) -> str:
    execution_input = {
        "job_id": record.job_id,
        "heartbeat_timeout_seconds": record.spec["heartbeat_timeout_seconds"],
    }
    try:
        response = sfn_client.start_execution(
            stateMachineArn=settings.state_machine_arn,
            name=record.job_id,
            input=json.dumps(execution_input),
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ExecutionAlreadyExists":
            raise
        # Same name = same job: an earlier delivery already started it.
        return execution_arn_for(settings.state_machine_arn, record.job_id)
    return response["executionArn"]


def _reject(
    job_id: str,
    spec_source: bytes | str | dict[str, Any],
    error: SpecError,
    *,
    store: JobStore,
    source: Mapping[str, Any] | None,
) -> Submission:
    reason = f"invalid job spec: {error}"[:MAX_REASON_CHARS]
    record = JobRecord(
        job_id=job_id,
        status=JobStatus.REJECTED,
        spec=_kept_submission(spec_source),
        reason=reason,
        source=dict(source) if source else None,
    )
    if not store.create(record):
        existing = store.get(job_id)
        return Submission(
            job_id, existing.status, existing.execution_arn, created=False, reason=existing.reason
        )
    return Submission(
        job_id, JobStatus.REJECTED, None, created=True, reason=reason, errors=error.errors
    )


def _kept_submission(spec_source: bytes | str | dict[str, Any]) -> dict[str, Any]:
    """What was submitted, kept on a REJECTED record as text (any bytes store safely)."""
    if isinstance(spec_source, dict):
        text = json.dumps(spec_source, default=str)
    elif isinstance(spec_source, bytes):
        text = spec_source[:MAX_KEPT_SPEC_BYTES].decode("utf-8", errors="replace")
    else:
        text = spec_source
    return {"submitted": text[:MAX_KEPT_SPEC_BYTES]}


JOB_FILE_PREFIX = "jobs/"


def submit_job_object(
    *,
    bucket: str,
    key: str,
    etag: str | None,
    version_id: str | None,
    settings: SubmissionSettings,
    store: JobStore,
    s3_client: Any,
    sfn_client: Any,
    ec2_client: Any,
    now: datetime | None = None,
) -> Submission | None:
    """Submit the job file ``s3://bucket/key``; None when the key is not a job file.

    The job id follows from bucket, key and version (or ETag), so a redelivered
    event maps to the same job and starts nothing new, while uploading a changed
    file under the same key is a new job. A file too large, unreadable or invalid
    becomes a REJECTED record with the reason.
    """
    if not key.startswith(JOB_FILE_PREFIX) or not key.endswith(".json"):
        return None
    version = version_id or (etag or "").strip('"')
    job_id = derived_job_id("s3", bucket, key, version)
    source = {"kind": "s3", "bucket": bucket, "key": key, "etag": etag, "version_id": version_id}
    if _existing(store, job_id) is None:
        try:
            body = _read_job_file(s3_client, bucket=bucket, key=key, version_id=version_id)
        except SpecError as exc:
            return _reject(job_id, b"", exc, store=store, source=source)
    else:
        body = b"{}"  # a repeat: submit_job answers from the record without reading it
    return submit_job(
        body,
        job_id=job_id,
        settings=settings,
        store=store,
        sfn_client=sfn_client,
        ec2_client=ec2_client,
        reject_invalid=True,
        source=source,
        now=now,
    )


def _read_job_file(s3_client: Any, *, bucket: str, key: str, version_id: str | None) -> bytes:
    """The file's bytes; :class:`SpecError` when it is too large, empty or gone."""
    request: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version_id and version_id != "null":
        request["VersionId"] = version_id
    # One byte past the limit is enough to tell "too large" without reading it all.
    request["Range"] = f"bytes=0-{MAX_SPEC_BYTES}"
    try:
        response = s3_client.get_object(**request)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "InvalidRange":  # S3's answer for a range over an empty object
            raise SpecError([{"field": BODY, "reason": "the job file is empty"}]) from None
        if code in ("NoSuchKey", "NoSuchVersion", "404"):
            raise SpecError([{"field": BODY, "reason": f"the job file is gone ({code})"}]) from None
        raise
    body = response["Body"].read()
    if len(body) > MAX_SPEC_BYTES:
        total = str(response.get("ContentRange", "")).rpartition("/")[2] or "more than"
        raise SpecError(
            [{"field": BODY, "reason": f"spec is {total} bytes; the limit is {MAX_SPEC_BYTES}"}]
        )
    return body
