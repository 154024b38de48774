"""Runs the real training-job ASL on moto's interpreter with the real handlers in-process.

What it sets up (one :class:`Cloud` per test):

* moto with ``execute_state_machine`` on, the jobs table, bucket, topic (with an
  SQS subscriber to read notifications), a VPC with subnets, a launch template;
* the state machine from ``statemachine/training_job.asl.json``, substituted
  from ``template.yaml`` by ``spotrun_local.template`` with the physical ids above;
* a ``before-call.lambda.Invoke`` hook on ``boto3.DEFAULT_SESSION`` (registered
  after the mock starts, which resets that session) that dispatches each invoke
  by function name to ``functions/<folder>/app.py`` with the environment the
  template gives that function;
* :class:`FakeTrainer`, a thread that reads each ticket from S3 and answers
  through its task token as scripted (succeed, interrupt, fail, go silent, lose
  the instance).

Capacity errors are injected on the handlers' EC2 client (moto never raises
them, FINDINGS.md) with :meth:`Cloud.refuse_capacity`.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.response import StreamingBody
from moto import mock_aws

from spotrun import aws
from spotrun.jobs import JobRecord, JobStore, derived_job_id
from spotrun.spec import SpecDefaults, parse_spec
from spotrun.status import JobStatus
from spotrun_local.stepfunctions import TaskFailureCauseFix
from spotrun_local.template import (
    Resolver,
    function_environment,
    load_template,
    serverless_functions,
    state_machine_definition,
)
from tests.control.conftest import ACCOUNT_ID, REGION, FakeLambdaContext, load_handler

REPO = Path(__file__).resolve().parents[2]
STACK = "spotrun"
STATE_MACHINE_ID = "TrainingJobStateMachine"
MOTO_CONFIG = {"stepfunctions": {"execute_state_machine": True}, "lambda": {"use_docker": False}}


def function_name(logical_id: str) -> str:
    return f"{STACK}-{logical_id}"


def function_arn(logical_id: str) -> str:
    return f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{function_name(logical_id)}"


def _folder(code_uri: str) -> str:
    return Path(code_uri.rstrip("/")).name


@dataclass
class Invocation:
    function: str
    payload: dict[str, Any]
    error: str | None = None
    seconds: float = 0.0
    result: Any = None


@dataclass
class Cloud:
    """The moto-backed deployment one test runs against."""

    monkeypatch: pytest.MonkeyPatch
    template: dict[str, Any]
    resolver: Resolver
    subnets: list[str]
    state_machine_arn: str
    queue_url: str
    ec2: Any
    s3: Any
    sfn: Any
    sqs: Any
    store: JobStore
    bucket: str
    handlers: dict[str, tuple[Any, dict[str, str]]] = field(default_factory=dict)
    invocations: list[Invocation] = field(default_factory=list)
    published: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Tickets written by StartTrainerFunction, announced so the fake trainer need
    # not poll S3 (it still reads each ticket from S3, as the bootstrap does).
    ticket_listeners: list[queue.Queue] = field(default_factory=list)
    _environment_lock: threading.Lock = field(default_factory=threading.Lock)
    refused: set[tuple[str, str, str]] = field(default_factory=set)  # (market, subnet, type)

    def reset(self) -> None:
        """Forget what the previous test injected."""
        self.refused.clear()
        self.invocations.clear()

    # -- functions ------------------------------------------------------------

    def handler(self, logical_id: str) -> tuple[Any, dict[str, str]]:
        """The loaded module and template environment of one function (loaded once)."""
        if logical_id not in self.handlers:
            properties = serverless_functions(self.template)[logical_id]
            module = load_handler(_folder(properties["CodeUri"]))
            env = function_environment(self.template, logical_id, self.resolver)
            self.handlers[logical_id] = (module, env)
        return self.handlers[logical_id]

    def invoke(self, logical_id: str, event: dict[str, Any]) -> Any:
        """Call a handler as Lambda would: its environment applied, a fake context."""
        module, env = self.handler(logical_id)
        # Only what differs: the handlers run on moto's interpreter thread while
        # the fake trainer's boto3 calls read os.environ on another, and writing
        # it under their feet is a race. The functions share Globals, so after
        # the first invocation there is next to nothing to write.
        with self._environment_lock:
            for name, value in env.items():
                if os.environ.get(name) != value:
                    self.monkeypatch.setenv(name, value)
        return module.lambda_handler(event, FakeLambdaContext())

    def _on_invoke(self, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        path = urllib.parse.unquote(params["url_path"])
        name = re.search(r"/functions/(?P<name>[^/]+)/invocations", path)["name"]
        name = name.rsplit(":function:", 1)[-1].split(":")[0]
        logical_id = name.removeprefix(f"{STACK}-")
        body = params.get("body") or b"{}"
        payload = json.loads(body.decode() if isinstance(body, bytes) else body)
        invocation = Invocation(logical_id, payload)
        self.invocations.append(invocation)
        response: dict[str, Any] = {"StatusCode": 200, "ExecutedVersion": "$LATEST"}
        started = time.monotonic()
        try:
            result = self.invoke(logical_id, payload)
        except Exception as exc:  # what Lambda's runtime turns into an "Unhandled" error
            invocation.error = type(exc).__name__
            result = {"errorType": type(exc).__name__, "errorMessage": str(exc)}
            response["FunctionError"] = "Unhandled"
        invocation.seconds = time.monotonic() - started
        invocation.result = result
        if logical_id == "StartTrainerFunction" and invocation.error is None:
            for listener in list(self.ticket_listeners):
                listener.put(result["ticket_uri"])
        raw = json.dumps(result).encode()
        response["Payload"] = StreamingBody(_Bytes(raw), len(raw))
        return AWSResponse("https://lambda.local", 200, {}, None), response

    # -- capacity -------------------------------------------------------------

    def refuse_capacity(
        self, *, market: str = "spot", subnets: list[str] | None = None, types: list[str] | None
    ) -> None:
        """Make create_fleet report InsufficientInstanceCapacity for these pools."""
        for subnet in subnets or self.subnets:
            for instance_type in types or ["*"]:
                self.refused.add((market, subnet, instance_type))

    def _on_create_fleet_params(self, params: dict[str, Any], context: dict, **_: Any) -> None:
        """Before serialization: drop refused overrides, remember their errors."""
        market = params["TargetCapacitySpecification"]["DefaultTargetCapacityType"]
        config = params["LaunchTemplateConfigs"][0]
        open_overrides, errors = [], []
        for override in config["Overrides"]:
            pool = (market, override["SubnetId"])
            if (*pool, "*") in self.refused or (*pool, override["InstanceType"]) in self.refused:
                errors.append(
                    {
                        "LaunchTemplateAndOverrides": {
                            "LaunchTemplateSpecification": config["LaunchTemplateSpecification"],
                            "Overrides": override,
                        },
                        "Lifecycle": market,
                        "ErrorCode": "InsufficientInstanceCapacity",
                        "ErrorMessage": "There is no Spot capacity available that matches",
                    }
                )
            else:
                open_overrides.append(override)
        # A real fleet skips refused pools itself; moto always takes the first override.
        config["Overrides"] = open_overrides or config["Overrides"]
        context["spotrun_refusals"] = errors if not open_overrides else []

    def _on_create_fleet(self, context: dict, **_: Any) -> Any:
        """Instead of the call: the response of a fleet that found no capacity at all."""
        errors = context.get("spotrun_refusals")
        if not errors:
            return None  # let moto launch
        parsed = {
            "FleetId": "fleet-00000000-0000-0000-0000-000000000000",
            "Errors": errors,
            "Instances": [],
            "ResponseMetadata": {"RequestId": "injected", "HTTPStatusCode": 200},
        }
        return AWSResponse("https://ec2.local", 200, {}, None), parsed

    def install_capacity_hooks(self) -> None:
        """Hook the handlers' cached EC2 client (spotrun.aws) for refuse_capacity."""
        events = aws.client("ec2").meta.events
        events.register("before-parameter-build.ec2.CreateFleet", self._on_create_fleet_params)
        events.register("before-call.ec2.CreateFleet", self._on_create_fleet)

    # -- jobs -----------------------------------------------------------------

    def create_job(self, name: str = "tiny-lm", **spec_fields: Any) -> str:
        """A SUBMITTED record with a validated spec (deployment defaults from the template)."""
        env = self.handler("RequestCapacityFunction")[1]
        # The deployment's default subnets are the first two zones; the third is
        # for single-AZ jobs (spec_fields may name it).
        spec = parse_spec(
            {"name": name, **spec_fields}, defaults=SpecDefaults.from_env(env), now=_now()
        )
        job_id = derived_job_id("test", name, str(time.monotonic_ns()))
        self.store.create(
            JobRecord(job_id=job_id, status=JobStatus.SUBMITTED, spec=spec.to_record())
        )
        return job_id

    def start(self, job_id: str, *, heartbeat_timeout_seconds: int | None = None) -> str:
        record = self.store.get(job_id)
        heartbeat = heartbeat_timeout_seconds or record.spec["heartbeat_timeout_seconds"]
        arn = self.sfn.start_execution(
            stateMachineArn=self.state_machine_arn,
            name=job_id,
            input=json.dumps({"job_id": job_id, "heartbeat_timeout_seconds": heartbeat}),
        )["executionArn"]
        self.store.update(job_id, set={"execution_arn": arn})
        return arn

    def wait(self, execution_arn: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            execution = self.sfn.describe_execution(executionArn=execution_arn)
            if execution["status"] != "RUNNING":
                return execution
            time.sleep(0.1)
        raise AssertionError(f"{execution_arn} still running after {timeout}s")

    def history(self, execution_arn: str) -> list[dict[str, Any]]:
        return self.sfn.get_execution_history(executionArn=execution_arn, maxResults=1000)["events"]

    def entered_states(self, execution_arn: str) -> list[str]:
        return [
            event["stateEnteredEventDetails"]["name"]
            for event in self.history(execution_arn)
            if "stateEnteredEventDetails" in event
        ]

    def notifications(self, job_id: str) -> list[dict[str, Any]]:
        """Outcome messages published for ``job_id`` (read off the SQS subscriber)."""
        while True:
            messages = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10)
            if not messages.get("Messages"):
                break
            for message in messages["Messages"]:
                body = json.loads(json.loads(message["Body"])["Message"])
                self.published.setdefault(body["job_id"], []).append(body)
                self.sqs.delete_message(
                    QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"]
                )
        return self.published.get(job_id, [])

    def leftovers(self, job_id: str) -> dict[str, list[str]]:
        """Instances not terminated and volumes that still exist, of this job."""
        tag_filter = [{"Name": "tag:spotrun:job-id", "Values": [job_id]}]
        instances = [
            instance["InstanceId"]
            for reservation in self.ec2.describe_instances(Filters=tag_filter)["Reservations"]
            for instance in reservation["Instances"]
            if instance["State"]["Name"] not in ("terminated", "shutting-down")
        ]
        volumes = [v["VolumeId"] for v in self.ec2.describe_volumes(Filters=tag_filter)["Volumes"]]
        return {"instances": instances, "volumes": volumes}


