"""Shared fixtures for the control-plane tests: moto-backed AWS, the jobs table, loaders."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
from moto import mock_aws

from spotrun import aws
from spotrun.jobs import JobStore

REPO = Path(__file__).resolve().parents[2]
FUNCTIONS = REPO / "functions"
EVENTS = REPO / "events"

REGION = "us-east-1"
ACCOUNT_ID = "123456789012"
TABLE_NAME = "spotrun-jobs-test"
BUCKET_NAME = "spotrun-jobs-test"
TOPIC_NAME = "spotrun-outcomes-test"
STATE_MACHINE_NAME = "spotrun-training-job-test"
TRAINER_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/spotrun-trainer:test"
DEFAULT_INSTANCE_TYPES = "g5.xlarge,g6.xlarge"

# A placeholder definition: these tests start executions, they do not run them
# (the state-machine tests run the real ASL with their own fixtures).
TRIVIAL_DEFINITION = json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}})


def load_handler(name: str) -> ModuleType:
    """Import ``functions/<name>/app.py`` by path, freshly, as its own module.

    Fresh each call, so module-scope state (cached clients, environment read at
    import) never leaks between tests. Registered in ``sys.modules`` under a
    unique name because dataclasses and pydantic resolve annotations through it.
    """
    path = FUNCTIONS / name / "app.py"
    module_name = f"spotrun_function_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None, f"no handler at {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_event(function: str, case: str) -> dict[str, Any]:
    """The sample event ``events/<function>/<case>.json``."""
    return json.loads((EVENTS / function / f"{case}.json").read_text())


class FakeLambdaContext:
    """Enough of the Lambda context object for powertools."""

    function_name = "spotrun-test-function"
    function_version = "$LATEST"
    invoked_function_arn = f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:spotrun-test-function"
    memory_limit_in_mb = 256
    aws_request_id = "00000000-0000-0000-0000-000000000000"
    log_group_name = "/aws/lambda/spotrun-test-function"
    log_stream_name = "2026/12/04/[$LATEST]0000"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


@functools.cache
def _test_session() -> boto3.session.Session:
    # One session for the test run: it caches parsed service models, so a test's
    # clients cost milliseconds instead of a second (moto intercepts every session).
    return boto3.session.Session()


@pytest.fixture
def lambda_context() -> FakeLambdaContext:
    return FakeLambdaContext()


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and region, so nothing can reach a real account."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture
def mocked_aws(aws_credentials: None) -> Iterator[None]:
    """moto for every service; the cached clients of ``spotrun.aws`` are dropped
    before and after, so no client outlives its mock."""
    aws.reset()
    with mock_aws():
        yield
    aws.reset()


@pytest.fixture
def dynamodb(mocked_aws: None) -> Any:
    return _test_session().client("dynamodb", region_name=REGION)


@pytest.fixture
def ec2(mocked_aws: None) -> Any:
    return _test_session().client("ec2", region_name=REGION)


@pytest.fixture
def sfn(mocked_aws: None) -> Any:
    return _test_session().client("stepfunctions", region_name=REGION)


@pytest.fixture
def s3(mocked_aws: None) -> Any:
    return _test_session().client("s3", region_name=REGION)


@pytest.fixture
def jobs_table(dynamodb: Any) -> str:
    """The jobs table as the template defines it: key ``job_id``, on demand."""
    dynamodb.create_table(
        TableName=TABLE_NAME,
        KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "job_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return TABLE_NAME


@pytest.fixture
def store(jobs_table: str, dynamodb: Any) -> JobStore:
    return JobStore(jobs_table, dynamodb_client=dynamodb)


@pytest.fixture
def jobs_bucket(s3: Any) -> str:
    s3.create_bucket(Bucket=BUCKET_NAME)
    return BUCKET_NAME


@pytest.fixture
def state_machine(sfn: Any) -> str:
    """A trivial state machine to start executions on; returns its ARN."""
    response = sfn.create_state_machine(
        name=STATE_MACHINE_NAME,
        definition=TRIVIAL_DEFINITION,
        roleArn=f"arn:aws:iam::{ACCOUNT_ID}:role/spotrun-state-machine",
    )
    return response["stateMachineArn"]


@pytest.fixture
def subnets(ec2: Any) -> list[str]:
    """Two subnets in two zones of one VPC."""
    vpc_id = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    return [
        ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=zone)["Subnet"]["SubnetId"]
        for cidr, zone in (("10.20.1.0/24", "us-east-1a"), ("10.20.2.0/24", "us-east-1b"))
    ]


@pytest.fixture
def control_env(
    monkeypatch: pytest.MonkeyPatch,
    jobs_table: str,
    jobs_bucket: str,
    state_machine: str,
    subnets: list[str],
) -> dict[str, str]:
    """The environment the template gives the functions, pointing at the moto resources."""
    env = {
        "JOBS_TABLE": jobs_table,
        "JOBS_BUCKET": jobs_bucket,
        "STATE_MACHINE_ARN": state_machine,
        "TOPIC_ARN": f"arn:aws:sns:{REGION}:{ACCOUNT_ID}:{TOPIC_NAME}",
        "LAUNCH_TEMPLATE_ID": "lt-0123456789abcdef0",
        "SUBNET_IDS": ",".join(subnets),
        "DEFAULT_INSTANCE_TYPES": DEFAULT_INSTANCE_TYPES,
        "TRAINER_IMAGE_URI": TRAINER_IMAGE,
        "HEARTBEAT_TIMEOUT_SECONDS": "300",
        "CAPACITY_RETRY_BASE_SECONDS": "0",
        "POWERTOOLS_SERVICE_NAME": "spotrun-test",
        "POWERTOOLS_METRICS_NAMESPACE": "SpotrunTest",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_DEV": "false",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


# -- execution side (state machine tasks and event functions) -----------------


@pytest.fixture
def execution_env(
    control_env: dict[str, str], ec2: Any, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """control_env plus a real launch template and outcomes topic in moto."""
    template_id = ec2.create_launch_template(
        LaunchTemplateName="spotrun-trainer",
        LaunchTemplateData={
            "ImageId": "ami-03cf127a",  # one of moto's preloaded AMIs
            "MetadataOptions": {"HttpTokens": "required"},
        },
    )["LaunchTemplate"]["LaunchTemplateId"]
    topic_arn = boto3.client("sns", region_name=REGION).create_topic(Name=TOPIC_NAME)["TopicArn"]
    monkeypatch.setenv("LAUNCH_TEMPLATE_ID", template_id)
    monkeypatch.setenv("TOPIC_ARN", topic_arn)
    return {**control_env, "LAUNCH_TEMPLATE_ID": template_id, "TOPIC_ARN": topic_arn}


@pytest.fixture(scope="session")
def shared_service_models() -> Iterator[None]:
    """Parse each botocore data file once per test session instead of once per client.

    Every new boto3 session (``spotrun.aws`` makes one per client, and each test
    resets them) re-reads and re-parses the service models, the EC2 one alone
    megabytes of JSON; on these machines that is most of a function test's time.
    The parsed data is read-only to botocore, and one loader already shares it
    between its clients, so sharing it between loaders changes nothing else.
    """
    from botocore import loaders

    original = loaders.Loader.load_data_with_path
    cache: dict[tuple[str, tuple[str, ...]], Any] = {}

    def load_once(self: loaders.Loader, name: str) -> Any:
        key = (name, tuple(self.search_paths))
        if key not in cache:
            cache[key] = original(self, name)
        return cache[key]

    loaders.Loader.load_data_with_path = load_once
    yield
    loaders.Loader.load_data_with_path = original
