"""The template's REST API on 127.0.0.1, like ``sam local start-api``: proxy events to the function.

Each request becomes an API Gateway REST ``aws-proxy`` (v1) event for the
route's function; the function's ``{statusCode, headers, body}`` becomes the
response. Routes with ``AWS_IAM`` auth need a SigV4 ``Authorization`` header
(as API Gateway, it answers 403 without one); the signature is not verified,
and ``requestContext.identity`` is filled from its access key the way IAM
authorization fills it. A route that validates its body checks it against the
API's model (JSON Schema draft 4, as API Gateway) before the function runs, and
answers a refused body with the API's ``BAD_REQUEST_BODY`` gateway response.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import jsonschema

from spotrun_local.aws import ACCOUNT_ID
from spotrun_local.deploy import ApiRoute
from spotrun_local.lambdas import FunctionPool

log = logging.getLogger(__name__)

_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


def _route_pattern(path: str) -> re.Pattern[str]:
    parts = []
    for piece in re.split(r"(\{[^}]+\})", path):
        if piece.startswith("{") and piece.endswith("+}"):
            parts.append(f"(?P<{piece[1:-2]}>.+)")
        elif piece.startswith("{"):
            parts.append(f"(?P<{piece[1:-1]}>[^/]+)")
        else:
            parts.append(re.escape(piece))
    return re.compile("^" + "".join(parts) + "/?$")


@dataclass(frozen=True)
class _CompiledRoute:
    route: ApiRoute
    pattern: re.Pattern[str]


def proxy_event(
    route: ApiRoute,
    method: str,
    raw_path: str,
    headers: dict[str, str],
    body: bytes,
    path_parameters: dict[str, str],
    api_id: str,
    source_ip: str = "127.0.0.1",
) -> dict[str, Any]:
    """The REST ``aws-proxy`` event API Gateway would send for this request."""
    split = urlsplit(raw_path)
    query = parse_qs(split.query, keep_blank_values=True)
    access_key = None
    match = _CREDENTIAL.search(headers.get("Authorization", ""))
    if match:
        access_key = match.group(1)
    identity = {
        "cognitoIdentityPoolId": None,
        "cognitoIdentityId": None,
        "cognitoAuthenticationType": None,
        "cognitoAuthenticationProvider": None,
        "accountId": ACCOUNT_ID if access_key else None,
        "caller": access_key,
        "accessKey": access_key,
        "user": access_key,
        "userArn": f"arn:aws:iam::{ACCOUNT_ID}:user/local" if access_key else None,
        "principalOrgId": None,
        "sourceIp": source_ip,
        "userAgent": headers.get("User-Agent"),
    }
    try:
        text, encoded = body.decode("utf-8"), False
    except UnicodeDecodeError:
        text, encoded = base64.b64encode(body).decode(), True
    now = time.time()
    return {
        "resource": route.path,
        "path": unquote(split.path),
        "httpMethod": method,
        "headers": headers or None,
        "multiValueHeaders": {key: [value] for key, value in headers.items()} or None,
        "queryStringParameters": {key: values[-1] for key, values in query.items()} or None,
        "multiValueQueryStringParameters": query or None,
        "pathParameters": path_parameters or None,
        "stageVariables": None,
        "requestContext": {
            "accountId": ACCOUNT_ID,
            "apiId": api_id,
            "resourceId": "local",
            "resourcePath": route.path,
            "httpMethod": method,
            "path": f"/{route.stage}{unquote(split.path)}",
            "stage": route.stage,
            "protocol": "HTTP/1.1",
            "domainName": headers.get("Host", "127.0.0.1"),
            "requestId": str(uuid.uuid4()),
            "extendedRequestId": str(uuid.uuid4()),
            "requestTime": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "requestTimeEpoch": int(now * 1000),
            "identity": identity,
        },
        "body": text if body else None,
        "isBase64Encoded": encoded,
    }


class RestApiServer:
    """Serves the stack's routes on 127.0.0.1 (a free port unless one is given)."""

    def __init__(
        self,
        routes: Sequence[ApiRoute],
        pool: FunctionPool,
        api_ids: dict[str, str],
        port: int = 0,
    ) -> None:
        self.routes = [_CompiledRoute(route, _route_pattern(route.path)) for route in routes]
        self.pool, self.api_ids, self.port = pool, api_ids, port

    def start(self) -> RestApiServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="api")
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes):
        """Route one request; return ``(status, headers, body)``."""
        path = urlsplit(raw_path).path
        candidates = [
            (compiled, match)
            for compiled in self.routes
            if (match := compiled.pattern.match(path)) and compiled.route.method in (method, "ANY")
        ]
        if not candidates:  # API Gateway's answer to an unknown route
            return (
                403,
                {"Content-Type": "application/json"},
                b'{"message":"Missing Authentication Token"}',
            )
        # The most specific route wins: fewest path parameters, then the longest literal.
        compiled, match = min(
            candidates, key=lambda item: (item[0].route.path.count("{"), -len(item[0].route.path))
        )
        route = compiled.route
        if route.iam_auth and not headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256"):
            return (
                403,
                {"Content-Type": "application/json"},
                b'{"message":"Missing Authentication Token"}',
            )
        if route.body_schema is not None:
            refused = _validate_body(route, body)
            if refused is not None:
                return refused
        event = proxy_event(
            route,
            method,
            raw_path,
            headers,
            body,
            {key: unquote(value) for key, value in match.groupdict().items()},
            self.api_ids.get(route.api, "local"),
        )
        result = self.pool.invoke(route.function, event)
        if result.function_error:
            return (
                502,
                {"Content-Type": "application/json"},
                b'{"message": "Internal server error"}',
            )
        answer = result.json() or {}
        if not isinstance(answer, dict) or "statusCode" not in answer:
            return (
                502,
                {"Content-Type": "application/json"},
                b'{"message": "Internal server error"}',
            )
        out_headers = {key: str(value) for key, value in (answer.get("headers") or {}).items()}
        for key, values in (answer.get("multiValueHeaders") or {}).items():
            out_headers[key] = ", ".join(str(value) for value in values)
        payload = answer.get("body") or ""
        data = base64.b64decode(payload) if answer.get("isBase64Encoded") else payload.encode()
        return int(answer["statusCode"]), out_headers, data


