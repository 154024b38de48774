"""The local cloud's machinery on a small template of its own (tests/e2e/mini): no spotrun code.

Fast (one cloud for the module, about 10 s in all), so not marked e2e: these run
with the unit tests and tell a broken local cloud apart from a broken control plane.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from spotrun_local.capacity import CapacityFault
from spotrun_local.cloud import CloudConfig, LocalCloud
from spotrun_local.imds import IMDSServer, InstanceMetadata
from spotrun_local.template import load_template

MINI = Path(__file__).parent / "mini"


def wait_until(predicate, timeout: float = 15.0, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"not true within {timeout} s")


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    config = CloudConfig(
        template=MINI / "template.yaml",
        bootstrap=MINI / "bootstrap.sh",
        root=tmp_path_factory.mktemp("cloud"),
        parameters={"RetryBase": "1"},
        notice_seconds=2.0,
        shutdown_grace_seconds=1.0,
    )
    with LocalCloud(config) as running:
        yield running


def launch(cloud: LocalCloud, **overrides) -> str:
    template_id = cloud.stack.physical_id("TrainerLaunchTemplate")
    subnets = cloud.stack.resolver.parameters["SubnetIds"]
    answer = cloud.ec2.create_fleet(
        Type="instant",
        TargetCapacitySpecification={"TotalTargetCapacity": 1, "DefaultTargetCapacityType": "spot"},
        SpotOptions={"AllocationStrategy": "price-capacity-optimized"},
        LaunchTemplateConfigs=[
            {
                "LaunchTemplateSpecification": {
                    "LaunchTemplateId": template_id,
                    "Version": "$Latest",
                },
                "Overrides": overrides.get("overrides")
                or [{"InstanceType": "m5.large", "SubnetId": subnet} for subnet in subnets[:3]],
            }
        ],
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "spotrun:managed", "Value": "true"},
                    {"Key": "spotrun:job-id", "Value": overrides.get("job_id", "j-test")},
                ],
            }
        ],
    )
    return answer


def test_template_load_understands_short_form_tags():
    # GIVEN the mini template with !Ref, !Sub, !GetAtt, !Join
    template = load_template(MINI / "template.yaml")
    # THEN they come out in long form
    env = template["Resources"]["EchoFunction"]["Properties"]["Environment"]["Variables"]
    assert env["OWN_LAUNCH_TEMPLATE"] == {"Ref": "TrainerLaunchTemplate"}
    assert env["OWN_SUBNETS"] == {"Fn::Join": [",", {"Ref": "SubnetIds"}]}


def test_deploy_creates_the_templates_resources_in_moto(cloud):
    # THEN bucket, table, launch template, rules and the state machine exist in moto
    assert cloud.s3.head_bucket(Bucket=cloud.bucket)
    table = cloud.stack.physical_id("JobsTable")
    assert cloud.aws.client("dynamodb").describe_table(TableName=table)["Table"]["TableName"]
    rules = {rule["Name"] for rule in cloud.aws.client("events").list_rules()["Rules"]}
    assert {rule.name for rule in cloud.stack.rules} <= rules
    assert len(cloud.stack.rules) == 4  # two function events, two AWS::Events::Rule
    machine = cloud.sfn.describe_state_machine(stateMachineArn=cloud.state_machine_arn)
    assert cloud.stack.functions["EchoFunction"].arn in machine["definition"]
    assert "${" not in machine["definition"]
    assert cloud.s3.get_object(Bucket=cloud.bucket, Key="spotrun/bootstrap.sh")["Body"].read()


def test_function_gets_exactly_the_templates_environment(cloud):
    spec = cloud.stack.functions["EchoFunction"]
    result = cloud.pool.invoke("EchoFunction", {}).json()
    assert result["env"] == {
        "GLOBAL_RETRY": "1",  # the parameter override reached the Globals
        "JOBS_TABLE": cloud.stack.physical_id("JobsTable"),
        "JOBS_BUCKET": cloud.bucket,
        "OWN_LAUNCH_TEMPLATE": cloud.stack.physical_id("TrainerLaunchTemplate"),
        "OWN_SUBNETS": ",".join(cloud.stack.resolver.parameters["SubnetIds"]),
    }
    assert result["pythonpath"] == f"{MINI / 'layer'}:{spec.code_dir}"


def test_function_stays_warm_between_calls(cloud):
    first = cloud.pool.invoke("EchoFunction", {}).json()
    second = cloud.pool.invoke("EchoFunction", {}).json()
    assert second["pid"] == first["pid"]
    assert second["count"] == first["count"] + 1


def test_state_machine_runs_handlers_and_catches_dotted_error_names(cloud):
    def run(name: str, payload: dict) -> dict:
        arn = cloud.sfn.start_execution(
            stateMachineArn=cloud.state_machine_arn, name=name, input=json.dumps(payload)
        )["executionArn"]
        return wait_until(
            lambda: (d := cloud.sfn.describe_execution(executionArn=arn))["status"] != "RUNNING"
            and d
        )

    ok = run("ok", {})
    assert ok["status"] == "SUCCEEDED"
    assert json.loads(ok["output"])["table"] == cloud.stack.physical_id("JobsTable")
    caught = run("caught", {"fail": True})
    assert json.loads(caught["output"])["caught"] == "Capacity.Unavailable"


def test_execution_end_is_delivered_to_the_rules(cloud):
    arn = cloud.sfn.start_execution(
        stateMachineArn=cloud.state_machine_arn, name="announce", input="{}"
    )["executionArn"]
    prefix = "seen/Step_Functions_Execution_Status_Change/"

    def announced():
        for item in cloud.s3.list_objects_v2(Bucket=cloud.bucket, Prefix=prefix).get(
            "Contents", []
        ):
            event = json.loads(
                cloud.s3.get_object(Bucket=cloud.bucket, Key=item["Key"])["Body"].read()
            )
            if event["detail"]["executionArn"] == arn:
                return event
        return None

    event = wait_until(announced)
    assert event["detail"]["status"] == "SUCCEEDED"


def test_s3_job_file_reaches_the_rules_function(cloud):
    cloud.submit_file({"name": "x"}, key="jobs/one.json")
    cloud.s3.put_object(Bucket=cloud.bucket, Key="other/two.json", Body=b"{}")

    def seen():
        listing = cloud.s3.list_objects_v2(Bucket=cloud.bucket, Prefix="seen/Object_Created/")
        return listing.get("Contents")

    items = wait_until(seen)
    time.sleep(1.0)  # give a wrongly matched second event the time to arrive
    items = seen()
    assert len(items) == 1
    event = json.loads(cloud.s3.get_object(Bucket=cloud.bucket, Key=items[0]["Key"])["Body"].read())
    assert event["detail"]["object"]["key"] == "jobs/one.json"


def test_schedule_rule_fires_a_scheduled_event(cloud):
    rule = next(rule for rule in cloud.stack.rules if rule.schedule)
    assert rule.schedule == "rate(1 hour)"
    before = len(cloud.router.deliveries)
    cloud.router.fire_schedule(rule.logical_id)
    assert cloud.router.deliveries[before].detail_type == "Scheduled Event"


def test_api_routes_proxy_events_with_iam_identity(cloud):
    response = cloud.client.request("GET", "/jobs/j-123")
    assert response.status == 200
    assert response.body["resource"] == "/jobs/{job_id}"
    assert response.body["pathParameters"] == {"job_id": "j-123"}
    assert response.body["caller"] == "AKIALOCALCLOUD000000"
    posted = cloud.client.request("POST", "/jobs", {"name": "a"})
    assert json.loads(posted.body["body"]) == {"name": "a"}
    assert posted.body["stage"] == "Prod"  # the implicit API's stage


def test_api_refuses_unsigned_calls_and_unknown_routes(cloud):
    unsigned = urllib.request.Request(cloud.api.url + "/jobs/j-1")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(unsigned, timeout=10)
    assert refused.value.code == 403
    assert cloud.client.request("PUT", "/nothing").status == 403


def test_imds_requires_a_token_and_shows_the_notice():
    imds = IMDSServer(InstanceMetadata("i-1", "m5.large", "us-east-1b", "us-east-1")).start()
    try:
        base = imds.endpoint + "/latest/"
        with pytest.raises(urllib.error.HTTPError) as no_token:
            urllib.request.urlopen(base + "meta-data/instance-id", timeout=5)
        assert no_token.value.code == 401
        put = urllib.request.Request(
            base + "api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
        )
        token = urllib.request.urlopen(put, timeout=5).read().decode()

        def get(path: str):
            request = urllib.request.Request(
                base + path, headers={"X-aws-ec2-metadata-token": token}
            )
            try:
                return urllib.request.urlopen(request, timeout=5).read().decode()
            except urllib.error.HTTPError as error:
                return error.code

        assert get("meta-data/placement/availability-zone") == "us-east-1b"
        assert get("meta-data/spot/instance-action") == 404
        imds.notify_interruption(time.time() + 120)
        assert json.loads(get("meta-data/spot/instance-action"))["action"] == "terminate"
        imds.notify_rebalance()
        assert "noticeTime" in json.loads(get("meta-data/events/recommendations/rebalance"))
    finally:
        imds.stop()


def test_volume_folders_follow_create_snapshot_and_delete(cloud, tmp_path):
    (tmp_path / "data.txt").write_text("v1")
    snapshot = cloud.create_dataset_snapshot(tmp_path)
    volume = cloud.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1, SnapshotId=snapshot)
    folder = cloud.volumes.volume_dir(volume["VolumeId"])
    assert (folder / "data.txt").read_text() == "v1"
    # the snapshot is a copy at the moment of the call: later writes do not reach it
    (folder / "data.txt").write_text("v2")
    second = cloud.ec2.create_snapshot(VolumeId=volume["VolumeId"])["SnapshotId"]
    (folder / "data.txt").write_text("v3")
    assert (cloud.volumes.snapshot_dir(snapshot) / "data.txt").read_text() == "v1"
    assert (cloud.volumes.snapshot_dir(second) / "data.txt").read_text() == "v2"
    cloud.ec2.delete_volume(VolumeId=volume["VolumeId"])
    cloud.ec2.delete_snapshot(SnapshotId=second)
    assert not folder.exists()
    assert not cloud.volumes.snapshot_dir(second).exists()


def test_capacity_errors_skip_the_refused_pools(cloud):
    subnets = cloud.stack.resolver.parameters["SubnetIds"]
    zone = cloud.ec2.describe_subnets(SubnetIds=[subnets[0]])["Subnets"][0]["AvailabilityZone"]
    cloud.inject_capacity_errors(CapacityFault(availability_zone=zone, market="spot", times=1))
    answer = launch(cloud, job_id="j-capacity")
    assert [error["ErrorCode"] for error in answer["Errors"]] == ["InsufficientInstanceCapacity"]
    instance_id = answer["Instances"][0]["InstanceIds"][0]
    described = cloud.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
    assert described["Instances"][0]["Placement"]["AvailabilityZone"] != zone
    cloud.ec2.terminate_instances(InstanceIds=[instance_id])
    assert not any(cloud.wait_no_leaks("j-capacity").values())


def test_capacity_errors_everywhere_launch_nothing_and_run_instances_raises(cloud):
    cloud.inject_capacity_errors(CapacityFault(instance_type="m5.large", times=4))
    answer = launch(cloud, job_id="j-none")
    assert answer["Instances"] == []
    assert len(answer["Errors"]) == 3
    with pytest.raises(cloud.ec2.exceptions.ClientError) as refused:
        cloud.ec2.run_instances(
            ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="m5.large"
        )
    assert refused.value.response["Error"]["Code"] == "InsufficientInstanceCapacity"
    assert refused.value.response["ResponseMetadata"]["RequestId"]


def saw(instance, kind: str):
    """The first line of ``kind`` the instance printed, or None."""
    return next((line for line in instance.lines if line.event["event"] == kind), None)


def state_of(cloud, instance_id: str) -> str:
    reservation = cloud.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
    return reservation["Instances"][0]["State"]["Name"]


def seen_events(cloud, detail_type: str, instance_id: str) -> list[dict]:
    """Events of ``detail_type`` about ``instance_id`` that the echo function received."""
    prefix = f"seen/{detail_type.replace(' ', '_')}/"
    found = []
    for item in cloud.s3.list_objects_v2(Bucket=cloud.bucket, Prefix=prefix).get("Contents", []):
        event = json.loads(cloud.s3.get_object(Bucket=cloud.bucket, Key=item["Key"])["Body"].read())
        if event["detail"]["instance-id"] == instance_id:
            found.append(event)
    return found


def test_instance_runs_user_data_and_gets_interrupted_like_aws(cloud):
    # GIVEN an instance launched from the template's launch template
    answer = launch(cloud, job_id="j-spot")
    instance_id = answer["Instances"][0]["InstanceIds"][0]
    instance = wait_until(lambda: cloud.runner.instances.get(instance_id))
    # THEN its process ran the user data stub → the bootstrap from the bucket → IMDS
    assert wait_until(lambda: saw(instance, "start")).event["instance"] == instance_id
    wait_until(lambda: saw(instance, "step"))
    # WHEN chaos interrupts it
    cloud.chaos.deliver("interrupt", instance)
    # THEN the instance sees the IMDS notice, and after the notice period it is terminated
    wait_until(lambda: saw(instance, "notice"))
    wait_until(lambda: state_of(cloud, instance_id) == "terminated", timeout=10)
    assert not any(cloud.wait_no_leaks("j-spot").values())
    # and the rules got the warning and the state changes
    wait_until(lambda: seen_events(cloud, "EC2 Spot Instance Interruption Warning", instance_id))
    changes = wait_until(
        lambda: {
            event["detail"]["state"]
            for event in seen_events(cloud, "EC2 Instance State-change Notification", instance_id)
        }
        >= {"pending", "running", "shutting-down", "terminated"}
    )
    assert changes


def test_kill_without_notice_leaves_moto_running(cloud):
    answer = launch(cloud, job_id="j-kill")
    instance_id = answer["Instances"][0]["InstanceIds"][0]
    instance = wait_until(lambda: cloud.runner.instances.get(instance_id))
    wait_until(lambda: saw(instance, "step"))
    cloud.chaos.deliver("kill", instance)
    wait_until(lambda: not instance.process_alive(), timeout=5)
    time.sleep(0.5)
    assert state_of(cloud, instance_id) == "running"
    cloud.ec2.terminate_instances(InstanceIds=[instance_id])
    assert not any(cloud.wait_no_leaks("j-kill").values())
