"""Instances as local processes that follow moto's EC2 records.

A reconcile loop watches moto's instances. A new one (pending/running) gets a
folder, its own IMDS endpoint, and a process: the launch template's user data,
run with bash, exactly as cloud-init would run it — which fetches
``trainer/bootstrap.sh`` from the bucket, waits for the ticket, "mounts" the
volume folders and runs the trainer (``SPOTRUN_RUNNER=process``). When moto's
record goes to shutting-down/terminated (the control plane's TerminateInstances,
or the end of a spot notice) the process group gets SIGTERM, then SIGKILL after
a grace period, as a shutdown would. Each transition is announced with the
"EC2 Instance State-change Notification" event, as EC2 does.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotrun_local.aws import ACCOUNT_ID, REGION, MotoServer
from spotrun_local.imds import IMDSServer, InstanceMetadata

log = logging.getLogger(__name__)

STATE_CHANGE = "EC2 Instance State-change Notification"
_ENDED = {"shutting-down", "terminated", "stopping", "stopped"}

TrainerListener = Callable[["LocalInstance", dict], None]


@dataclass(frozen=True)
class TrainerLine:
    """One JSON line the trainer printed, with the instance and the time it was read."""

    instance_id: str
    job_id: str | None
    attempt: str | None
    received: float
    event: Mapping[str, Any]


@dataclass
class LocalInstance:
    """One running instance: its folder, IMDS, and bootstrap process group."""

    instance_id: str
    instance_type: str
    availability_zone: str
    lifecycle: str
    tags: dict[str, str]
    folder: Path
    imds: IMDSServer
    process: subprocess.Popen | None = None
    launched: float = field(default_factory=time.time)
    ended: float | None = None
    killed_without_notice: bool = False
    lines: list[TrainerLine] = field(default_factory=list)

    @property
    def job_id(self) -> str | None:
        return self.tags.get("spotrun:job-id")

    @property
    def attempt(self) -> str | None:
        return self.tags.get("spotrun:attempt")

    @property
    def mount_root(self) -> Path:
        return self.folder / "root"

    def process_alive(self) -> bool:
        """Whether anything of the instance's process group still runs."""
        if self.process is None:
            return False
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return self._group_has_live_members()

    def _group_has_live_members(self) -> bool:
        # killpg(0) also succeeds for zombies; the leader is reaped by poll().
        self.process.poll()  # type: ignore[union-attr]
        pgid = self.process.pid  # type: ignore[union-attr]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False

    def signal(self, signum: int) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def shut_down(self, grace_seconds: float) -> None:
        """SIGTERM the whole group, then SIGKILL what is left after the grace period."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and self.process_alive():
            time.sleep(0.1)
        self.signal(signal.SIGKILL)
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("instance %s: process did not exit", self.instance_id)


@dataclass
class InstanceRunner:
    """Keeps one local process per moto instance, and tells EventBridge about transitions."""

    aws: MotoServer
    root: Path
    volume_root: Path
    put_event: Callable[[str, str, dict, list[str]], None]
    fallback_user_data: Callable[[], str | None] = lambda: None
    extra_environment: Mapping[str, str] = field(default_factory=dict)
    shutdown_grace_seconds: float = 3.0
    poll_seconds: float = 0.3
    instances: dict[str, LocalInstance] = field(default_factory=dict)
    listeners: list[TrainerListener] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> InstanceRunner:
        self.root.mkdir(parents=True, exist_ok=True)
        self._ec2 = self.aws.client("ec2")
        self._thread = threading.Thread(target=self._loop, daemon=True, name="instances")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reconciling and shut every instance process down (moto records stay)."""
        self._stop.set()
        self._thread.join(timeout=10)
        for instance in list(self.instances.values()):
            instance.shut_down(grace_seconds=1.0)
            instance.imds.stop()

    def get(self, instance_id: str) -> LocalInstance:
        return self.instances[instance_id]

    def of_job(self, job_id: str) -> list[LocalInstance]:
        return [instance for instance in self.instances.values() if instance.job_id == job_id]

    # -- reconcile ------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.reconcile()
            except Exception as error:  # keep following moto; a shutdown race is not fatal
                if not self._stop.is_set():
                    log.warning("instance reconcile failed: %s", error, exc_info=True)

    def reconcile(self) -> None:
        """One pass: start processes for new instances, stop those of ended ones."""
        with self._lock:
            for record in self._describe():
                instance_id, state = record["InstanceId"], record["State"]["Name"]
                known = self.instances.get(instance_id)
                if known is None and state in ("pending", "running"):
                    self._launch(record)
                elif known is not None and known.ended is None and state in _ENDED:
                    self._end(known, state)

    def _describe(self) -> list[dict]:
        records = []
        for page in self._ec2.get_paginator("describe_instances").paginate():
            for reservation in page["Reservations"]:
                records.extend(reservation["Instances"])
        return records

    def _emit_state(self, instance_id: str, state: str) -> None:
        arn = f"arn:aws:ec2:{REGION}:{ACCOUNT_ID}:instance/{instance_id}"
        self.put_event("aws.ec2", STATE_CHANGE, {"instance-id": instance_id, "state": state}, [arn])

    def _launch(self, record: dict) -> None:
        instance_id = record["InstanceId"]
        tags = {tag["Key"]: tag["Value"] for tag in record.get("Tags") or []}
        folder = self.root / instance_id
        (folder / "root").mkdir(parents=True, exist_ok=True)
        metadata = InstanceMetadata(
            instance_id=instance_id,
            instance_type=record["InstanceType"],
            availability_zone=record["Placement"]["AvailabilityZone"],
            region=REGION,
            ami_id=record.get("ImageId", "ami-local"),
            private_ip=record.get("PrivateIpAddress", "127.0.0.1"),
            lifecycle=record.get("InstanceLifecycle", "on-demand"),
        )
        instance = LocalInstance(
            instance_id=instance_id,
            instance_type=metadata.instance_type,
            availability_zone=metadata.availability_zone,
            lifecycle=metadata.lifecycle,
            tags=tags,
            folder=folder,
            imds=IMDSServer(metadata).start(),
        )
        self.instances[instance_id] = instance
        self._emit_state(instance_id, "pending")
        user_data = self._user_data(instance_id)
        if user_data is None:
            log.warning("instance %s has no user data: nothing runs on it", instance_id)
        else:
            script = folder / "user-data"
            script.write_text(user_data)
            console = open(folder / "console.log", "ab")  # noqa: SIM115 - closed by the reader
            instance.process = subprocess.Popen(
                ["bash", str(script)],
                cwd=folder,
                env=self._environment(instance),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one process group: a shutdown reaches every child
            )
            threading.Thread(
                target=self._follow, args=(instance, console), daemon=True, name=instance_id
            ).start()
        self._emit_state(instance_id, "running")
        log.info(
            "instance %s up (%s in %s, %s) for job %s",
            instance_id,
            instance.instance_type,
            instance.availability_zone,
            instance.lifecycle,
            instance.job_id,
        )

    def _user_data(self, instance_id: str) -> str | None:
        answer = self._ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        encoded = (answer.get("UserData") or {}).get("Value")
        if encoded:
            return base64.b64decode(encoded).decode()
        return self.fallback_user_data()

    def _environment(self, instance: LocalInstance) -> dict[str, str]:
        """The instance's "machine": IMDS, volume folders, mount root, local AWS, the trainer."""
        trainer_dir = Path(__file__).resolve().parent.parent / "trainer"
        venv_bin = str(Path(sys.executable).parent)
        environment = {
            "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/bin:/bin")]),
            "HOME": str(instance.folder),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(trainer_dir),  # the image has spotrun_trainer installed
            "SPOTRUN_IMDS_ENDPOINT": instance.imds.endpoint,
            "SPOTRUN_VOLUME_ROOT": str(self.volume_root),
            "SPOTRUN_MOUNT_ROOT": str(instance.mount_root),
            "SPOTRUN_RUNNER": "process",
            "SPOTRUN_PYTHON": sys.executable,
            **self.aws.process_environment(),
            **self.extra_environment,
        }
        return environment

    def _follow(self, instance: LocalInstance, console) -> None:
        assert instance.process is not None and instance.process.stdout is not None
        with console:
            for raw in instance.process.stdout:
                console.write(raw)
                console.flush()
                event = _trainer_event(raw)
                if event is None:
                    continue
                line = TrainerLine(
                    instance.instance_id, instance.job_id, instance.attempt, time.time(), event
                )
                instance.lines.append(line)
                for listener in list(self.listeners):
                    try:
                        listener(instance, event)
                    except Exception:  # a broken listener must not stop the console
                        log.exception("trainer listener failed")

    def _end(self, instance: LocalInstance, state: str) -> None:
        instance.ended = time.time()
        stopping = state in ("stopping", "stopped")
        self._emit_state(instance.instance_id, "stopping" if stopping else "shutting-down")
        # Shutting down takes a while; do it aside so the loop keeps following others.
        threading.Thread(
            target=self._finish, args=(instance, stopping), daemon=True, name="shutdown"
        ).start()

    def _finish(self, instance: LocalInstance, stopping: bool) -> None:
        instance.shut_down(self.shutdown_grace_seconds)
        instance.imds.stop()
        self._emit_state(instance.instance_id, "stopped" if stopping else "terminated")
        log.info("instance %s %s", instance.instance_id, "stopped" if stopping else "terminated")

    # -- chaos hooks ------------------------------------------------------------------

    def kill_without_notice(self, instance_id: str) -> None:
        """The machine dies: SIGKILL, and moto still says running (no event either)."""
        instance = self.instances[instance_id]
        instance.killed_without_notice = True
        instance.signal(signal.SIGKILL)


def _trainer_event(raw: bytes) -> dict | None:
    text = raw.decode(errors="replace").strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None