def _validate_body(route: ApiRoute, body: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """API Gateway's request validation of the body; the refusal, or None to go on."""
    assert route.body_schema is not None
    try:
        document = json.loads(body or b"null")
    except ValueError as error:
        problems = [f"Invalid JSON in the request body: {error}"]
    else:
        validator = jsonschema.Draft4Validator(route.body_schema)
        problems = [
            f"{'/'.join(str(p) for p in problem.path) or 'body'}: {problem.message}"
            for problem in sorted(validator.iter_errors(document), key=lambda e: list(e.path))
        ]
    if not problems:
        return None
    text = "[" + ", ".join(problems) + "]"
    response = route.bad_body_response or {}
    template = (response.get("ResponseTemplates") or {}).get("application/json")
    if template is None:
        data = json.dumps({"message": "Invalid request body"}).encode()
    else:
        # API Gateway substitutes the variable as it is; escape it so the body stays JSON.
        escaped = json.dumps(text)[1:-1]
        data = template.replace("$context.error.validationErrorString", escaped).encode()
    status = int(response.get("StatusCode") or 400)
    return status, {"Content-Type": "application/json"}, data


def _handler_for(api: RestApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:
            log.debug("api: " + format, *args)

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {key: value for key, value in self.headers.items()}
            try:
                status, out_headers, data = api.handle(self.command, self.path, headers, body)
            except Exception:
                log.exception("api: %s %s failed", self.command, self.path)
                status, out_headers = 500, {"Content-Type": "application/json"}
                data = json.dumps({"message": "Internal server error"}).encode()
            self.send_response(status)
            for key, value in out_headers.items():
                if key.lower() not in ("content-length", "connection"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    return Handler