class _Bytes:
    """A file-like object over bytes, enough for botocore's StreamingBody."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, amount: int | None = None) -> bytes:
        if amount is None:
            data, self._data = self._data, b""
        else:
            data, self._data = self._data[:amount], self._data[amount:]
        return data

    def close(self) -> None:
        return None


def _now() -> datetime:
    return datetime.now(UTC)


def _physical_ids(
    template: dict[str, Any], *, table: str, bucket: str, topic_arn: str, launch_template: str
) -> tuple[dict[str, str], dict[str, str]]:
    physical = {
        "JobsTable": table,
        "JobsBucket": bucket,
        "OutcomesTopic": topic_arn,
        "TrainerLaunchTemplate": launch_template,
        "SpotrunLayer": f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:layer:spotrun:1",
        STATE_MACHINE_ID: (
            f"arn:aws:states:{REGION}:{ACCOUNT_ID}:stateMachine:{STACK}-training-job"
        ),
    }
    attributes = {
        "JobsBucket.Arn": f"arn:aws:s3:::{bucket}",
        f"{STATE_MACHINE_ID}.Name": f"{STACK}-training-job",
        "OutcomesTopic.TopicName": topic_arn.rsplit(":", 1)[-1],
    }
    for logical_id in serverless_functions(template):
        physical[logical_id] = function_name(logical_id)
        attributes[f"{logical_id}.Arn"] = function_arn(logical_id)
    return physical, attributes


def start_cloud(monkeypatch: pytest.MonkeyPatch, *, zones: tuple[str, ...]) -> Cloud:
    """Create the deployment inside an already started mock (see :func:`cloud_fixture`)."""
    ec2 = boto3.client("ec2", region_name=REGION)
    s3 = boto3.client("s3", region_name=REGION)
    sfn = boto3.client("stepfunctions", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    sns = boto3.client("sns", region_name=REGION)
    dynamodb = boto3.client("dynamodb", region_name=REGION)

    table = "spotrun-jobs"
    dynamodb.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "job_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    bucket = "spotrun-jobs-bucket"
    s3.create_bucket(Bucket=bucket)
    topic_arn = sns.create_topic(Name="spotrun-outcomes")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="outcomes")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)

    vpc_id = ec2.create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc_id, CidrBlock=f"10.30.{index}.0/24", AvailabilityZone=zone)[
            "Subnet"
        ]["SubnetId"]
        for index, zone in enumerate(zones, start=1)
    ]
    # One of moto's preloaded AMIs; describe_images would serialize ~1,300 of them.
    image_id = "ami-03cf127a"

    template = load_template(REPO / "template.yaml")
    user_data = Resolver(template, physical_ids={"JobsBucket": bucket}).resolve(
        template["Resources"]["TrainerLaunchTemplate"]["Properties"]["LaunchTemplateData"][
            "UserData"
        ]
    )
    launch_template = ec2.create_launch_template(
        LaunchTemplateName="spotrun-trainer",
        LaunchTemplateData={
            "ImageId": image_id,
            "UserData": user_data,
            "MetadataOptions": {"HttpTokens": "required", "InstanceMetadataTags": "enabled"},
        },
    )["LaunchTemplate"]["LaunchTemplateId"]

    physical, attributes = _physical_ids(
        template, table=table, bucket=bucket, topic_arn=topic_arn, launch_template=launch_template
    )
    resolver = Resolver(
        template,
        physical_ids=physical,
        attributes=attributes,
        parameters={
            "Subnets": subnets[:2],  # the third zone is for single-AZ jobs
            "TrainerImageUri": f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com/spotrun-trainer:test",
            "DefaultInstanceTypes": "g5.xlarge,g6.xlarge",
            # Real backoff on AWS (30 s); zero here so the no-capacity paths take no time.
            "CapacityRetryBaseSeconds": "0",
        },
        region=REGION,
        account_id=ACCOUNT_ID,
        stack_name=STACK,
    )
    definition = state_machine_definition(template, STATE_MACHINE_ID, resolver, base_dir=REPO)
    state_machine_arn = sfn.create_state_machine(
        name=f"{STACK}-training-job",
        definition=definition,
        roleArn=f"arn:aws:iam::{ACCOUNT_ID}:role/spotrun-state-machine",
    )["stateMachineArn"]

    cloud = Cloud(
        monkeypatch=monkeypatch,
        template=template,
        resolver=resolver,
        subnets=subnets,
        state_machine_arn=state_machine_arn,
        queue_url=queue_url,
        ec2=ec2,
        s3=s3,
        sfn=sfn,
        sqs=sqs,
        store=JobStore(table, dynamodb_client=dynamodb),
        bucket=bucket,
    )
    for name, value in {
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
        "POWERTOOLS_METRICS_NAMESPACE": "SpotrunTest",
    }.items():
        monkeypatch.setenv(name, value)
    # Later setenv calls (each invoke) apply the template values; keep tracing off.
    for logical_id in serverless_functions(template):
        module_env = cloud.handler(logical_id)[1]
        module_env.pop("POWERTOOLS_LOG_LEVEL", None)
    boto3.DEFAULT_SESSION.events.register("before-call.lambda.Invoke", cloud._on_invoke)
    cloud.install_capacity_hooks()
    return cloud


FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}


def cloud_session() -> Iterator[Cloud]:
    """One deployment for a whole test module (generator for a module-scoped fixture).

    Building it costs seconds (service models, the ASL parse, handler imports);
    tests share it and stay apart by job id: every check is per job.
    """
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in FAKE_CREDENTIALS.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        cause_fix = TaskFailureCauseFix().install()
        aws.reset()
        try:
            with mock_aws(config=MOTO_CONFIG):
                # mock_aws resets boto3's default session; it must exist before the hook.
                boto3.setup_default_session(region_name=REGION)
                yield start_cloud(monkeypatch, zones=("us-east-1a", "us-east-1b", "us-east-1c"))
        finally:
            cause_fix.uninstall()
            aws.reset()


# -- the fake trainer ------------------------------------------------------


@dataclass
class Act:
    """What the fake trainer does on one attempt."""

    kind: str  # "succeed", "interrupt", "fail", "silent", "lose", "wait"
    step: int | None = None
    delay: float = 0.0
    message: str = ""


def succeed(step: int = 200) -> Act:
    return Act("succeed", step)


def interrupt(step: int | None) -> Act:
    return Act("interrupt", step)


def fail(message: str, step: int | None = None) -> Act:
    return Act("fail", step, message=message)


def silent() -> Act:
    return Act("silent")


def lose() -> Act:
    return Act("lose")


class FakeTrainer(threading.Thread):
    """Answers each attempt's ticket as scripted, through the ticket's task token."""

    def __init__(
        self, cloud: Cloud, job_id: str, acts: list[Act], *, on_ticket: Callable | None = None
    ):
        super().__init__(daemon=True)
        self.cloud = cloud
        self.job_id = job_id
        self.acts = list(acts)
        self.tickets: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self.on_ticket = on_ticket
        self._halt = threading.Event()
        self._tickets: queue.Queue[str] = queue.Queue()
        self.s3 = boto3.client("s3", region_name=REGION)
        self.sfn = boto3.client("stepfunctions", region_name=REGION)

    def start(self) -> None:
        self.cloud.ticket_listeners.append(self._tickets)
        super().start()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.cloud.ticket_listeners.remove(self._tickets)

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                try:
                    uri = self._tickets.get(timeout=0.05)
                except queue.Empty:
                    continue
                bucket, _, key = uri.removeprefix("s3://").partition("/")
                ticket = json.loads(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
                if ticket["job_id"] != self.job_id:
                    continue
                self.tickets.append(ticket)
                self._answer(ticket)
        except BaseException as exc:  # surfaced by the test through .errors
            self.errors.append(exc)

    def _answer(self, ticket: dict[str, Any]) -> None:
        if self.on_ticket:
            self.on_ticket(ticket)
        act = self.acts.pop(0) if self.acts else silent()
        time.sleep(act.delay)
        token = ticket["task_token"]
        if act.kind == "succeed":
            self.sfn.send_task_heartbeat(taskToken=token)
            self.sfn.send_task_success(
                taskToken=token,
                output=json.dumps(
                    {
                        "final_step": act.step,
                        "model_uri": ticket["output"]["model_uri"],
                        "metrics": {"loss": 1.25},
                        "checkpoint_step": act.step,
                    }
                ),
            )
        elif act.kind == "interrupt":
            self.sfn.send_task_failure(
                taskToken=token,
                error="Spot.Interrupted",
                cause=json.dumps(
                    {
                        "checkpoint_step": act.step,
                        "checkpoint_location": "volume",
                        "notice": "instance-action",
                        "time_to_safe_seconds": 0.4,
                    }
                ),
            )
        elif act.kind == "fail":
            self.sfn.send_task_failure(
                taskToken=token,
                error="Trainer.Failed",
                cause=json.dumps({"error": act.message, "checkpoint_step": act.step}),
            )
        elif act.kind == "lose":
            # The instance vanishes without a word; EventBridge would deliver the
            # state change to HandleInstanceStateFunction (moto does not route it).
            instance_id = ticket["instance_id"]
            self.cloud.ec2.terminate_instances(InstanceIds=[instance_id])
            self.cloud.invoke(
                "HandleInstanceStateFunction",
                instance_state_event(instance_id, "terminated"),
            )
        # "silent": say nothing; the heartbeat timeout fires.


def instance_state_event(instance_id: str, state: str) -> dict[str, Any]:
    """An "EC2 Instance State-change Notification" as EventBridge delivers it."""
    return {
        "version": "0",
        "id": "7bf73129-1428-4cd3-a780-95db273d1602",
        "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2",
        "account": ACCOUNT_ID,
        "time": _now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": REGION,
        "resources": [f"arn:aws:ec2:{REGION}:{ACCOUNT_ID}:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "state": state},
    }
