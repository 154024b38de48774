"""The local cloud: moto as AWS, the template deployed on it, and the runners moto lacks.

Order of start (and the reverse at stop): the moto server; the folder and
capacity wrappers on its EC2 backend; the deployment from ``template.yaml``;
the function pool and its Lambda hook; the event router; the instance runner;
chaos; the execution watcher; the REST API. ``stop()`` leaves no process behind:
every worker and instance runs in its own process group and is killed as one.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotrun_local.api import RestApiServer
from spotrun_local.aws import MotoServer, ec2_backend
from spotrun_local.capacity import CapacityFault, CapacityInjector
from spotrun_local.chaos import Chaos
from spotrun_local.client import ApiClient, ApiResponse
from spotrun_local.deploy import Stack, deploy
from spotrun_local.events import EventRouter
from spotrun_local.executions import ExecutionWatcher
from spotrun_local.instances import InstanceRunner
from spotrun_local.lambdas import FunctionPool
from spotrun_local.stepfunctions import StopExecutionFix, TaskFailureCauseFix
from spotrun_local.volumes import VolumeFolders

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "REJECTED"}
_MANAGED_FILTER = [{"Name": "tag:spotrun:managed", "Values": ["true"]}]
# Parameter values of a local deployment (applied when the template declares them):
# short backoffs so a demo minute shows what takes an hour on AWS, and an image
# name that nothing pulls (instances run the trainer as a process).
LOCAL_PARAMETERS = {
    "CapacityRetryBaseSeconds": "1",
    "HeartbeatTimeoutSeconds": "30",
    "TrainerImageUri": "spotrun-trainer:local",
}


@dataclass
class CloudConfig:
    """How to run the local cloud: the template, time scales, and overrides."""

    template: Path = REPO / "template.yaml"
    bootstrap: Path = REPO / "trainer" / "bootstrap.sh"
    root: Path | None = None  # a temporary folder when None (removed at stop)
    stack_name: str = "spotrun"
    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(LOCAL_PARAMETERS))
    notice_seconds: float = 120.0
    shutdown_grace_seconds: float = 3.0
    schedule_scale: float = 1.0
    # Added to every instance's environment. The bootstrap polls S3 for its ticket
    # every 2 s by default; on loopback a shorter poll makes relaunches snappier.
    instance_environment: Mapping[str, str] = field(
        default_factory=lambda: {"SPOTRUN_TICKET_POLL_SECONDS": "0.5"}
    )
    api_port: int = 0
    keep_root: bool = False

    def trainer_environment(self) -> dict[str, str]:
        """``instance_environment``, plus an IMDS poll scaled with the notice period and
        a step line for every step.

        On AWS the trainer polls every 2 s against a 120 s notice; a demo's 6 s notice
        polled every 2 s would spend a third of the notice unseen, and a job may finish
        before it notices. Keep the same proportion (bounded to 0.25-2 s). The local
        cloud follows training through the step lines: chaos fires at a step, and
        steps lost and recovery are measured from them, so it needs every one (the
        trainer logs every 10th by default). ``instance_environment`` wins over both.
        """
        poll = min(2.0, max(0.25, self.notice_seconds / 60.0))
        return {
            "SPOTRUN_NOTICE_POLL_SECONDS": f"{poll:g}",
            "SPOTRUN_LOG_EVERY": "1",
            **self.instance_environment,
        }


class LocalCloud:
    """Everything of spotrun on this machine; a context manager."""

    def __init__(self, config: CloudConfig | None = None) -> None:
        self.config = config or CloudConfig()
        self._stoppers: list[Callable[[], None]] = []
        self.started = False

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> LocalCloud:
        config = self.config
        self._own_root = config.root is None
        self.root = Path(config.root or tempfile.mkdtemp(prefix="spotrun-local-"))
        self.root.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            self._start(config)
        except BaseException:
            self.stop()
            raise
        self.started = True
        return self

    def _start(self, config: CloudConfig) -> None:
        self.aws = MotoServer().start()
        self._stoppers.append(self.aws.stop)
        backend = ec2_backend()
        self.volumes = VolumeFolders(self.root).install(backend)
        self._stoppers.append(self.volumes.uninstall)
        self.capacity = CapacityInjector().install(backend)
        self._stoppers.append(self.capacity.uninstall)
        self._stop_fix = StopExecutionFix().install()
        self._stoppers.append(self._stop_fix.uninstall)
        self._cause_fix = TaskFailureCauseFix().install()
        self._stoppers.append(self._cause_fix.uninstall)
        bootstrap = config.bootstrap if config.bootstrap.exists() else None
        if bootstrap is None:
            log.warning("%s is missing: instances will find no bootstrap", config.bootstrap)
        self.stack: Stack = deploy(
            config.template,
            self.aws,
            parameters=self._declared(config.parameters),
            stack_name=config.stack_name,
            bootstrap_path=bootstrap,
        )
        self.pool = FunctionPool(
            self.stack.functions, self.aws.process_environment(), self.root / "logs" / "lambda"
        )
        self._stoppers.append(self.pool.close)
        self.pool.install_invoke_hook()
        self._stoppers.append(self.pool.remove_invoke_hook)
        self.router = EventRouter(
            self.stack, self.aws, self.pool, schedule_scale=config.schedule_scale
        ).start()
        self._stoppers.append(self.router.stop)
        self.runner = InstanceRunner(
            self.aws,
            self.root / "instances",
            self.volumes.volume_root,
            self.router.put_event,
            fallback_user_data=self._launch_template_user_data,
            extra_environment=config.trainer_environment(),
            shutdown_grace_seconds=config.shutdown_grace_seconds,
        ).start()
        self._stoppers.append(self.runner.stop)
        self.chaos = Chaos(
            self.aws, self.runner, self.router.put_event, notice_seconds=config.notice_seconds
        ).start()
        self._stoppers.append(self.chaos.stop)
        self.executions = ExecutionWatcher(
            self.aws, self.stack.state_machines.values(), self.router.put_event
        ).start()
        self._stoppers.append(self.executions.stop)
        api_ids = {route.api: str(self.stack.physical_id(route.api)) for route in self.stack.routes}
        self.api = RestApiServer(self.stack.routes, self.pool, api_ids, config.api_port).start()
        self._stoppers.append(self.api.stop)
        self.client = ApiClient(self.api.url)
        self.s3 = self.aws.client("s3")
        self.ec2 = self.aws.client("ec2")
        self.sfn = self.aws.client("stepfunctions")
        self._stoppers.append(self._abort_executions)

    def _abort_executions(self) -> None:
        """Stop what still runs in moto's interpreter before the rest goes away.

        Its threads live in this process: left running, a Wait or Retry of this
        cloud's execution would wake up later and call the next cloud's functions.
        """
        for machine in self.stack.state_machines.values():
            running = self.sfn.list_executions(stateMachineArn=machine, statusFilter="RUNNING")
            for execution in running["executions"]:
                self.sfn.stop_execution(
                    executionArn=execution["executionArn"], cause="the local cloud is stopping"
                )

    def stop(self) -> None:
        """Stop everything, in reverse order; safe to call twice."""
        while self._stoppers:
            stopper = self._stoppers.pop()
            try:
                stopper()
            except Exception:  # keep stopping the rest: no orphan may survive one failure
                log.exception("stopping %s failed", getattr(stopper, "__qualname__", stopper))
        atexit.unregister(self.stop)
        if getattr(self, "_own_root", False) and not self.config.keep_root:
            shutil.rmtree(self.root, ignore_errors=True)
        self.started = False

    def __enter__(self) -> LocalCloud:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    # -- what users and tests do ------------------------------------------------------

    @property
    def bucket(self) -> str:
        return self.stack.bucket

    @property
    def state_machine_arn(self) -> str:
        return next(iter(self.stack.state_machines.values()))

    def submit(self, spec: Any) -> ApiResponse:
        """``POST /jobs`` through the local API."""
        return self.client.submit(spec)

    def submit_file(self, spec: Any, key: str | None = None) -> str:
        """Submit by dropping a job file under ``jobs/`` in the bucket; returns the key."""
        key = key or f"jobs/{int(time.time() * 1000)}.json"
        body = spec if isinstance(spec, bytes) else json.dumps(spec).encode()
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)
        return key

    def job(self, job_id: str) -> dict[str, Any]:
        """The job as ``GET /jobs/{job_id}`` shows it."""
        response = self.client.job(job_id)
        if response.status != 200:
            raise LookupError(f"GET /jobs/{job_id}: {response.status} {response.body}")
        return response.body

    def wait_for_job(self, job_id: str, timeout: float = 300.0, poll: float = 0.5) -> dict:
        """Poll the job until its status is terminal (or raise TimeoutError)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.get("status") in TERMINAL:
                return job
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {self.job(job_id)}")

    def inject_capacity_errors(self, *faults: CapacityFault) -> None:
        for fault in faults:
            self.capacity.add(fault)

    def create_dataset_snapshot(self, folder: Path, availability_zone: str | None = None) -> str:
        """An EBS snapshot holding ``folder``'s files, for a job's ``dataset.snapshot_id``."""
        zone = availability_zone or f"{self.aws.session().region_name}a"
        volume = self.ec2.create_volume(AvailabilityZone=zone, Size=1)["VolumeId"]
        from spotrun_local.volumes import copy_tree

        copy_tree(Path(folder), self.volumes.volume_dir(volume))
        snapshot = self.ec2.create_snapshot(VolumeId=volume, Description="dataset")["SnapshotId"]
        self.ec2.delete_volume(VolumeId=volume)
        return snapshot

    def download_model(self, job_id: str, destination: Path) -> Path:
        """Fetch the model a succeeded job's record points to (its ``model_uri``)."""
        uri = self.job(job_id).get("model_uri")
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise RuntimeError(f"job {job_id} has no model in S3 (model_uri {uri!r})")
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        self.s3.download_file(bucket, key, str(destination))
        return destination

    def leaks(self, job_id: str | None = None) -> dict[str, list[str]]:
        """What of a job (or of any job) is still there: instances, volumes, processes."""
        filters = list(_MANAGED_FILTER)
        if job_id is not None:
            filters.append({"Name": "tag:spotrun:job-id", "Values": [job_id]})
        instances = [
            instance["InstanceId"]
            for reservation in self.ec2.describe_instances(Filters=filters)["Reservations"]
            for instance in reservation["Instances"]
            if instance["State"]["Name"] not in ("terminated", "shutting-down")
        ]
        volumes = [
            volume["VolumeId"] for volume in self.ec2.describe_volumes(Filters=filters)["Volumes"]
        ]
        processes = [
            instance.instance_id
            for instance in self.runner.instances.values()
            if (job_id is None or instance.job_id == job_id) and instance.process_alive()
        ]
        return {"instances": instances, "volumes": volumes, "processes": processes}

    def wait_no_leaks(self, job_id: str | None, timeout: float = 30.0) -> dict[str, list[str]]:
        """Wait for a job's instances to be gone and their processes to end; the last look."""
        deadline = time.monotonic() + timeout
        leaks = self.leaks(job_id)
        while any(leaks.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
            leaks = self.leaks(job_id)
        return leaks

    def describe(self) -> dict[str, Any]:
        """What a user needs to talk to this cloud."""
        return {
            "api_url": self.api.url,
            "endpoint_url": self.aws.endpoint,
            "bucket": self.bucket,
            "state_machine_arn": self.state_machine_arn,
            "functions": sorted(self.stack.functions),
            "rules": [rule.name for rule in self.stack.rules],
            "root": str(self.root),
            "outputs": self.stack.outputs,
        }

    # -- helpers -------------------------------------------------------------------------

    def _declared(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        from spotrun_local.template import load_template

        declared = load_template(self.config.template).get("Parameters") or {}
        return {name: value for name, value in parameters.items() if name in declared}

    def _launch_template_user_data(self) -> str | None:
        import base64

        for logical_id in self.stack.resources_of_type("AWS::EC2::LaunchTemplate"):
            versions = self.ec2.describe_launch_template_versions(
                LaunchTemplateId=self.stack.physical_id(logical_id)
            )["LaunchTemplateVersions"]
            data = versions[0]["LaunchTemplateData"].get("UserData") if versions else None
            if data:
                return base64.b64decode(data).decode()
        return None
