"""Lambda functions as warm worker processes, and the hook that routes ``lambda:Invoke`` to them.

Each function gets its own long-lived worker subprocess (a "container"), started
on the first call and reused afterwards; a concurrent call starts another, as
Lambda scales out. A worker's environment is exactly the template's (Globals +
the function's own) plus what the Lambda runtime itself sets, the local AWS
endpoint and fake credentials. ``PYTHONPATH`` is the layers + the code folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class PoolClosedError(RuntimeError):
    """An invocation after the function pool was shut down."""


RUNTIME = Path(__file__).with_name("lambda_runtime.py")
_INVOKE_PATH = re.compile(r"/functions/(?P<name>[^/]+)/invocations")


@dataclass(frozen=True)
class FunctionSpec:
    """One function as the template declares it, resolved."""

    logical_id: str
    name: str
    arn: str
    handler: str
    code_dir: Path
    layer_dirs: tuple[Path, ...]
    environment: Mapping[str, str]
    timeout_seconds: float = 3.0
    memory_mb: int = 128


@dataclass(frozen=True)
class InvokeResult:
    """What ``lambda:Invoke`` answers: the payload, and ``Unhandled`` when the handler raised."""

    payload: bytes
    function_error: str | None = None

    def json(self) -> Any:
        return json.loads(self.payload) if self.payload else None


class _Worker:
    """One warm container: a runtime subprocess, its replies read by a thread."""

    def __init__(self, spec: FunctionSpec, environment: dict[str, str], log_path: Path) -> None:
        self.spec = spec
        self._log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the worker
        self.process = subprocess.Popen(
            [sys.executable, "-P", str(RUNTIME)],
            cwd=spec.code_dir,
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,  # its own process group, so stop() takes children too
            text=True,
            bufsize=1,
        )
        self._replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name=f"lambda-{spec.name}").start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._replies.put(line)
        self._replies.put(None)  # EOF: the runtime exited

    def call(self, event: Any, context: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps({"event": event, "context": context}) + "\n")
            self.process.stdin.flush()
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            message = f"Task timed out after {timeout:.2f} seconds"
            return {"error": {"errorMessage": message, "errorType": "Sandbox.Timedout"}}
        except (BrokenPipeError, OSError):
            line = None
        if line is None:
            self.stop()
            code = self.process.poll()
            message = f"RequestId: {context['aws_request_id']} Error: Runtime exited ({code})"
            return {"error": {"errorMessage": message, "errorType": "Runtime.ExitError"}}
        return json.loads(line)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()


@dataclass
class FunctionPool:
    """The functions of one deployment, each with its warm workers."""

    functions: Mapping[str, FunctionSpec]
    base_environment: Mapping[str, str]
    log_dir: Path
    # Lambda retries a failed asynchronous invocation twice, after about 1 and 2
    # minutes; the local cloud keeps the two retries and scales the delays down.
    async_retry_delays: tuple[float, ...] = (1.0, 2.0)
    _idle: dict[str, list[_Worker]] = field(default_factory=dict)
    _all: list[_Worker] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False
    # (logical id, time) of recent invocations, for tests and the demo; bounded.
    invocations: deque[tuple[str, float]] = field(default_factory=lambda: deque(maxlen=10000))

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._by_name = {}
        for spec in self.functions.values():
            for key in (spec.logical_id, spec.name, spec.arn):
                self._by_name[key] = spec

    def spec(self, name_or_arn: str) -> FunctionSpec:
        """The function a name, an ARN (maybe with a qualifier) or a logical id designates."""
        if name_or_arn in self._by_name:
            return self._by_name[name_or_arn]
        unqualified = re.sub(r":(\$LATEST|\d+|[A-Za-z][\w-]*)$", "", name_or_arn)
        if unqualified in self._by_name and unqualified.count(":") >= 6:
            return self._by_name[unqualified]
        raise KeyError(f"no function {name_or_arn!r} in the template")

    def environment(self, spec: FunctionSpec) -> dict[str, str]:
        """The worker's whole environment: template's, the runtime's, the local endpoint."""
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "en_US.UTF-8",
            "TZ": ":UTC",
            "LAMBDA_TASK_ROOT": str(spec.code_dir),
            "_HANDLER": spec.handler,
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.11",
            "AWS_LAMBDA_FUNCTION_NAME": spec.name,
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.name}",
            "PYTHONPATH": os.pathsep.join(str(p) for p in (*spec.layer_dirs, spec.code_dir)),
            "PYTHONUNBUFFERED": "1",
            **self.base_environment,
        }
        environment.update(spec.environment)  # the template's values win, as on Lambda
        return environment

    def invoke(self, name_or_arn: str, event: Any) -> InvokeResult:
        """A synchronous (``RequestResponse``) invocation."""
        spec = self.spec(name_or_arn)
        worker = self._take(spec)
        request_id = str(uuid.uuid4())
        context = {
            "function_name": spec.name,
            "invoked_function_arn": spec.arn,
            "memory_limit_in_mb": spec.memory_mb,
            "aws_request_id": request_id,
            "deadline": time.time() + spec.timeout_seconds,
        }
        self.invocations.append((spec.logical_id, time.time()))
        reply = worker.call(event, context, timeout=spec.timeout_seconds)
        self._give_back(spec, worker)
        if "error" in reply:
            error = {"requestId": request_id, **reply["error"]}
            log.info("%s raised %s: %s", spec.logical_id, error["errorType"], error["errorMessage"])
            return InvokeResult(json.dumps(error).encode(), function_error="Unhandled")
        return InvokeResult(reply["result"].encode())

    def invoke_async(self, name_or_arn: str, event: Any) -> None:
        """An ``Event`` invocation: queued, retried twice on error like Lambda does."""
        self.spec(name_or_arn)  # unknown function: fail now, in the caller

        def run() -> None:
            result = None
            for delay in (0.0, *self.async_retry_delays):
                if self._closed:
                    return
                time.sleep(delay)
                try:
                    result = self.invoke(name_or_arn, event)
                except PoolClosedError:  # the cloud stopped while this event waited
                    log.info("dropped an async invocation of %s: pool shut down", name_or_arn)
                    return
                if result.function_error is None:
                    return
            error = result.json() if result else {}
            log.warning(
                "async invocation of %s failed after retries: %s: %s",
                name_or_arn,
                error.get("errorType"),
                error.get("errorMessage"),
            )

        threading.Thread(target=run, daemon=True, name=f"async-{name_or_arn[-30:]}").start()

    def _take(self, spec: FunctionSpec) -> _Worker:
        with self._lock:
            if self._closed:
                raise PoolClosedError("the function pool is shut down")
            idle = self._idle.setdefault(spec.logical_id, [])
            while idle:
                worker = idle.pop()
                if worker.alive:
                    return worker
            worker = _Worker(spec, self.environment(spec), self.log_dir / f"{spec.logical_id}.log")
            self._all.append(worker)
            return worker

    def _give_back(self, spec: FunctionSpec, worker: _Worker) -> None:
        with self._lock:
            if worker.alive and not self._closed:
                self._idle.setdefault(spec.logical_id, []).append(worker)

    def close(self) -> None:
        """Stop every worker (and its process group)."""
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
            self._idle.clear()
        for worker in workers:
            worker.stop()

    # -- the botocore hook -----------------------------------------------------

    def install_invoke_hook(self) -> None:
        """Answer every ``lambda:Invoke`` of this process's default boto3 session.

        moto's Step Functions interpreter calls Lambda through ``boto3.client``
        (the default session); moto itself would need Docker. The hook answers
        before the request is sent, with the shape botocore would have parsed.
        """
        import boto3

        session = boto3._get_default_session()
        session.events.register("before-call.lambda.Invoke", self._on_invoke, unique_id=_HOOK_ID)

    def remove_invoke_hook(self) -> None:
        import boto3

        boto3._get_default_session().events.unregister(
            "before-call.lambda.Invoke", unique_id=_HOOK_ID
        )

    def _on_invoke(self, params: dict[str, Any], **_: Any):
        from botocore.awsrequest import AWSResponse
        from botocore.response import StreamingBody

        match = _INVOKE_PATH.search(params["url_path"])
        if match is None:
            return None
        name = urllib.parse.unquote(match.group("name"))
        body = params.get("body") or b"{}"
        event = json.loads(body.decode() if isinstance(body, bytes) else body)
        invocation_type = (params.get("headers") or {}).get("X-Amz-Invocation-Type")
        response = AWSResponse(params.get("url", ""), 200, {}, None)
        if invocation_type == "Event":
            self.invoke_async(name, event)
            response.status_code = 202
            parsed = {"StatusCode": 202, "Payload": StreamingBody(_bytes_io(b""), 0)}
            return response, parsed
        result = self.invoke(name, event)
        parsed = {
            "StatusCode": 200,
            "ExecutedVersion": "$LATEST",
            "Payload": StreamingBody(_bytes_io(result.payload), len(result.payload)),
        }
        if result.function_error:
            parsed["FunctionError"] = result.function_error
        return response, parsed


_HOOK_ID = "spotrun-local-lambda-invoke"


def _bytes_io(data: bytes):
    import io

    return io.BytesIO(data)
