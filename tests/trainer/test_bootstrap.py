"""trainer/bootstrap.sh for real, in folder mode: moto as AWS, a fake IMDS, process runner."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest

BOOTSTRAP = Path(__file__).resolve().parents[2] / "trainer" / "bootstrap.sh"

# A trivial trainer: records what it was given, then reports success itself.
RECORDING_TRAINER = textwrap.dedent(
    """
    import json, os, pathlib
    from spotrun_trainer.events import emit
    from spotrun_trainer.reporter import ControlReporter
    from spotrun_trainer.ticket import load_ticket
    ticket = load_ticket(os.environ["SPOTRUN_TICKET"])
    data = pathlib.Path(ticket.dataset_dir)
    seen = {
        "ticket": os.environ["SPOTRUN_TICKET"],
        "checkpoint_dir": ticket.checkpoint.dir,
        "mount_points": [v.mount_point for v in ticket.volumes],
        "dataset": ticket.dataset_dir,
        "corpus": (data / "corpus.txt").read_text(),
        "extra_env": os.environ.get("FROM_TICKET"),
    }
    pathlib.Path(ticket.checkpoint.dir, "seen.json").write_text(json.dumps(seen))
    ControlReporter(ticket.task_token, region=ticket.region).succeed(
        1, ticket.model_uri, {"ok": True}, None
    )
    emit("report", outcome="Succeeded", checkpoint_step=None)
    """
)


class Instance:
    """One simulated instance: in moto with its attached volumes, their folders, its
    mount root and bootstrap env."""

    def __init__(self, tmp_path: Path, moto_server: str, imds: Any, env: dict[str, str]):
        self.bucket = f"jobs-{uuid.uuid4().hex[:10]}"
        self.s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_server)
        self.s3.create_bucket(Bucket=self.bucket)
        self.ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_server)
        image = self.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        imds.instance_id = self.instance_id = self.ec2.run_instances(
            ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro"
        )["Instances"][0]["InstanceId"]
        self.volume_root = tmp_path / "volumes"
        self.mount_root = tmp_path / "instance"
        self.checkpoint_volume = self.volume("/dev/sdf")
        self.data_volume = self.volume("/dev/sdg")
        (self.volume_root / self.data_volume / "corpus.txt").write_text("to be or not to be")
        self.env = {
            **env,
            "SPOTRUN_BUCKET": self.bucket,
            "SPOTRUN_IMDS_ENDPOINT": imds.url,
            "SPOTRUN_VOLUME_ROOT": str(self.volume_root),
            "SPOTRUN_MOUNT_ROOT": str(self.mount_root),
            "SPOTRUN_RUNNER": "process",
            "SPOTRUN_TICKET_TIMEOUT_SECONDS": "30",
            "SPOTRUN_TICKET_POLL_SECONDS": "0.2",
        }

    def volume(self, device: str | None) -> str:
        """A volume in moto with its folder, attached here at ``device`` (None: not)."""
        zone = self.ec2.describe_instances(InstanceIds=[self.instance_id])["Reservations"][0][
            "Instances"
        ][0]["Placement"]["AvailabilityZone"]
        volume_id = self.ec2.create_volume(AvailabilityZone=zone, Size=1)["VolumeId"]
        if device is not None:
            self.ec2.attach_volume(VolumeId=volume_id, InstanceId=self.instance_id, Device=device)
        (self.volume_root / volume_id).mkdir(parents=True)
        return volume_id

    def volumes(self, **overrides: str) -> list[dict[str, Any]]:
        ids = {"checkpoint": self.checkpoint_volume, "data": self.data_volume, **overrides}
        return _volumes(checkpoint=ids["checkpoint"], data=ids["data"])

    def put_ticket(self, instance_id: str, ticket: dict[str, Any], delay: float = 0.0) -> None:
        def put() -> None:
            self.s3.put_object(
                Bucket=self.bucket, Key=f"tickets/{instance_id}.json", Body=json.dumps(ticket)
            )

        if delay:
            threading.Timer(delay, put).start()
        else:
            put()

    def bootstrap(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(BOOTSTRAP)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )


def _volumes(checkpoint: str, data: str) -> list[dict[str, Any]]:
    return [
        {"role": "checkpoint", "volume_id": checkpoint, "device": "/dev/sdf",
         "mount_point": "/mnt/spotrun/checkpoint", "format_if_empty": True, "read_only": False},
        {"role": "data", "volume_id": data, "device": "/dev/sdg",
         "mount_point": "/mnt/spotrun/data", "format_if_empty": False, "read_only": True},
    ]  # fmt: skip


def _ticket(make_ticket, token: str, command: list[str], volumes: list[dict[str, Any]]) -> dict:
    ticket = make_ticket(
        task_token=token,
        checkpoint_dir="/mnt/spotrun/checkpoint",
        model_uri="s3://somewhere/models/j/model.pt",
        command=command,
        volumes=volumes,
        environment={"FROM_TICKET": "yes"},
    )
    ticket["dataset"] = {"mount_point": "/mnt/spotrun/data"}
    return ticket


@pytest.fixture
def instance(tmp_path, moto_server, fake_imds, trainer_env) -> Instance:
    return Instance(tmp_path, moto_server, fake_imds, trainer_env)


def test_bootstrap_links_volumes_rewrites_the_ticket_and_runs_the_trainer(
    instance, fake_imds, sfn_tasks, make_ticket
):
    # GIVEN a ticket that arrives a moment after the instance boots
    task = sfn_tasks.start()
    command = [sys.executable, "-c", RECORDING_TRAINER]
    instance.put_ticket(
        fake_imds.instance_id,
        _ticket(make_ticket, task.token, command, instance.volumes()),
        delay=1.0,
    )
    # WHEN the bootstrap runs
    result = instance.bootstrap()
    # THEN the trainer ran with prefixed mount points, linked volumes and the env
    assert result.returncode == 0, result.stderr
    root = str(instance.mount_root)
    seen = json.loads((instance.volume_root / instance.checkpoint_volume / "seen.json").read_text())
    assert seen["checkpoint_dir"] == f"{root}/mnt/spotrun/checkpoint"
    assert seen["mount_points"] == [f"{root}/mnt/spotrun/checkpoint", f"{root}/mnt/spotrun/data"]
    assert seen["dataset"] == f"{root}/mnt/spotrun/data"
    assert seen["corpus"] == "to be or not to be"
    assert seen["extra_env"] == "yes"
    assert Path(seen["ticket"]) == instance.mount_root / "var/lib/spotrun/ticket.json"
    assert task.result()["status"] == "SUCCEEDED"


def test_bootstrap_without_a_ticket_fails_and_has_nobody_to_report_to(instance):
    instance.env["SPOTRUN_TICKET_TIMEOUT_SECONDS"] = "1"
    result = instance.bootstrap()
    assert result.returncode != 0
    assert "no ticket" in result.stderr
    assert "nothing to report to" in result.stderr


def test_bootstrap_missing_volume_reports_trainer_failed(
    instance, fake_imds, sfn_tasks, make_ticket
):
    # GIVEN a ticket naming a data volume that is not attached
    task = sfn_tasks.start()
    volumes = instance.volumes(data="vol-0missing")
    instance.put_ticket(fake_imds.instance_id, _ticket(make_ticket, task.token, ["true"], volumes))
    # WHEN the bootstrap runs
    result = instance.bootstrap()
    # THEN it fails loudly and the task fails with Trainer.Failed naming the volume
    assert result.returncode != 0
    execution = task.result()
    assert execution["status"] == "FAILED"
    assert execution["error"] == "Trainer.Failed"
    cause = json.loads(execution["cause"])
    assert "vol-0missing" in cause["error"]


def test_bootstrap_volume_that_ec2_has_not_attached_here_reports_trainer_failed(
    instance, fake_imds, sfn_tasks, make_ticket
):
    # GIVEN a data volume whose folder exists but which EC2 never attached to this
    # instance (on AWS its device would not appear)
    task = sfn_tasks.start()
    loose = instance.volume(device=None)
    volumes = instance.volumes(data=loose)
    instance.put_ticket(fake_imds.instance_id, _ticket(make_ticket, task.token, ["true"], volumes))
    # WHEN the bootstrap runs
    result = instance.bootstrap()
    # THEN it refuses to use it, and the task fails with Trainer.Failed naming it
    assert result.returncode != 0
    execution = task.result()
    assert execution["error"] == "Trainer.Failed"
    assert f"{loose} is not attached" in json.loads(execution["cause"])["error"]


def test_bootstrap_trainer_that_dies_silently_is_reported_by_the_runner(
    instance, fake_imds, sfn_tasks, make_ticket
):
    # GIVEN a trainer command that crashes before it could report anything
    task = sfn_tasks.start()
    command = [sys.executable, "-c", "import sys; print('oops', file=sys.stderr); sys.exit(3)"]
    instance.put_ticket(
        fake_imds.instance_id, _ticket(make_ticket, task.token, command, instance.volumes())
    )
    # WHEN the bootstrap runs it
    result = instance.bootstrap()
    # THEN its status comes through and the runner reports Trainer.Failed for it
    assert result.returncode == 3
    execution = task.result()
    assert execution["error"] == "Trainer.Failed"
    cause = json.loads(execution["cause"])
    assert "status 3" in cause["error"] and "oops" in cause["error"]
