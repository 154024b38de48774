"""template.yaml: both linters clean (offline), and the contracts of docs/contracts.md kept."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from spotrun_local.template import Resolver, function_environment, load_template

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
TEMPLATE = load_template(REPO / "template.yaml")
RESOURCES: dict[str, Any] = TEMPLATE["Resources"]

FUNCTIONS = {
    "jobs_api": "JobsApiFunction",
    "submit_job_file": "SubmitJobFileFunction",
    "request_capacity": "RequestCapacityFunction",
    "prepare_volumes": "PrepareVolumesFunction",
    "start_trainer": "StartTrainerFunction",
    "preserve_checkpoint": "PreserveCheckpointFunction",
    "release_attempt": "ReleaseAttemptFunction",
    "finalize_job": "FinalizeJobFunction",
    "handle_spot_notice": "HandleSpotNoticeFunction",
    "handle_instance_state": "HandleInstanceStateFunction",
    "handle_execution_ended": "HandleExecutionEndedFunction",
    "sweep_orphans": "SweepOrphansFunction",
}
GLOBAL_ENV = {
    "JOBS_TABLE",
    "JOBS_BUCKET",
    "DATASET_BUCKET",
    "TOPIC_ARN",
    "LAUNCH_TEMPLATE_ID",
    "SUBNET_IDS",
    "DEFAULT_INSTANCE_TYPES",
    "TRAINER_IMAGE_URI",
    "HEARTBEAT_TIMEOUT_SECONDS",
    "CAPACITY_RETRY_BASE_SECONDS",
    "POWERTOOLS_SERVICE_NAME",
    "POWERTOOLS_METRICS_NAMESPACE",
    "POWERTOOLS_LOG_LEVEL",
}


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SAM_CLI_TELEMETRY="0",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
    )
    return env


@pytest.mark.slow
def test_template_sam_validate_lint_is_clean() -> None:
    result = subprocess.run(
        [str(BIN / "sam"), "validate", "--lint", "--template-file", "template.yaml"],
        cwd=REPO,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is a valid SAM Template" in result.stdout + result.stderr


@pytest.mark.slow
def test_template_cfn_lint_is_clean() -> None:
    result = subprocess.run(
        [str(BIN / "cfn-lint"), "template.yaml"],
        cwd=REPO,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_template_functions_match_their_folders() -> None:
    declared = {
        logical_id: resource["Properties"]["CodeUri"]
        for logical_id, resource in RESOURCES.items()
        if resource["Type"] == "AWS::Serverless::Function"
    }
    assert declared == {logical_id: f"functions/{f}/" for f, logical_id in FUNCTIONS.items()}


def test_template_globals_runtime_layer_and_environment() -> None:
    function = TEMPLATE["Globals"]["Function"]
    assert function["Runtime"] == "python3.11"
    assert function["Architectures"] == ["arm64"]
    assert function["Tracing"] == "Active"
    assert function["Layers"] == [{"Ref": "SpotrunLayer"}]
    assert set(function["Environment"]["Variables"]) == GLOBAL_ENV
    layer = RESOURCES["SpotrunLayer"]
    assert layer["Properties"]["ContentUri"] == "layers/spotrun"
    assert layer["Metadata"]["BuildMethod"] == "python3.11"


def test_template_state_machine_arn_only_where_no_cycle() -> None:
    # The state machine's substitutions name its task functions, so only the
    # others may get STATE_MACHINE_ARN.
    for folder in ("jobs_api", "submit_job_file", "handle_execution_ended"):
        env = RESOURCES[FUNCTIONS[folder]]["Properties"]["Environment"]["Variables"]
        assert env["STATE_MACHINE_ARN"] == {"Ref": "TrainingJobStateMachine"}


def test_template_function_environment_resolves() -> None:
    resolver = Resolver(
        TEMPLATE,
        physical_ids={
            "JobsTable": "jobs",
            "JobsBucket": "bucket",
            "OutcomesTopic": "arn:aws:sns:us-east-1:123456789012:outcomes",
            "TrainerLaunchTemplate": "lt-0123",
            "TrainingJobStateMachine": "arn:aws:states:us-east-1:123456789012:stateMachine:sm",
        },
        parameters={"Subnets": ["subnet-1", "subnet-2"], "TrainerImageUri": "image:1"},
    )
    env = function_environment(TEMPLATE, "JobsApiFunction", resolver)
    assert env["SUBNET_IDS"] == "subnet-1,subnet-2"
    assert env["DEFAULT_INSTANCE_TYPES"] == "g5.xlarge,g6.xlarge,g4dn.xlarge"
    assert env["CAPACITY_RETRY_BASE_SECONDS"] == "30"
    assert env["HEARTBEAT_TIMEOUT_SECONDS"] == "300"
    assert env["STATE_MACHINE_ARN"].endswith(":stateMachine:sm")


def test_template_launch_template_requires_imdsv2_and_runs_the_stub() -> None:
    data = RESOURCES["TrainerLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["InstanceMetadataTags"] == "enabled"
    assert all(m["Ebs"]["Encrypted"] for m in data["BlockDeviceMappings"])
    assert data["IamInstanceProfile"] == {"Arn": {"Fn::GetAtt": ["TrainerInstanceProfile", "Arn"]}}
    resolver = Resolver(TEMPLATE, physical_ids={"JobsBucket": "bucket"}, region="eu-west-1")
    import base64

    script = base64.b64decode(resolver.resolve(data["UserData"])).decode()
    assert script.splitlines() == [
        "#!/bin/bash",
        "export SPOTRUN_BUCKET=bucket AWS_DEFAULT_REGION=eu-west-1",
        'f=$(mktemp) && aws s3 cp "s3://$SPOTRUN_BUCKET/spotrun/bootstrap.sh" "$f" '
        '&& exec bash "$f"',
    ]


def test_template_parameters() -> None:
    parameters = TEMPLATE["Parameters"]
    assert parameters["Subnets"]["Type"] == "List<AWS::EC2::Subnet::Id>"
    assert parameters["TrainerAmiId"]["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"
    assert parameters["CapacityRetryBaseSeconds"]["Default"] == 30
    assert parameters["HeartbeatTimeoutSeconds"]["Default"] == 300
    assert TEMPLATE["Resources"]["OutcomesEmailSubscription"]["Condition"] == "HasNotificationEmail"


def _statements() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for logical_id, resource in RESOURCES.items():
        properties = resource.get("Properties", {})
        policies = properties.get("Policies", [])
        for policy in policies:
            document = policy.get("PolicyDocument", policy) if isinstance(policy, dict) else {}
            for statement in document.get("Statement", []):
                # a conditional statement (Fn::If): check every branch that is one
                branches = statement.get("Fn::If", [None])[1:] or [statement]
                found.extend(
                    (logical_id, branch)
                    for branch in branches
                    if isinstance(branch, dict) and "Effect" in branch
                )
    return found


def test_template_iam_least_privilege() -> None:
    statements = _statements()
    assert statements
    for owner, statement in statements:
        actions = (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
        assert "*" not in actions, owner
        if statement.get("Resource") == "*" and statement["Effect"] == "Allow":
            allowed = all(
                a.startswith(("ec2:Describe", "logs:")) or a == "ec2:GetSpotPlacementScores"
                for a in actions
            )
            assert allowed, f"{owner}: {actions} on *"
        mutations = {
            "ec2:TerminateInstances",
            "ec2:AttachVolume",
            "ec2:DetachVolume",
            "ec2:DeleteVolume",
            "ec2:DeleteSnapshot",
            "ec2:CreateSnapshot",
            "ec2:CancelSpotInstanceRequests",
        }
        if mutations & set(actions):
            condition = json.dumps(statement.get("Condition", {}))
            # an existing resource by its tag, a new one (a snapshot) by the tag it gets
            assert re.search(r"aws:(Resource|Request)Tag/spotrun:managed", condition), owner
        if "iam:PassRole" in actions:
            assert statement["Resource"] == {"Fn::GetAtt": ["TrainerRole", "Arn"]}


def test_template_event_rules() -> None:
    patterns = {}
    for logical_id, resource in RESOURCES.items():
        for event in resource.get("Properties", {}).get("Events", {}).values():
            if event["Type"] == "EventBridgeRule":
                pattern = event["Properties"]["Pattern"]
                for detail_type in pattern["detail-type"]:
                    patterns[detail_type] = (logical_id, pattern)
    assert patterns["EC2 Spot Instance Interruption Warning"][0] == "HandleSpotNoticeFunction"
    assert patterns["EC2 Instance Rebalance Recommendation"][0] == "HandleSpotNoticeFunction"
    assert patterns["EC2 Instance State-change Notification"][0] == "HandleInstanceStateFunction"
    owner, pattern = patterns["Step Functions Execution Status Change"]
    assert owner == "HandleExecutionEndedFunction"
    assert pattern["detail"]["stateMachineArn"] == [{"Ref": "TrainingJobStateMachine"}]
    owner, pattern = patterns["Object Created"]
    assert owner == "SubmitJobFileFunction"
    assert pattern["detail"]["object"]["key"] == [{"prefix": "jobs/"}]


def test_template_storage_is_private_and_durable() -> None:
    bucket = RESOURCES["JobsBucket"]["Properties"]
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert bucket["NotificationConfiguration"]["EventBridgeConfiguration"]["EventBridgeEnabled"]
    policy = RESOURCES["JobsBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"][0]
    assert policy["Effect"] == "Deny"
    assert policy["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    table = RESOURCES["JobsTable"]["Properties"]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"]
    assert table["KeySchema"] == [{"AttributeName": "job_id", "KeyType": "HASH"}]


def test_template_state_machine_logging_and_tracing() -> None:
    properties = RESOURCES["TrainingJobStateMachine"]["Properties"]
    assert properties["Type"] == "STANDARD"
    assert properties["Tracing"] == {"Enabled": True}
    assert properties["Logging"]["Level"] == "ALL"


def test_template_api_is_iam_authorized_and_validates() -> None:
    api = RESOURCES["JobsApi"]["Properties"]
    assert api["Auth"]["DefaultAuthorizer"] == "AWS_IAM"
    events = RESOURCES["JobsApiFunction"]["Properties"]["Events"]
    routes = {(e["Properties"]["Method"], e["Properties"]["Path"]) for e in events.values()}
    assert routes == {
        ("post", "/jobs"),
        ("get", "/jobs"),
        ("get", "/jobs/{job_id}"),
        ("delete", "/jobs/{job_id}"),
    }
    assert events["PostJob"]["Properties"]["RequestModel"]["ValidateBody"] is True
    # and a body the gateway refuses is answered with the reason, in the API's error shape
    refused = api["GatewayResponses"]["BAD_REQUEST_BODY"]
    assert refused["StatusCode"] == "400"
    body = refused["ResponseTemplates"]["application/json"]
    assert "$context.error.validationErrorString" in body
    assert json.loads(body.replace("$context.error.validationErrorString", "x"))["errors"]
