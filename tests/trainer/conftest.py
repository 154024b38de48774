"""Shared fixtures of the trainer tests: fake IMDS, moto server, Step Functions tasks."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from spotrun_local.stepfunctions import TaskFailureCauseFix

REPO = Path(__file__).resolve().parents[2]
TRAINER_DIR = REPO / "trainer"
REGION = "us-east-1"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- fake IMDS ------------------------------------------------------------------------


@dataclass
class FakeIMDS:
    """IMDSv2 as docs/contracts.md describes it, with knobs for the tests."""

    instance_id: str = "i-0123456789abcdef0"
    instance_action: dict[str, Any] | None = None
    rebalance: dict[str, Any] | None = None
    tokens: dict[str, float] = field(default_factory=dict)
    token_puts: int = 0
    unauthorized: int = 0
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expire_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    def notify_interruption(self) -> None:
        self.instance_action = {"action": "terminate", "time": "2026-12-04T10:00:00Z"}

    def recommend_rebalance(self) -> None:
        self.rebalance = {"noticeTime": "2026-12-04T09:58:00Z"}


def _imds_handler(imds: FakeIMDS) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: str = "") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            if self.path != "/latest/api/token" or not ttl or not ttl.isdigit():
                self._send(400)
                return
            token = uuid.uuid4().hex
            with imds.lock:
                imds.tokens[token] = time.monotonic() + int(ttl)
                imds.token_puts += 1
            self._send(200, token)

        def do_GET(self) -> None:
            token = self.headers.get("X-aws-ec2-metadata-token", "")
            with imds.lock:
                valid = imds.tokens.get(token, 0) > time.monotonic()
                if not valid:
                    imds.unauthorized += 1
            if not valid:
                self._send(401)
                return
            path = self.path.removeprefix("/latest/")
            if path == "meta-data/instance-id":
                self._send(200, imds.instance_id)
            elif path == "meta-data/instance-type":
                self._send(200, "g5.xlarge")
            elif path == "meta-data/placement/availability-zone":
                self._send(200, "us-east-1a")
            elif path == "meta-data/spot/instance-action" and imds.instance_action:
                self._send(200, json.dumps(imds.instance_action))
            elif path == "meta-data/events/recommendations/rebalance" and imds.rebalance:
                self._send(200, json.dumps(imds.rebalance))
            else:
                self._send(404)

    return Handler


@pytest.fixture
def fake_imds() -> Iterator[FakeIMDS]:
    imds = FakeIMDS()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _imds_handler(imds))
    server.daemon_threads = True
    imds.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield imds
    server.shutdown()
    server.server_close()


# -- moto server and Step Functions tasks ---------------------------------------------


def _configure_moto(url: str) -> None:
    config = {"stepfunctions": {"execute_state_machine": True}, "lambda": {"use_docker": False}}
    request = urllib.request.Request(
        f"{url}/moto-api/config",
        data=json.dumps(config).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).read()


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """A moto server on loopback that runs ASL (so task tokens are real).

    Per module, not per session: its threads must not outlive the modules that use
    it, because other tests fork (a fork copies locks held by other threads).
    """
    from moto.server import ThreadedMotoServer

    # moto drops SendTaskFailure's cause, which carries the contract's checkpoint step.
    cause_fix = TaskFailureCauseFix().install()
    # The server logs every request, and the ASL interpreter every failed task at ERROR.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("moto.stepfunctions").setLevel(logging.CRITICAL)
    saved = {k: os.environ.get(k) for k in [*FAKE_CREDENTIALS, "MOTO_PORT"]}
    port = free_port()
    os.environ.update(FAKE_CREDENTIALS)
    # moto's ASL interpreter calls SQS etc. through this port (FINDINGS.md).
    os.environ["MOTO_PORT"] = str(port)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    _configure_moto(url)
    yield url
    server.stop()
    cause_fix.uninstall()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def aws_client(service: str, endpoint: str) -> Any:
    import boto3

    return boto3.client(service, region_name=REGION, endpoint_url=endpoint)


@dataclass
class Task:
    """One running ``.waitForTaskToken`` task and its execution."""

    token: str
    execution_arn: str
    sfn: Any

    def result(self, timeout: float = 20.0) -> dict[str, Any]:
        """describe_execution once the execution has left RUNNING."""
        give_up = time.monotonic() + timeout
        while True:
            description = self.sfn.describe_execution(executionArn=self.execution_arn)
            if description["status"] != "RUNNING" or time.monotonic() > give_up:
                return description
            time.sleep(0.05)


class TaskFactory:
    """Starts executions of a one-state machine that parks on a task token in SQS."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sfn = aws_client("stepfunctions", endpoint)
        self.sqs = aws_client("sqs", endpoint)
        self._machines: dict[int | None, str] = {}
        self._queue_url = self.sqs.create_queue(QueueName=f"tokens-{uuid.uuid4().hex[:8]}")[
            "QueueUrl"
        ]
        iam = aws_client("iam", endpoint)
        self._role = iam.create_role(
            RoleName=f"sfn-{uuid.uuid4().hex[:8]}", AssumeRolePolicyDocument="{}"
        )["Role"]["Arn"]

    def _machine(self, heartbeat_seconds: int | None) -> str:
        if heartbeat_seconds not in self._machines:
            state: dict[str, Any] = {
                "Type": "Task",
                "Resource": "arn:aws:states:::sqs:sendMessage.waitForTaskToken",
                "Parameters": {
                    "QueueUrl": self._queue_url,
                    "MessageBody": {"token.$": "$$.Task.Token"},
                },
                "End": True,
            }
            if heartbeat_seconds:
                state["HeartbeatSeconds"] = heartbeat_seconds
            definition = {"StartAt": "Run Trainer", "States": {"Run Trainer": state}}
            self._machines[heartbeat_seconds] = self.sfn.create_state_machine(
                name=f"trainer-{uuid.uuid4().hex[:8]}",
                definition=json.dumps(definition),
                roleArn=self._role,
            )["stateMachineArn"]
        return self._machines[heartbeat_seconds]

    def start(self, heartbeat_seconds: int | None = None) -> Task:
        execution = self.sfn.start_execution(
            stateMachineArn=self._machine(heartbeat_seconds), name=f"run-{uuid.uuid4().hex}"
        )["executionArn"]
        give_up = time.monotonic() + 20
        while time.monotonic() < give_up:
            messages = self.sqs.receive_message(
                QueueUrl=self._queue_url, MaxNumberOfMessages=1, WaitTimeSeconds=1
            ).get("Messages", [])
            for message in messages:
                self.sqs.delete_message(
                    QueueUrl=self._queue_url, ReceiptHandle=message["ReceiptHandle"]
                )
                return Task(json.loads(message["Body"])["token"], execution, self.sfn)
        raise AssertionError("the state machine never sent its task token")


