"""An instance metadata service (IMDSv2 only) for one local instance, on its own loopback port.

Serves what the trainer and the bootstrap read (docs/contracts.md): the token
``PUT``, identity, placement, and the two spot signals, ``spot/instance-action``
and ``events/recommendations/rebalance``, which stay 404 until chaos sets them.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TTL_SECONDS = 21600


def iso_time(unix_seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_seconds))


@dataclass
class InstanceMetadata:
    """What IMDS knows about one instance; the spot fields change while it runs."""

    instance_id: str
    instance_type: str
    availability_zone: str
    region: str
    ami_id: str = "ami-local"
    private_ip: str = "127.0.0.1"
    lifecycle: str = "spot"
    instance_action: dict | None = None
    rebalance: dict | None = None

    def paths(self) -> dict[str, str]:
        paths = {
            "meta-data/instance-id": self.instance_id,
            "meta-data/instance-type": self.instance_type,
            "meta-data/ami-id": self.ami_id,
            "meta-data/local-ipv4": self.private_ip,
            "meta-data/instance-life-cycle": self.lifecycle,
            "meta-data/placement/availability-zone": self.availability_zone,
            "meta-data/placement/region": self.region,
            "dynamic/instance-identity/document": json.dumps(
                {
                    "instanceId": self.instance_id,
                    "instanceType": self.instance_type,
                    "availabilityZone": self.availability_zone,
                    "region": self.region,
                    "imageId": self.ami_id,
                    "privateIp": self.private_ip,
                }
            ),
        }
        if self.instance_action is not None:
            paths["meta-data/spot/instance-action"] = json.dumps(self.instance_action)
            paths["meta-data/spot/termination-time"] = self.instance_action["time"]
        if self.rebalance is not None:
            paths["meta-data/events/recommendations/rebalance"] = json.dumps(self.rebalance)
        return paths


@dataclass
class IMDSServer:
    """One IMDS endpoint, bound to 127.0.0.1 on a free port."""

    metadata: InstanceMetadata
    _tokens: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0

    def start(self) -> IMDSServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            daemon=True,
            name=f"imds-{self.metadata.instance_id}",
        )
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def notify_interruption(self, termination_time: float, action: str = "terminate") -> None:
        """The two-minute warning: ``spot/instance-action`` appears."""
        self.metadata.instance_action = {"action": action, "time": iso_time(termination_time)}

    def notify_rebalance(self, notice_time: float | None = None) -> None:
        """A rebalance recommendation: ``events/recommendations/rebalance`` appears."""
        self.metadata.rebalance = {"noticeTime": iso_time(notice_time or time.time())}

    def issue_token(self, ttl_seconds: int) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[token] = now + ttl_seconds
        return token

    def token_valid(self, token: str | None) -> bool:
        with self._lock:
            return token is not None and self._tokens.get(token, 0.0) > time.monotonic()


def _handler_for(imds: IMDSServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:
            pass  # an instance polls every couple of seconds; keep the console quiet

        def _answer(self, status: int, body: str = "") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            imds.requests += 1
            if self.path.rstrip("/") != "/latest/api/token":
                self._answer(404)
                return
            try:
                ttl = int(self.headers.get(TTL_HEADER, ""))
            except ValueError:
                self._answer(400)  # IMDS insists on the TTL header
                return
            if not 1 <= ttl <= MAX_TTL_SECONDS:
                self._answer(400)
                return
            self._answer(200, imds.issue_token(ttl))

        def do_GET(self) -> None:
            imds.requests += 1
            if not imds.token_valid(self.headers.get(TOKEN_HEADER)):
                self._answer(401)  # IMDSv2 required: no token, no metadata
                return
            path = self.path.split("?", 1)[0]
            if not path.startswith("/latest/"):
                self._answer(404)
                return
            value = imds.metadata.paths().get(path[len("/latest/") :].rstrip("/"))
            self._answer(404) if value is None else self._answer(200, value)

    return Handler
