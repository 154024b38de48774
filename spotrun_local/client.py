"""A small client of the local REST API, signing requests with SigV4 as an IAM caller would."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from spotrun_local.aws import FAKE_CREDENTIALS, REGION


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: Any  # parsed JSON, or the text when it is not JSON


@dataclass
class ApiClient:
    """Calls ``url`` (the local API) with SigV4-signed requests for ``execute-api``."""

    url: str
    timeout_seconds: float = 60.0

    def request(self, method: str, path: str, body: Any = None) -> ApiResponse:
        data = (
            b""
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        signed = AWSRequest(
            method=method,
            url=self.url.rstrip("/") + path,
            data=data,
            headers={"Content-Type": "application/json"},
        )
        credentials = Credentials(
            FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            FAKE_CREDENTIALS["AWS_SESSION_TOKEN"],
        )
        SigV4Auth(credentials, "execute-api", REGION).add_auth(signed)
        request = urllib.request.Request(
            signed.url, data=data or None, method=method, headers=dict(signed.headers.items())
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                return ApiResponse(response.status, _parse(response.read()))
        except urllib.error.HTTPError as error:
            return ApiResponse(error.code, _parse(error.read()))

    def submit(self, spec: Any) -> ApiResponse:
        return self.request("POST", "/jobs", spec)

    def job(self, job_id: str) -> ApiResponse:
        return self.request("GET", f"/jobs/{job_id}")

    def cancel(self, job_id: str) -> ApiResponse:
        return self.request("DELETE", f"/jobs/{job_id}")


def _parse(data: bytes) -> Any:
    text = data.decode(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text
