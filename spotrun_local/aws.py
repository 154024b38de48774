"""AWS on loopback: moto's threaded server in this process, and clients that talk to it."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from dataclasses import dataclass, field

import boto3
from botocore.config import Config

REGION = "us-east-1"
ACCOUNT_ID = "123456789012"  # moto's default account

# Fake, but well formed: botocore signs every request and moto ignores the signature.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIALOCALCLOUD000000",
    "AWS_SECRET_ACCESS_KEY": "local-cloud-secret",
    "AWS_SESSION_TOKEN": "local-cloud-session",
}

# Step Functions must execute for real; Lambda must not try Docker (we run handlers).
MOTO_CONFIG = {
    "stepfunctions": {"execute_state_machine": True},
    "lambda": {"use_docker": False},
}


@dataclass
class MotoServer:
    """moto's ``ThreadedMotoServer`` on 127.0.0.1, configured for spotrun.

    It must run in this process: the Lambda ``before-call`` hook and the
    volume/capacity wrappers act on moto's in-process backends.
    """

    port: int = 0
    _server: object | None = field(default=None, repr=False)
    _previous_port: str | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer

        # werkzeug logs every request at INFO: thousands of lines per job.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self._server = server
        self.port = server.get_host_and_port()[1]
        # moto's Step Functions interpreter builds its own clients for
        # http://localhost:$MOTO_PORT, so the port must be in this process's env.
        self._previous_port = os.environ.get("MOTO_PORT")
        os.environ["MOTO_PORT"] = str(self.port)
        self._post("/moto-api/reset", {})
        self._post("/moto-api/config", MOTO_CONFIG)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._post("/moto-api/reset", {})
            self._server.stop()  # type: ignore[attr-defined]
            self._server = None
            if self._previous_port is None:
                os.environ.pop("MOTO_PORT", None)
            else:
                os.environ["MOTO_PORT"] = self._previous_port

    def _post(self, path: str, body: dict) -> None:
        request = urllib.request.Request(
            self.endpoint + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def session(self) -> boto3.session.Session:
        """A boto3 session of its own, so the Lambda hook on the default session is not shared."""
        return boto3.session.Session(
            aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=FAKE_CREDENTIALS["AWS_SESSION_TOKEN"],
            region_name=REGION,
        )

    def client(self, service: str, session: boto3.session.Session | None = None):
        """A client for ``service`` on this server, with retries that fit a local endpoint."""
        return (session or self.session()).client(
            service,
            endpoint_url=self.endpoint,
            config=Config(retries={"max_attempts": 2, "mode": "standard"}),
        )

    def process_environment(self) -> dict[str, str]:
        """What a child process needs to reach this server as its AWS."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            **FAKE_CREDENTIALS,
        }


def ec2_backend():
    """moto's in-process EC2 backend of our account and region."""
    from moto.ec2.models import ec2_backends

    return ec2_backends[ACCOUNT_ID][REGION]