@pytest.fixture
def sfn_tasks(moto_server: str) -> TaskFactory:
    # Per test, config included: the server shares moto's in-process backends, which
    # any ``mock_aws`` in another test resets (and with them the config).
    _configure_moto(moto_server)
    return TaskFactory(moto_server)


# -- running trainer code in a new process --------------------------------------------


@pytest.fixture
def trainer_env(moto_server: str) -> dict[str, str]:
    """Environment for a subprocess that runs spotrun_trainer against the moto server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPOTRUN_", "AWS_"))}
    env.update(FAKE_CREDENTIALS)
    env["AWS_ENDPOINT_URL"] = moto_server
    env["PYTHONPATH"] = str(TRAINER_DIR)
    env["PYTHONUNBUFFERED"] = "1"
    env["SPOTRUN_PYTHON"] = sys.executable
    # Never the real link-local IMDS address; tests with a fake IMDS override this.
    env["SPOTRUN_IMDS_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    return env


def ticket_document(
    *,
    task_token: str,
    checkpoint_dir: str,
    model_uri: str,
    command: list[str] | None = None,
    attempt: int = 1,
    resume: bool = False,
    interval: Any = "auto",
    s3_uri: str | None = None,
    environment: dict[str, str] | None = None,
    volumes: list[dict[str, Any]] | None = None,
    heartbeat_seconds: float = 60,
    notice_poll_seconds: float = 0.05,
) -> dict[str, Any]:
    """A ticket as ``start_trainer`` writes it (docs/contracts.md)."""
    return {
        "ticket_version": 1,
        "job_id": "j-20261204-test01",
        "attempt": attempt,
        "instance_id": "i-0123456789abcdef0",
        "region": REGION,
        "task_token": task_token,
        "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/spotrun-trainer:latest",
        "command": command or [sys.executable, "-m", "spotrun_trainer.examples.tiny_lm"],
        "environment": environment or {},
        "volumes": volumes or [],
        "dataset": None,
        "resume": {"enabled": resume, "checkpoint_step": None},
        "checkpoint": {
            "dir": checkpoint_dir,
            "s3_uri": s3_uri,
            "interval": interval,
            "keep": 3,
            "expected_interruption_seconds": 3600,
        },
        "output": {"model_uri": model_uri},
        "heartbeat_seconds": heartbeat_seconds,
        "notice_poll_seconds": notice_poll_seconds,
    }


@pytest.fixture
def make_ticket():
    """Returns ticket_document, so tests need not import conftest."""
    return ticket_document


# -- checkpoint store (fixtures prefixed ckpt_) ----------------------------------------


def _ckpt_same(expected: Any, actual: Any, path: str = "") -> None:
    """Assert two nested states are equal, tensors bit for bit (dtype and shape too)."""
    import math

    import numpy as np
    import torch

    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        e = expected.detach().contiguous().reshape(-1).view(torch.uint8)
        a = actual.detach().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(e, a), f"tensor {path} differs"
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray) and actual.dtype == expected.dtype, path
        assert actual.tobytes() == expected.tobytes(), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), path
        for key in expected:
            _ckpt_same(expected[key], actual[key], f"{path}/{key}")
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            _ckpt_same(e, a, f"{path}/{i}")
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual), path
    else:
        assert type(actual) is type(expected) and actual == expected, path


@pytest.fixture
def ckpt_assert_same():
    """Returns a function asserting two nested states are bitwise equal."""
    return _ckpt_same


def _ckpt_training_state(seed: int = 0, *, width: int = 64) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Embedding(50, width),
        torch.nn.Linear(width, 4 * width),
        torch.nn.GELU(),
        torch.nn.Linear(4 * width, width),
        torch.nn.LayerNorm(width),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        tokens = torch.randint(0, 50, (4, 8), generator=generator)
        model(tokens).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": (3, (1, 2, 3), None)},
        "data": {"epoch": 1, "index": 40, "loss": 3.25},
    }


@pytest.fixture
def ckpt_make_state():
    """Returns a factory of small, real training states (model, AdamW, RNG, data)."""
    return _ckpt_training_state


@pytest.fixture
def ckpt_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, str]]:
    """An S3 client on moto (in-process) and a fresh bucket name."""
    import boto3
    from moto import mock_aws

    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name=REGION)
        client.create_bucket(Bucket="ckpt-bucket")
        yield client, "ckpt-bucket"
